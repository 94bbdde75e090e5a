"""Checkpoint layouts: which one a ``config.json`` announces, and our config + weight sources for it.

========================  ==========================================================================
``model_type``            layout
========================  ==========================================================================
``llava``                 the original Video-LLaVA (LLM + projector + embedded towers; tower configs
                          from ``--video_tower``/``--image_tower`` or the config's ``mm_*_tower``)
``video_llava``           transformers' ``-hf`` port (one ``vision_config``; no temporal attention)
``vidlora_video_llava``   ours (a merged vidlora checkpoint)
anything else             a plain causal LM (LLaMA/Vicuna) + LanguageBind towers + optional
                          ``--pretrain_mm_mlp_adapter``
========================  ==========================================================================

The layout also decides how prompts are tokenized (``prompt_tokenization``): the original and a
plain LLM trained the original way cut the prompt at each media placeholder and tokenize every
piece on its own (``split_at_media``, the original's ``tokenizer_image_token``); the ``-hf`` port's
processor tokenizes the whole prompt at once (``whole_prompt``); ours records its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import CONFIG_MAPPING, CLIPVisionConfig, PreTrainedConfig

from vidlora.errors import NotFoundError, UsageError
from vidlora.model import keymaps
from vidlora.model.configuration import (
    DEFAULT_SELECT_LAYER,
    MODEL_TYPE,
    LanguageBindVideoConfig,
    VideoLlavaConfig,
    num_patches,
)
from vidlora.model.hub import keys_of, read_config, resolve_directory, weight_files
from vidlora.model.report import LoadReport

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
_LLAVA_ONLY = re.compile(
    r"^(mm_|image_aspect_ratio|tune_mm|freeze_mm|use_mm_proj|tokenizer_|X$|architectures$)"
)


@dataclass
class WeightSource:
    """One weight source: files of one layout (``tower`` for a LanguageBind checkpoint)."""

    files: list[Path]
    layout: keymaps.Layout
    tower: keymaps.Tower | None = None
    # our-key prefixes whose weights this source must not provide (replaced by another source)
    skip_prefixes: tuple[str, ...] = ()
    skip_reason: str = ""


@dataclass
class LoadPlan:
    """What to build and where its weights come from.

    ``fresh_projector`` is True when no file provides the projector by design (a plain LLM
    without ``--pretrain_mm_mlp_adapter``): it is then initialised, not reported missing.
    """

    config: VideoLlavaConfig
    sources: list[WeightSource] = field(default_factory=list)
    fresh_projector: bool = False


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
        raise UsageError("config.json has no model_type: cannot tell which checkpoint layout it is")
    return "llm"


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


def _video_tower(config: CLIPVisionConfig | None) -> LanguageBindVideoConfig | None:
    """A video tower's config as `tower_config(..., video=True)` built it (always the video config)."""
    assert config is None or isinstance(config, LanguageBindVideoConfig)
    return config


def _text_config(raw: dict[str, Any], *, default_type: str = "llama") -> PreTrainedConfig:
    fields = {k: v for k, v in raw.items() if k not in ("transformers_version", "architectures")}
    model_type = fields.pop("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"unsupported language model type {model_type!r}")
    return CONFIG_MAPPING[model_type](**fields)


def _llava_text_config(raw: dict[str, Any]) -> PreTrainedConfig:
    """The LLaMA config inside an original (LlavaLlamaForCausalLM) config."""
    fields = {k: v for k, v in raw.items() if not _LLAVA_ONLY.match(k)}
    fields["model_type"] = "llama"
    return _text_config(fields)


def _projector_from_hf(raw: dict[str, Any]) -> str:
    act = raw.get("projector_hidden_act", "gelu")
    if act != "gelu" or not raw.get("multimodal_projector_bias", True):
        raise UsageError(
            f"-hf projector with projector_hidden_act={act!r}, bias={raw.get('multimodal_projector_bias')}: "
            "only the Video-LLaVA mlp2x_gelu projector (gelu, with bias) is supported"
        )
    return "mlp2x_gelu"


def _select_layer(value: Any, where: str) -> int:
    if not isinstance(value, int):
        raise UsageError(f"{where}: vision feature layer {value!r} is not a single int; unsupported")
    return value


def _from_hf(raw: dict[str, Any], report: LoadReport) -> VideoLlavaConfig:
    vision = raw.get("vision_config") or {}
    image_config = tower_config(vision, video=False, where="-hf vision_config", notes=report.notes)
    video_fields = {k: getattr(image_config, k) for k in _VISION_FIELDS}
    n_per_frame = num_patches(image_config) + 1
    video_seq = raw.get("video_seq_length", 8 * n_per_frame)
    if video_seq % n_per_frame:
        raise UsageError(
            f"-hf video_seq_length {video_seq} is not a multiple of {n_per_frame} tokens per frame"
        )
    video_config = LanguageBindVideoConfig(
        **video_fields, num_frames=video_seq // n_per_frame, add_time_attn=False
    )
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise UsageError(
            f"-hf vision_feature_select_strategy {strategy!r}: only 'default' (drop CLS) is supported"
        )
    report.notes.append(
        "-hf layout: the video tower has NO temporal attention (transformers' converter dropped "
        "LanguageBind's temporal_embedding/temporal_attn); video features differ from the original Video-LLaVA"
    )
    return VideoLlavaConfig(
        # transformers' processor tokenizes the whole prompt at once; a vidlora merge records its own.
        prompt_tokenization=raw.get("prompt_tokenization", "whole_prompt"),
        text_config=_text_config(raw.get("text_config") or {}),
        image_config=image_config,
        video_config=video_config,
        mm_projector_type=_projector_from_hf(raw),
        mm_vision_select_layer=_select_layer(
            raw.get("vision_feature_layer", DEFAULT_SELECT_LAYER), "-hf config"
        ),
        image_token_id=raw.get("image_token_index"),
        video_token_id=raw.get("video_token_index"),
        pad_token_id=raw.get("pad_token_id"),
    )


def _tower_dir(name: str, *, flag: str, cache_dir: str | None, weights: bool) -> Path:
    try:
        return resolve_directory(name, cache_dir=cache_dir, weights=weights)
    except FileNotFoundError as err:
        raise NotFoundError(f"{flag} {name}: {err}") from err


def _from_original(
    raw: dict[str, Any],
    root: Path,
    main_keys: list[str],
    video_tower: str | None,
    image_tower: str | None,
    cache_dir: str | None,
    meta: bool,
    report: LoadReport,
) -> tuple[VideoLlavaConfig, list[WeightSource]]:
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise UsageError(f"{root}: mm_vision_select_feature {select_feature!r} is unsupported (only 'patch')")
    for flag in ("mm_use_im_start_end", "mm_use_x_start_end"):
        if raw.get(flag):
            raise UsageError(f"{root}: {flag}=true (start/end tokens around media) is unsupported")
    towers: dict[str, CLIPVisionConfig | None] = {}
    sources: list[WeightSource] = []
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
            raise NotFoundError(
                f"{root}: the {part} config (heads, activation, frames) comes from its LanguageBind "
                f"checkpoint, named {named!r} ({config_key}); it could not be found. Pass {flag} DIR. ({err})"
            ) from err
        towers[part] = tower_config(
            read_config(directory), video=part == "video_tower", where=str(directory), notes=report.notes
        )
        if need_weights:
            sources.append(WeightSource(weight_files(directory), "languagebind", tower=part))  # type: ignore[arg-type]
            if embedded:
                report.notes.append(
                    f"{part}: weights from {directory} replace those embedded in the checkpoint"
                )
        elif not meta:
            report.notes.append(f"{part}: weights embedded in the checkpoint; config from {directory}")
    config = VideoLlavaConfig(
        prompt_tokenization="split_at_media",  # the original's tokenizer_image_token
        text_config=_llava_text_config(raw),
        image_config=towers["image_tower"],
        video_config=_video_tower(towers["video_tower"]),
        # The original's default when the key is absent (ModelArguments.mm_projector_type).
        mm_projector_type=raw.get("mm_projector_type", "linear"),
        mm_vision_select_layer=_select_layer(
            raw.get("mm_vision_select_layer", DEFAULT_SELECT_LAYER), str(root)
        ),
    )
    return config, sources


def _from_llm(
    raw: dict[str, Any],
    video_tower: str | None,
    image_tower: str | None,
    cache_dir: str | None,
    meta: bool,
    report: LoadReport,
) -> tuple[VideoLlavaConfig, list[WeightSource]]:
    if video_tower is None and image_tower is None:
        raise UsageError(
            f"a plain {raw.get('model_type')!r} language model needs its towers: pass --video_tower and/or "
            "--image_tower (LanguageBind checkpoints)"
        )
    towers: dict[str, CLIPVisionConfig | None] = {"image_tower": None, "video_tower": None}
    sources: list[WeightSource] = []
    for part, named, flag in (
        ("image_tower", image_tower, "--image_tower"),
        ("video_tower", video_tower, "--video_tower"),
    ):
        if named is None:
            report.notes.append(f"no {flag}: the model has no {part}")
            continue
        directory = _tower_dir(named, flag=flag, cache_dir=cache_dir, weights=not meta)
        towers[part] = tower_config(
            read_config(directory), video=part == "video_tower", where=str(directory), notes=report.notes
        )
        if not meta:
            sources.append(WeightSource(weight_files(directory), "languagebind", tower=part))  # type: ignore[arg-type]
    config = VideoLlavaConfig(
        prompt_tokenization="split_at_media",  # trained the original's way
        text_config=_text_config(raw),
        image_config=towers["image_tower"],
        video_config=_video_tower(towers["video_tower"]),
        mm_projector_type="mlp2x_gelu",  # Video-LLaVA's; load_pretrained(mm_projector_type=...) overrides
    )
    return config, sources


def plan_load(
    raw: dict[str, Any],
    root: Path,
    *,
    video_tower: str | None,
    image_tower: str | None,
    pretrain_mm_mlp_adapter: str | None,
    mm_projector_type: str | None,
    cache_dir: str | None,
    meta: bool,
    report: LoadReport,
) -> LoadPlan:
    """Our config and the weight sources for the checkpoint at ``root`` (its ``config.json`` is ``raw``)."""
    layout = report.layout
    main_files = [] if meta else weight_files(root)
    main_keys = keys_of(main_files)
    if layout == "ours":
        plan = LoadPlan(VideoLlavaConfig.from_dict(raw), [WeightSource(main_files, "ours")])
    elif layout == "hf":
        plan = LoadPlan(_from_hf(raw, report), [WeightSource(main_files, "hf")])
    elif layout == "original":
        config, towers = _from_original(
            raw, root, main_keys, video_tower, image_tower, cache_dir, meta, report
        )
        skip = tuple(s.tower + "." for s in towers if s.tower)
        main = WeightSource(
            main_files, "original", skip_prefixes=skip, skip_reason="replaced by the tower checkpoint"
        )
        plan = LoadPlan(config, [main, *towers])
    else:
        config, towers = _from_llm(raw, video_tower, image_tower, cache_dir, meta, report)
        plan = LoadPlan(
            config,
            [WeightSource(main_files, "llm"), *towers],
            fresh_projector=pretrain_mm_mlp_adapter is None,
        )
    if mm_projector_type is not None and mm_projector_type != plan.config.mm_projector_type:
        if layout != "llm":
            raise UsageError(
                f"--mm_projector_type {mm_projector_type}: {root} holds a {plan.config.mm_projector_type!r} projector"
            )
        plan.config.mm_projector_type = mm_projector_type
    if pretrain_mm_mlp_adapter is not None:
        if layout != "llm":
            raise UsageError(
                f"--pretrain_mm_mlp_adapter is for a plain LLM; {root} is a {layout!r} checkpoint "
                "that already holds its projector"
            )
        adapter = Path(pretrain_mm_mlp_adapter)
        if not adapter.is_file():
            raise NotFoundError(f"--pretrain_mm_mlp_adapter {adapter}: no such file")
        plan.sources.append(WeightSource([adapter], "mm_adapter"))
    return plan
