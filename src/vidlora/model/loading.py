"""Load a Video-LLaVA model from any layout users have, strictly, with a report of every tensor.

`load_pretrained` accepts a preset name (``tiny``, ``videollava-7b``), a local directory or a hub id;
:mod:`~vidlora.model.layouts` turns the checkpoint's ``config.json`` into our config and a list of
weight sources. The model is built on the meta device and the checkpoint tensors are assigned into
it, so a 7B model is never initialised at random first. Every source tensor is placed, knowingly
ignored (CLIP text side, rotary ``inv_freq``, ``position_ids`` buffers) or reported; strict loading
(the default) raises on anything missing, shape-mismatched or unexpected.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vidlora.errors import UsageError
from vidlora.model import keymaps
from vidlora.model.configuration import ConfigOverrides, VideoLlavaConfig, set_attn_implementation
from vidlora.model.hub import read_config, read_tensors, resolve_directory
from vidlora.model.layouts import WeightSource, detect_layout, plan_load
from vidlora.model.report import CheckpointLoadError, LoadReport, SourceReport
from vidlora.model.tokenizer import load_tokenizer, media_token_ids

if TYPE_CHECKING:
    from vidlora.model.modeling import VideoLlavaForCausalLM

PRESETS = ("tiny", "videollava-7b")


@dataclass
class LoadedModel:
    """A model ready to use, its tokenizer (with media tokens), and how it was loaded.

    `tokenizer` is None only for the ``videollava-7b`` preset (its tokenizer cannot be built offline).
    """

    model: VideoLlavaForCausalLM
    tokenizer: PreTrainedTokenizerBase | None
    report: LoadReport


def load_pretrained(
    model_name_or_path: str,
    *,
    video_tower: str | None = None,
    image_tower: str | None = None,
    pretrain_mm_mlp_adapter: str | None = None,
    mm_projector_type: str | None = None,
    overrides: ConfigOverrides | None = None,
    strict: bool = True,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
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
        overrides: training-time choices that change the model (feature layer, frames per video),
            validated here against the checkpoint and noted in the report.
        strict: raise `CheckpointLoadError` on missing, shape-mismatched or unexpected weights.
        torch_dtype: dtype of the loaded weights (a torch dtype, its name, or ``auto`` for the
            checkpoint config's); default float32.
        device: where the model ends up (weights are placed there file by file); ``meta`` builds the
            structure only (no weights are read).
        cache_dir: hub cache directory.
        seed: seed for weights initialised fresh (projector without adapter; missing weights of a
            non-strict load) and for presets. Rows added for new tokens are the mean of the old rows.
        attn_implementation: attention kernel of the LLM and both towers (``sdpa``, ``eager``,
            ``flash_attention_2``); default transformers' choice (sdpa where available).

    Returns:
        `LoadedModel(model, tokenizer, report)`; the model is in eval mode.
    """
    device = torch.device(device)
    if model_name_or_path in PRESETS:
        return _load_preset(
            model_name_or_path,
            device=device,
            seed=seed,
            dtype=torch_dtype,
            overrides=overrides,
            attn_implementation=attn_implementation,
        )

    meta = device.type == "meta"
    root = resolve_directory(model_name_or_path, cache_dir=cache_dir, weights=not meta)
    raw = read_config(root)
    report = LoadReport(layout=detect_layout(raw), source=str(root))
    plan = plan_load(
        raw,
        root,
        video_tower=video_tower,
        image_tower=image_tower,
        pretrain_mm_mlp_adapter=pretrain_mm_mlp_adapter,
        mm_projector_type=mm_projector_type,
        cache_dir=cache_dir,
        meta=meta,
        report=report,
    )
    config = plan.config
    if overrides is not None:
        overrides.apply(config, report.notes)
    if attn_implementation is not None:
        set_attn_implementation(config, attn_implementation)
    tokenizer = load_tokenizer(root, text_config=config.text_config, notes=report.notes)
    dtype = _resolve_dtype(torch_dtype, raw)
    model = _build_empty(config)
    if meta:
        report.notes.append("device 'meta': structure only, no weights were read")
    else:
        _assign_weights(model, plan.sources, dtype, report, fresh_ok=plan.fresh_projector, device=device)
        if strict and not report.ok:
            raise CheckpointLoadError(f"{root}: checkpoint does not match the model (strict loading)", report)
        _materialise_fresh(model, report, dtype, seed)
    report.temporal_attention = _has_temporal(config)
    _fit_tokenizer(model, tokenizer, report)
    if not meta:
        model.to(device=device)  # type: ignore[call-arg]  # @wraps(nn.Module.to) hides `self`
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)


def _load_preset(
    name: str,
    *,
    device: torch.device,
    seed: int,
    dtype: torch.dtype | str | None,
    overrides: ConfigOverrides | None,
    attn_implementation: str | None,
) -> LoadedModel:
    from vidlora.model import presets

    if name == "videollava-7b" and device.type != "meta":
        raise UsageError(
            "the 'videollava-7b' preset is a shape-only model (random 7B weights are of no use): "
            "load it with device='meta', or load a real checkpoint (e.g. LanguageBind/Video-LLaVA-7B)"
        )
    report = LoadReport(layout="preset", source=name)
    config = presets.build_config(name)
    if overrides is not None:
        overrides.apply(config, report.notes)
    if attn_implementation is not None:
        set_attn_implementation(config, attn_implementation)
    model, tokenizer = presets.build_preset(
        name, seed=seed, device="meta" if device.type == "meta" else "cpu", config=config
    )
    report.notes.append(f"preset {name!r}: randomly initialised (seed {seed}), no checkpoint read")
    if tokenizer is not None:
        # After the build: a pad id in the LLM's config at build time would zero its embedding row.
        _set_pad_token(model, int(tokenizer.pad_token_id))
    report.temporal_attention = _has_temporal(model.config)
    resolved = _resolve_dtype(dtype, {})
    if device.type != "meta":
        model.to(device=device, dtype=resolved)  # type: ignore[call-arg]  # @wraps(nn.Module.to) hides `self`
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)


def declared_dtype(raw: dict[str, Any]) -> torch.dtype | None:
    """The dtype a checkpoint's ``config.json`` declares (``torch_dtype``, or transformers 5's ``dtype``;
    the -hf layout may declare it in ``text_config`` only), None when it declares none."""
    text = raw.get("text_config")
    for config in (raw, text if isinstance(text, dict) else {}):
        name = config.get("torch_dtype") or config.get("dtype")
        if isinstance(name, str):
            dtype = getattr(torch, name.removeprefix("torch."), None)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                return dtype
    return None


def _resolve_dtype(torch_dtype: torch.dtype | str | None, raw: dict[str, Any]) -> torch.dtype:
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return declared_dtype(raw) or torch.float32
    dtype = getattr(torch, str(torch_dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"unknown torch_dtype {torch_dtype!r}")
    return dtype


def _build_empty(config: VideoLlavaConfig) -> VideoLlavaForCausalLM:
    """The model with parameters on the meta device and buffers real (they are not in checkpoints)."""
    from accelerate import init_empty_weights

    from vidlora.model.modeling import VideoLlavaForCausalLM

    with init_empty_weights(include_buffers=False):
        return VideoLlavaForCausalLM(config)


def _iter_source_tensors(source: WeightSource) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
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
    model: VideoLlavaForCausalLM,
    sources: list[WeightSource],
    dtype: torch.dtype,
    report: LoadReport,
    *,
    fresh_ok: bool,
    device: torch.device | None = None,
) -> None:
    """Place every source tensor into the meta-built model (assign), accounting for each one.

    Tensors go to their final device and dtype one file at a time, so a model loaded onto a GPU
    never sits whole in host memory (about one shard does), and a tensor already in the target
    dtype on the CPU is used as read, without a copy. ``device`` defaults to the CPU.
    """
    device = device or torch.device("cpu")
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
                    raise CheckpointLoadError(
                        f"{path}: {key} provides {ours}, which another file already provided"
                    )
                tensor = tensors[key]
                part[ours] = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
                filled_by.update(dict.fromkeys(aliases.get(ours, [ours]), ours))
            model.load_state_dict(part, strict=False, assign=True)
            src_report.loaded = len(part)
            del tensors, part  # this file's host copies go before the next file is read
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


def _retie(model: PreTrainedModel) -> None:
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
            reset_parameters = getattr(module, "reset_parameters", None)
            if reset_parameters is not None:
                reset_parameters()
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


def _set_pad_token(model: VideoLlavaForCausalLM, pad: int) -> None:
    """The pad id everywhere the Trainer and generate() look, so neither has to "align" it later (the
    Trainer warns when it does)."""
    config = model.config
    config.pad_token_id = config.text_config.pad_token_id = pad
    for generation_config in (
        getattr(model, "generation_config", None),
        getattr(model.language_model, "generation_config", None),
    ):
        if generation_config is not None:
            generation_config.pad_token_id = pad


def _fit_tokenizer(
    model: VideoLlavaForCausalLM, tokenizer: PreTrainedTokenizerBase, report: LoadReport
) -> None:
    """Make the embeddings cover the tokenizer and record the media token ids in the config."""
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
    _set_pad_token(model, ids.pad)
    rows = _weight(model.language_model.get_input_embeddings()).shape[0]
    if grow_embeddings(model, len(tokenizer)):
        report.notes.append(
            f"embeddings resized {rows} -> {len(tokenizer)} rows for the added tokens "
            "(new rows = mean of the old ones, as LLaVA's smart_tokenizer_and_embedding_resize)"
        )


@torch.no_grad()
def grow_embeddings(model: VideoLlavaForCausalLM, rows: int) -> bool:
    """Give the LLM's embeddings (and head) ``rows`` rows if it has fewer; True when it grew.

    New rows are the mean of the old ones (LLaVA's smart_tokenizer_and_embedding_resize). A
    vocabulary padded past the tokenizer (the -hf port's 32064 rows) is never shrunk.
    """
    llm = model.language_model
    old = _weight(llm.get_input_embeddings()).shape[0]
    if rows <= old:
        return False
    llm.resize_token_embeddings(rows, mean_resizing=False)
    model.config.text_config.vocab_size = rows
    for emb in _unique_embeddings(llm):
        if not emb.is_meta:
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
    return True


def _unique_embeddings(llm: PreTrainedModel) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    out_emb = llm.get_output_embeddings()
    for module in (llm.get_input_embeddings(), out_emb):
        if module is None:
            continue
        weight = _weight(module)
        if id(weight) not in seen:
            seen.add(id(weight))
            yield weight.data


def _weight(module: nn.Module) -> torch.Tensor:
    """An embedding's or output head's weight (torch types module attributes as `Tensor | Module`)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor")
    return weight
