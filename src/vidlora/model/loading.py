"""Load a Video-LLaVA model from any of the layouts users have, strictly, with a readable report.

`load_pretrained` accepts a preset name (``tiny``, ``videollava-7b``), a local directory or a hub id,
detects the layout from ``config.json`` and builds our config from theirs:

========================  ==========================================================================
``model_type``            layout
========================  ==========================================================================
``llava``                 original Video-LLaVA (LLM + projector + embedded towers; tower configs from
                          ``--video_tower``/``--image_tower`` or the config's ``mm_*_tower``)
``video_llava``           transformers ``-hf`` port (one ``vision_config``; no temporal attention)
``vidlora_video_llava``   ours (a merged vidlora checkpoint)
anything else             a plain causal LM (LLaMA/Vicuna) + LanguageBind towers + optional
                          ``--pretrain_mm_mlp_adapter``
========================  ==========================================================================

Weights are read from safetensors (sharded index too) or, for legacy files, with
``torch.load(weights_only=True)`` only. Every source key is either placed, knowingly ignored (CLIP
text side, rotary ``inv_freq``, ``position_ids`` buffers) or reported; strict loading (the default)
raises on anything missing, shape-mismatched or unexpected. The model is built on the meta device and
the checkpoint tensors are assigned into it, so a 7B model is never initialised at random first.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoTokenizer,
    CLIPVisionConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)

from vidlora.errors import VidloraError
from vidlora.model import keymaps
from vidlora.model.configuration import MODEL_TYPE, LanguageBindVideoConfig, VideoLlavaConfig
from vidlora.model.tokenizer import add_media_tokens

PRESETS = ("tiny", "videollava-7b")
CONFIG_NAME = "config.json"
# Non-weight files fetched from the hub before deciding which weight files are needed.
_HUB_META_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]
# CLIP vision fields we take from a tower's config; anything else there (LanguageBind's LoRA and
# patch-dropout training options, the text side) does not change the inference-time tower.
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
)
_VIDEO_FIELDS = ("num_frames", "add_time_attn")
# Keys of an original (LlavaLlamaForCausalLM) config that are not the LLM's own.
_LLAVA_ONLY = re.compile(r"^(mm_|image_aspect_ratio|tune_mm|freeze_mm|use_mm_proj|tokenizer_|X$|architectures$)")
_PREVIEW = 5


class CheckpointLoadError(VidloraError, ValueError):
    """A checkpoint did not load cleanly; `report` says exactly what is wrong."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        self.report = report
        super().__init__(message if report is None else f"{message}\n{report.format()}")


@dataclass
class SourceReport:
    """What happened to the tensors of one checkpoint file."""

    path: str
    layout: str
    tensors: int = 0
    loaded: int = 0
    ignored: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """Everything a load did, for people (`format`) and for code (the fields).

    Attributes:
        layout: detected layout (``preset``, ``original``, ``hf``, ``llm``, ``ours``).
        source: the resolved directory (or preset name).
        sources: per-file accounting; every tensor of every file is loaded, ignored or unexpected.
        missing: our keys that no checkpoint provided.
        mismatched: (our key, shape in checkpoint, shape in model, file).
        unexpected: (source key, our key or None, file): weights that would be dropped.
        initialised: our keys initialised fresh by design (a projector with no adapter file).
        temporal_attention: whether the video tower has LanguageBind's temporal layers.
        notes: decisions worth knowing (tokens added, embeddings resized, defaults applied).
    """

    layout: str
    source: str
    sources: list[SourceReport] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...], str]] = field(default_factory=list)
    unexpected: list[tuple[str, str | None, str]] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    temporal_attention: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing, shape-mismatched or unexpected weights."""
        return not (self.missing or self.mismatched or self.unexpected)

    @property
    def ignored(self) -> dict[str, str]:
        """Source key -> reason, over all files."""
        return {key: reason for src in self.sources for key, reason in src.ignored.items()}

    def format(self) -> str:
        """A readable summary: counts per part, the first few names of each problem."""
        lines = [f"load report: layout {self.layout!r} from {self.source}"]
        for src in self.sources:
            lines.append(
                f"  {src.path} [{src.layout}]: {src.tensors} tensors, {src.loaded} loaded, "
                f"{len(src.ignored)} ignored, {len(src.unexpected)} unexpected"
            )
        lines += _grouped("missing", self.missing)
        if self.mismatched:
            lines.append(f"  shape mismatch ({len(self.mismatched)}):")
            for key, got, want, path in self.mismatched[:_PREVIEW]:
                lines.append(f"    {key}: checkpoint {list(got)} vs model {list(want)} ({path})")
            if len(self.mismatched) > _PREVIEW:
                lines.append(f"    ... and {len(self.mismatched) - _PREVIEW} more")
        if self.unexpected:
            lines += _grouped(
                "unexpected",
                [f"{src_key} -> {ours}" if ours else src_key for src_key, ours, _ in self.unexpected],
                parts=[keymaps.part_of(ours) if ours else "unmapped" for _, ours, _ in self.unexpected],
            )
        lines += _grouped("initialised fresh", self.initialised)
        ignored = Counter(reason for src in self.sources for reason in src.ignored.values())
        if ignored:
            lines.append(f"  ignored ({sum(ignored.values())}): " + "; ".join(f"{n} x {r}" for r, n in ignored.items()))
        if self.temporal_attention is not None:
            lines.append(f"  temporal attention in the video tower: {'yes' if self.temporal_attention else 'ABSENT'}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _grouped(title: str, keys: list[str], parts: list[str] | None = None) -> list[str]:
    if not keys:
        return []
    groups: dict[str, list[str]] = defaultdict(list)
    for key, part in zip(keys, parts or [keymaps.part_of(k) for k in keys], strict=True):
        groups[part].append(key)
    lines = [f"  {title} ({len(keys)}):"]
    for part, names in groups.items():
        more = f", ... (+{len(names) - _PREVIEW})" if len(names) > _PREVIEW else ""
        lines.append(f"    {part}: {len(names)} ({', '.join(names[:_PREVIEW])}{more})")
    return lines


@dataclass
class LoadedModel:
    """A model ready to use, its tokenizer (with media tokens), and how it was loaded.

    `tokenizer` is None only for the ``videollava-7b`` preset (its tokenizer cannot be built offline).
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    report: LoadReport


# ----------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------


def resolve_directory(name_or_path: str | Path, *, cache_dir: str | None = None, weights: bool = True) -> Path:
    """A local directory for `name_or_path`: itself if it exists, else a hub snapshot.

    For a hub id, config/tokenizer files come first; weight files (safetensors, else legacy ``.bin``)
    only when `weights` is true. Raises with the reason when the hub cannot be reached.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"{name} is a file; expected a checkpoint directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{name}: no such directory, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id=name, cache_dir=cache_dir, allow_patterns=patterns))
        except OSError as err:  # hub errors (offline, not found, HTTP) are OSErrors
            raise FileNotFoundError(
                f"{name}: not a local directory, and the Hugging Face Hub could not provide it "
                f"({type(err).__name__}: {err}). Download it elsewhere and pass the directory."
            ) from err

    root = download(_HUB_META_PATTERNS)
    if weights:
        root = download(["*.safetensors"])
        if not any(root.glob("*.safetensors")):
            root = download(["*.bin"])
    return root


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors (sharded or not), else legacy .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index}: shard(s) listed but not present: {', '.join(absent)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(
        f"{directory}: no weights (model.safetensors, a sharded index, or pytorch_model.bin)"
    )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file. Legacy pickles are read with ``weights_only=True`` and nothing else."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError variants; name the file
        raise CheckpointLoadError(
            f"{path}: cannot read as a weights-only torch file ({type(err).__name__}: {err}); "
            "vidlora never unpickles arbitrary objects: convert it to safetensors"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointLoadError(f"{path}: expected a flat dict of tensors (a state dict)")
    return state


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
    return json.loads(path.read_text())


def detect_layout(config: dict[str, Any]) -> str:
    """The layout a ``config.json`` announces: ``original``, ``hf``, ``ours`` or ``llm``."""
    model_type = config.get("model_type")
    if model_type == "llava":
        return "original"
    if model_type == "video_llava":
        return "hf"
    if model_type == MODEL_TYPE:
        return "ours"
    if model_type is None:
        raise ValueError("config.json has no model_type: cannot tell which checkpoint layout it is")
    return "llm"


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def tower_config(raw: dict[str, Any], *, video: bool, where: str, notes: list[str]) -> CLIPVisionConfig:
    """Our tower config from a tower checkpoint's ``config.json`` (LanguageBind/CLIP) or a vision config.

    LanguageBind keeps the tower in ``vision_config``; a bare CLIP vision config has the fields at the
    top. A missing ``hidden_act`` takes the CLIP/LanguageBind class default (``quick_gelu``), as the
    original code would; the report says so.
    """
    vision = raw.get("vision_config", raw)
    fields = {k: vision[k] for k in _VISION_FIELDS if k in vision}
    if "hidden_act" not in vision:
        notes.append(f"{where}: vision config has no hidden_act; using the CLIP default 'quick_gelu'")
        fields["hidden_act"] = "quick_gelu"
    if not video:
        return CLIPVisionConfig(**fields)
    for key in _VIDEO_FIELDS:
        if key in vision:
            fields[key] = vision[key]
        else:
            # LanguageBind's own class defaults: no temporal attention, one frame.
            default = {"num_frames": 1, "add_time_attn": False}[key]
            notes.append(f"{where}: vision config has no {key}; using LanguageBind's default {default!r}")
            fields[key] = default
    return LanguageBindVideoConfig(**fields)


def _text_config(raw: dict[str, Any], *, default_type: str = "llama") -> PreTrainedConfig:
    fields = {k: v for k, v in raw.items() if k not in ("transformers_version", "architectures")}
    model_type = fields.pop("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unsupported language model type {model_type!r}")
    return CONFIG_MAPPING[model_type](**fields)


def _llava_text_config(raw: dict[str, Any]) -> PreTrainedConfig:
    """The LLaMA config inside an original (LlavaLlamaForCausalLM) config."""
    fields = {k: v for k, v in raw.items() if not _LLAVA_ONLY.match(k)}
    fields["model_type"] = "llama"
    return _text_config(fields)


def _projector_from_hf(raw: dict[str, Any]) -> str:
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu" or not raw.get("multimodal_projector_bias", True):
        raise ValueError(
            f"-hf projector with projector_hidden_act={act!r}, bias={raw.get('multimodal_projector_bias')}: "
            "only the Video-LLaVA mlp2x_gelu projector (gelu, with bias) is supported"
        )
    return "mlp2x_gelu"


def _select_layer(value: Any, where: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"{where}: vision feature layer {value!r} is not a single int; unsupported")
    return value


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One weight source: files of one layout (`tower` for a LanguageBind checkpoint)."""

    files: list[Path]
    layout: keymaps.Layout
    tower: keymaps.Tower | None = None
    # our-key prefixes whose weights this source must not provide (replaced by another source)
    skip_prefixes: tuple[str, ...] = ()
    skip_reason: str = ""


def load_pretrained(
    model_name_or_path: str,
    *,
    video_tower: str | None = None,
    image_tower: str | None = None,
    pretrain_mm_mlp_adapter: str | None = None,
    mm_projector_type: str | None = None,
    strict: bool = True,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build our model from a preset, a local checkpoint directory or a hub id.

    Args:
        model_name_or_path: ``tiny`` / ``videollava-7b`` (presets), a directory, or a hub id.
        video_tower / image_tower: LanguageBind tower checkpoints (directory or hub id). Needed for a
            plain LLM; for the original layout they give the tower configs (default: the config's
            ``mm_video_tower``/``mm_image_tower``) and, when given explicitly, replace the embedded
            tower weights (the report lists the replaced ones as ignored).
        pretrain_mm_mlp_adapter: projector weights for a plain LLM (safetensors; legacy ``.bin`` read
            with ``weights_only=True``). Without it the projector is initialised fresh (reported).
        mm_projector_type: the projector to build for a plain LLM (default ``mlp2x_gelu``). Other
            layouts hold a projector already; naming a different type there is an error.
        strict: raise `CheckpointLoadError` on missing, shape-mismatched or unexpected weights.
        torch_dtype: dtype of the loaded weights (a torch dtype, its name, or ``auto`` for the
            checkpoint config's); default float32.
        device: where the model ends up; ``meta`` builds the structure only (no weights are read).
        cache_dir: hub cache directory.
        seed: seed for weights initialised fresh (projector without adapter; missing weights of a
            non-strict load) and for presets. Rows added for new tokens are the mean of the old rows.

    Returns:
        `LoadedModel(model, tokenizer, report)`; the model is in eval mode.
    """
    device = torch.device(device)
    if model_name_or_path in PRESETS:
        return _load_preset(model_name_or_path, device=device, seed=seed, dtype=torch_dtype)

    meta = device.type == "meta"
    root = resolve_directory(model_name_or_path, cache_dir=cache_dir, weights=not meta)
    raw = read_config(root)
    layout = detect_layout(raw)
    report = LoadReport(layout=layout, source=str(root))
    sources: list[_Source] = []
    main_files = [] if meta else weight_files(root)
    main_keys = _keys_of(main_files)

    if layout == "ours":
        config = VideoLlavaConfig.from_dict(raw)
        sources.append(_Source(main_files, "ours"))
    elif layout == "hf":
        config = _config_from_hf(raw, report)
        sources.append(_Source(main_files, "hf"))
    elif layout == "original":
        config, tower_sources = _config_from_original(
            raw, root, main_keys, video_tower, image_tower, cache_dir, meta, report
        )
        skip = tuple(s.tower + "." for s in tower_sources if s.tower)
        sources.append(
            _Source(main_files, "original", skip_prefixes=skip, skip_reason="replaced by the tower checkpoint")
        )
        sources += tower_sources
    else:
        config, tower_sources = _config_from_llm(raw, video_tower, image_tower, cache_dir, meta, report)
        sources.append(_Source(main_files, "llm"))
        sources += tower_sources
    if mm_projector_type is not None and mm_projector_type != config.mm_projector_type:
        if layout != "llm":
            raise ValueError(
                f"--mm_projector_type {mm_projector_type}: {root} holds a {config.mm_projector_type!r} projector"
            )
        config.mm_projector_type = mm_projector_type
    if pretrain_mm_mlp_adapter is not None:
        if layout != "llm":
            raise ValueError(
                f"--pretrain_mm_mlp_adapter is for a plain LLM; {root} is a {layout!r} checkpoint "
                "that already holds its projector"
            )
        adapter = Path(pretrain_mm_mlp_adapter)
        if not adapter.is_file():
            raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {adapter}: no such file")
        sources.append(_Source([adapter], "mm_adapter"))

    tokenizer = _load_tokenizer(root, report, config.text_config)
    dtype = _resolve_dtype(torch_dtype, raw)
    model = _build_empty(config)
    if meta:
        report.notes.append("device 'meta': structure only, no weights were read")
    else:
        _assign_weights(model, sources, dtype, report, fresh_ok=layout == "llm" and pretrain_mm_mlp_adapter is None)
        if strict and not report.ok:
            raise CheckpointLoadError(f"{root}: checkpoint does not match the model (strict loading)", report)
        _materialise_fresh(model, report, dtype, seed)
    report.temporal_attention = _has_temporal(config)
    _fit_tokenizer(model, tokenizer, report)
    if not meta:
        model.to(device=device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)


def _load_preset(name: str, *, device: torch.device, seed: int, dtype: torch.dtype | str | None) -> LoadedModel:
    from vidlora.model import presets

    if name == "videollava-7b" and device.type != "meta":
        raise ValueError(
            "the 'videollava-7b' preset is a shape-only model (random 7B weights are of no use): "
            "load it with device='meta', or load a real checkpoint (e.g. LanguageBind/Video-LLaVA-7B)"
        )
    model, tokenizer = presets.build_preset(name, seed=seed, device="meta" if device.type == "meta" else "cpu")
    report = LoadReport(layout="preset", source=name)
    report.notes.append(f"preset {name!r}: randomly initialised (seed {seed}), no checkpoint read")
    report.temporal_attention = _has_temporal(model.config)
    resolved = _resolve_dtype(dtype, {})
    if device.type != "meta":
        model.to(device=device, dtype=resolved)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)


def _keys_of(files: list[Path]) -> list[str]:
    """Tensor names of weight files without reading the tensors (index or safetensors headers).

    Only a single, unindexed legacy ``.bin`` has to be read in full (and small ones are the norm there).
    """
    keys: list[str] = []
    for path in files:
        index = path.parent / "pytorch_model.bin.index.json"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys += list(handle.keys())
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            keys += [key for key, name in weight_map.items() if name == path.name]
        else:
            keys += list(read_tensors(path))
    return keys


def _config_from_hf(raw: dict[str, Any], report: LoadReport) -> VideoLlavaConfig:
    vision = raw.get("vision_config") or {}
    image_config = tower_config(vision, video=False, where="-hf vision_config", notes=report.notes)
    video_fields = {k: getattr(image_config, k) for k in _VISION_FIELDS}
    n_per_frame = (image_config.image_size // image_config.patch_size) ** 2 + 1
    video_seq = raw.get("video_seq_length", 8 * n_per_frame)
    if video_seq % n_per_frame:
        raise ValueError(f"-hf video_seq_length {video_seq} is not a multiple of {n_per_frame} tokens per frame")
    video_config = LanguageBindVideoConfig(**video_fields, num_frames=video_seq // n_per_frame, add_time_attn=False)
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"-hf vision_feature_select_strategy {strategy!r}: only 'default' (drop CLS) is supported")
    report.notes.append(
        "-hf layout: the video tower has NO temporal attention (transformers' converter dropped "
        "LanguageBind's temporal_embedding/temporal_attn); video features differ from the original Video-LLaVA"
    )
    return VideoLlavaConfig(
        text_config=_text_config(raw.get("text_config") or {}),
        image_config=image_config,
        video_config=video_config,
        mm_projector_type=_projector_from_hf(raw),
        mm_vision_select_layer=_select_layer(raw.get("vision_feature_layer", -2), "-hf config"),
        image_token_id=raw.get("image_token_index"),
        video_token_id=raw.get("video_token_index"),
        pad_token_id=raw.get("pad_token_id"),
    )


def _tower_dir(name: str, *, flag: str, cache_dir: str | None, weights: bool) -> Path:
    try:
        return resolve_directory(name, cache_dir=cache_dir, weights=weights)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{flag} {name}: {err}") from err


def _config_from_original(
    raw: dict[str, Any],
    root: Path,
    main_keys: list[str],
    video_tower: str | None,
    image_tower: str | None,
    cache_dir: str | None,
    meta: bool,
    report: LoadReport,
) -> tuple[VideoLlavaConfig, list[_Source]]:
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise ValueError(f"{root}: mm_vision_select_feature {select_feature!r} is unsupported (only 'patch')")
    for flag in ("mm_use_im_start_end", "mm_use_x_start_end"):
        if raw.get(flag):
            raise ValueError(f"{root}: {flag}=true (start/end tokens around media) is unsupported")
    towers: dict[str, CLIPVisionConfig | None] = {}
    sources: list[_Source] = []
    for part, explicit, config_key, flag in (
        ("image_tower", image_tower, "mm_image_tower", "--image_tower"),
        ("video_tower", video_tower, "mm_video_tower", "--video_tower"),
    ):
        named = explicit or raw.get(config_key)
        if named is None:
            towers[part] = None
            continue
        embedded = any(k.startswith(f"model.{part}.{part}.") for k in main_keys)
        # Explicit tower weights replace embedded ones; otherwise only the tower's config is needed.
        need_weights = not meta and (explicit is not None or not embedded)
        try:
            directory = _tower_dir(named, flag=flag, cache_dir=cache_dir, weights=need_weights)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{root}: the {part} config (heads, activation, frames) comes from its LanguageBind "
                f"checkpoint, named {named!r} ({config_key}); it could not be found. Pass {flag} DIR. ({err})"
            ) from err
        towers[part] = tower_config(
            read_config(directory), video=part == "video_tower", where=str(directory), notes=report.notes
        )
        if need_weights:
            sources.append(_Source(weight_files(directory), "languagebind", tower=part))  # type: ignore[arg-type]
            if embedded:
                report.notes.append(f"{part}: weights from {directory} replace those embedded in the checkpoint")
        elif not meta:
            report.notes.append(f"{part}: weights embedded in the checkpoint; config from {directory}")
    config = VideoLlavaConfig(
        text_config=_llava_text_config(raw),
        image_config=towers["image_tower"],
        video_config=towers["video_tower"],
        # The original's default when the key is absent (ModelArguments.mm_projector_type).
        mm_projector_type=raw.get("mm_projector_type", "linear"),
        mm_vision_select_layer=_select_layer(raw.get("mm_vision_select_layer", -2), str(root)),
    )
    return config, sources


def _config_from_llm(
    raw: dict[str, Any],
    video_tower: str | None,
    image_tower: str | None,
    cache_dir: str | None,
    meta: bool,
    report: LoadReport,
) -> tuple[VideoLlavaConfig, list[_Source]]:
    if video_tower is None and image_tower is None:
        raise ValueError(
            f"a plain {raw.get('model_type')!r} language model needs its towers: pass --video_tower and/or "
            "--image_tower (LanguageBind checkpoints)"
        )
    towers: dict[str, CLIPVisionConfig | None] = {"image_tower": None, "video_tower": None}
    sources: list[_Source] = []
    for part, named, flag in (("image_tower", image_tower, "--image_tower"), ("video_tower", video_tower, "--video_tower")):
        if named is None:
            report.notes.append(f"no {flag}: the model has no {part}")
            continue
        directory = _tower_dir(named, flag=flag, cache_dir=cache_dir, weights=not meta)
        towers[part] = tower_config(
            read_config(directory), video=part == "video_tower", where=str(directory), notes=report.notes
        )
        if not meta:
            sources.append(_Source(weight_files(directory), "languagebind", tower=part))  # type: ignore[arg-type]
    config = VideoLlavaConfig(
        text_config=_text_config(raw),
        image_config=towers["image_tower"],
        video_config=towers["video_tower"],
        mm_projector_type="mlp2x_gelu",  # Video-LLaVA's; load_pretrained(mm_projector_type=...) overrides
    )
    return config, sources


def _resolve_dtype(torch_dtype: torch.dtype | str | None, raw: dict[str, Any]) -> torch.dtype:
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    name = torch_dtype
    if name == "auto":
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}")
    return dtype


def _build_empty(config: VideoLlavaConfig) -> nn.Module:
    """The model with parameters on the meta device and buffers real (they are not in checkpoints)."""
    from accelerate import init_empty_weights

    from vidlora.model.modeling import VideoLlavaForCausalLM

    with init_empty_weights(include_buffers=False):
        return VideoLlavaForCausalLM(config)


def _iter_source_tensors(source: _Source) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    for path in source.files:
        yield path, read_tensors(path)


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name sharing that parameter (tied weights count as one).

    Ties are read from transformers' declaration (`all_tied_weights_keys`, target -> source), since
    a meta-built model is not tied yet, and from parameter identity for anything tied already.
    """
    groups: dict[str, set[str]] = defaultdict(set)
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id[id(param)].append(name)
    pairs = [(names[0], other) for names in by_id.values() for other in names[1:]]
    pairs += list((getattr(model, "all_tied_weights_keys", None) or {}).items())
    for a, b in pairs:
        merged = groups[a] | groups[b] | {a, b}
        for name in merged:
            groups[name] = merged
    return {name: sorted(names) for name, names in groups.items()}


def _assign_weights(
    model: nn.Module, sources: list[_Source], dtype: torch.dtype, report: LoadReport, *, fresh_ok: bool
) -> None:
    """Place every source tensor into the meta-built model (assign), accounting for each one."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    aliases = _tied_aliases(model)
    filled_by: dict[str, str] = {}  # our key -> the key whose tensor provided it (itself, or a tied one)
    for source in sources:
        for path, tensors in _iter_source_tensors(source):
            src_report = SourceReport(path=str(path), layout=source.layout, tensors=len(tensors))
            report.sources.append(src_report)
            mapping = keymaps.map_keys(tensors, source.layout, tower=source.tower)
            src_report.ignored.update(mapping.ignored)
            for key in mapping.unknown:
                src_report.unexpected.append(key)
                report.unexpected.append((key, None, str(path)))
            part: dict[str, torch.Tensor] = {}
            for key, ours in mapping.mapped.items():
                if source.skip_prefixes and ours.startswith(source.skip_prefixes):
                    src_report.ignored[key] = source.skip_reason
                    continue
                if ours not in expected:
                    src_report.unexpected.append(key)
                    report.unexpected.append((key, ours, str(path)))
                    continue
                got = tuple(tensors[key].shape)
                if got != expected[ours]:
                    report.mismatched.append((ours, got, expected[ours], str(path)))
                    continue
                if ours in filled_by:
                    if filled_by[ours] != ours:
                        # A tied copy (some savers write both names); the tie restores it below.
                        src_report.ignored[key] = f"tied to {filled_by[ours]} (loaded once)"
                        continue
                    raise CheckpointLoadError(f"{path}: {key} provides {ours}, which another file already provided")
                part[ours] = tensors[key].to(dtype) if tensors[key].is_floating_point() else tensors[key]
                filled_by.update(dict.fromkeys(aliases.get(ours, [ours]), ours))
            model.load_state_dict(part, strict=False, assign=True)
            src_report.loaded = len(part)
    # Mismatched keys are not also reported as missing.
    mismatched = {m[0] for m in report.mismatched}
    for key in (k for k in expected if k not in filled_by and k not in mismatched):
        if fresh_ok and key.startswith("mm_projector."):
            report.initialised.append(key)
        else:
            report.missing.append(key)
    if report.initialised:
        report.notes.append("no --pretrain_mm_mlp_adapter: the projector starts from a fresh initialisation")
    _retie(model)


def _retie(model: nn.Module) -> None:
    """Assigning tensors (and building on meta) leaves declared ties undone; restore them."""
    if getattr(model, "all_tied_weights_keys", None):
        model.tie_weights()


def _materialise_fresh(model: nn.Module, report: LoadReport, dtype: torch.dtype, seed: int) -> None:
    """Give real values to parameters no checkpoint provided (fresh projector; non-strict loads)."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    if not names:
        return
    owners = sorted({n.rsplit(".", 1)[0] for n in names})
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for owner in owners:
            module = model.get_submodule(owner)
            module.to_empty(device="cpu", recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for param in module.parameters(recurse=False):
                    nn.init.normal_(param, std=0.02)
            module.to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    fresh = [n for n in names if n not in report.initialised]
    if fresh:
        report.notes.append(f"{len(fresh)} missing weight(s) initialised at random (non-strict load)")


def _has_temporal(config: VideoLlavaConfig) -> bool | None:
    video = getattr(config, "video_config", None)
    return None if video is None else bool(getattr(video, "add_time_attn", False))


def _load_tokenizer(root: Path, report: LoadReport, text_config: PreTrainedConfig) -> PreTrainedTokenizerBase:
    # The LLM's config tells AutoTokenizer the tokenizer family when tokenizer_config.json does not;
    # without it AutoTokenizer would parse config.json, which it cannot for our or the original's.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), config=text_config)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{root}: no usable tokenizer ({type(err).__name__}: {err})") from err
    before = len(tokenizer)
    had = set(tokenizer.get_vocab())
    add_media_tokens(tokenizer)
    added = [t for t in ("<image>", "<video>", "<pad>") if t not in had]
    if added:
        report.notes.append(f"tokenizer: added special tokens {', '.join(added)} ({before} -> {len(tokenizer)})")
    return tokenizer


def _fit_tokenizer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, report: LoadReport) -> None:
    """Make the embeddings cover the tokenizer and record the media token ids in the config."""
    from vidlora.model.tokenizer import media_token_ids

    ids = media_token_ids(tokenizer)
    config = model.config
    for attr, value in (("image_token_id", ids.image), ("video_token_id", ids.video)):
        declared = getattr(config, attr, None)
        if declared is not None and declared != value:
            raise CheckpointLoadError(
                f"{report.source}: config says {attr}={declared} but the tokenizer has {value}: "
                "the checkpoint's config and tokenizer disagree"
            )
        setattr(config, attr, value)
    config.pad_token_id = ids.pad
    llm = model.get_submodule("language_model")
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        _resize_embeddings(llm, len(tokenizer))
        config.text_config.vocab_size = len(tokenizer)
        report.notes.append(
            f"embeddings resized {rows} -> {len(tokenizer)} rows for the added tokens "
            "(new rows = mean of the old ones, as LLaVA's smart_tokenizer_and_embedding_resize)"
        )


@torch.no_grad()
def _resize_embeddings(llm: nn.Module, rows: int) -> None:
    old = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(rows, mean_resizing=False)
    for emb in _unique_embeddings(llm):
        if not emb.is_meta:
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)


def _unique_embeddings(llm: nn.Module) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    out_emb = llm.get_output_embeddings()
    for module in (llm.get_input_embeddings(), out_emb):
        if module is not None and id(module.weight) not in seen:
            seen.add(id(module.weight))
            yield module.weight.data
