"""Checkpoint key maps: the state-dict names of each layout we read, and ours.

Our model (`VideoLlavaForCausalLM`) names its weights
``language_model.model.*`` / ``language_model.lm_head.*`` (an AutoModelForCausalLM),
``image_tower.*`` / ``video_tower.*`` (LanguageBind's ``vision_model.*`` keys minus that prefix) and
``mm_projector.*`` (``mm_projector.0`` / ``mm_projector.2`` for ``mlp2x_gelu``).

Layouts (facts: reference/videollava-facts.md §2-§4, checked against the public code of
PKU-YuanGroup/Video-LLaVA ``llava_arch.py``, transformers ``convert_video_llava_weights_to_hf.py`` and
its ``video_llava`` conversion mapping):

``original``
    the Video-LLaVA LLM checkpoint (``LlavaLlamaForCausalLM``): ``model.*``, ``lm_head.*``,
    ``model.mm_projector.*`` and the embedded towers ``model.image_tower.image_tower.*`` /
    ``model.video_tower.video_tower.*`` (the video one with its temporal keys).
``hf``
    transformers' ``VideoLlavaForConditionalGeneration``. On disk (the converter's names, the hub's
    ``-hf`` repos): ``language_model.model.*``, ``language_model.lm_head.*``,
    ``{image,video}_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``. In memory
    (transformers >= 4.52): ``model.language_model.*``, ``lm_head.*``, ``model.{image,video}_tower.*``,
    ``model.multi_modal_projector.*``. transformers 5 drops the ``vision_model.`` level in both, so it
    is optional here. Its video tower has no temporal layers.
``llm``
    a plain causal LM checkpoint (LLaMA/Vicuna: ``model.*``, ``lm_head.*``): its keys are the
    language model's own, so ours are ``language_model.`` + key.
``languagebind``
    a stand-alone LanguageBind tower (a CLIP model): ``vision_model.*`` is the tower;
    ``text_model.*``, ``visual_projection``, ``text_projection`` and ``logit_scale`` belong to the CLIP
    text side, which Video-LLaVA never uses.
``mm_adapter``
    a ``--pretrain_mm_mlp_adapter`` file: the original keeps every key containing ``mm_projector`` and
    strips everything up to ``mm_projector.`` (``llava_arch.initialize_vision_modules``).
``ours``
    our own names (a merged vidlora checkpoint).

Every function here is pure: strings in, strings out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Layout = Literal["ours", "original", "hf", "llm", "languagebind", "mm_adapter"]
Tower = Literal["image_tower", "video_tower"]
LAYOUTS: tuple[str, ...] = ("ours", "original", "hf", "llm", "languagebind", "mm_adapter")
TOWERS: tuple[str, ...] = ("image_tower", "video_tower")

# The top-level names of a CLIP vision transformer's own sub-modules; a tower key that starts with
# one of these (with or without `vision_model.`) belongs to the tower.
_VISION_ROOTS = r"(?:embeddings|pre_layrnorm|encoder|post_layernorm)\."

# Keys that are not weights: buffers recomputed at construction. Listed as ignored, never an error.
_BUFFER_REASONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)inv_freq$"), "rotary inv_freq buffer (recomputed)"),
    (re.compile(r"(^|\.)position_ids$"), "position_ids buffer (recomputed)"),
)

# The CLIP text side of a LanguageBind checkpoint: Video-LLaVA keeps only `vision_model`.
_CLIP_TEXT_REASONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^text_model\."), "CLIP text tower (unused by Video-LLaVA)"),
    (re.compile(r"^(visual_projection|text_projection)\."), "CLIP contrastive projection (unused)"),
    (re.compile(r"^logit_scale$"), "CLIP logit scale (unused)"),
)

_ORIGINAL_TO_OURS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.image_tower\.image_tower\.(.+)$"), r"image_tower.\1"),
    (re.compile(r"^model\.video_tower\.video_tower\.(.+)$"), r"video_tower.\1"),
    (re.compile(r"^model\.mm_projector\.(.+)$"), r"mm_projector.\1"),
    (re.compile(r"^(model\..+)$"), r"language_model.\1"),
    (re.compile(r"^(lm_head\..+)$"), r"language_model.\1"),
)

_HF_TO_OURS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^(?:model\.)?image_tower\.(?:vision_model\.)?({_VISION_ROOTS}.+)$"), r"image_tower.\1"),
    (re.compile(rf"^(?:model\.)?video_tower\.(?:vision_model\.)?({_VISION_ROOTS}.+)$"), r"video_tower.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_1\.(.+)$"), r"mm_projector.0.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_2\.(.+)$"), r"mm_projector.2.\1"),
    (re.compile(r"^language_model\.model\.(.+)$"), r"language_model.model.\1"),
    (re.compile(r"^model\.language_model\.(.+)$"), r"language_model.model.\1"),
    (re.compile(r"^(?:language_model\.)?lm_head\.(.+)$"), r"language_model.lm_head.\1"),
)

_LANGUAGEBIND_TO_TOWER = re.compile(rf"^(?:vision_model\.)?({_VISION_ROOTS}.+)$")

# `get_w(weights, "mm_projector")` in the original keeps `k.split("mm_projector.")[1]`; the -hf names
# of the same two linears are accepted too.
_MM_ADAPTER_TO_OURS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?:.*\.)?mm_projector\.(.+)$"), r"mm_projector.\1"),
    (re.compile(r"^(?:.*\.)?multi_modal_projector\.linear_1\.(.+)$"), r"mm_projector.0.\1"),
    (re.compile(r"^(?:.*\.)?multi_modal_projector\.linear_2\.(.+)$"), r"mm_projector.2.\1"),
)

_OUR_TOWER = re.compile(r"^(image_tower|video_tower)\.(.+)$")
_OUR_PROJECTOR = re.compile(r"^mm_projector\.(.+)$")
_OUR_LLM = re.compile(r"^language_model\.(.+)$")
_OUR_HF_PROJECTOR = re.compile(r"^mm_projector\.([02])\.(.+)$")
_TEMPORAL = re.compile(r"^video_tower\.encoder\.layers\.\d+\.temporal_")

_K = TypeVar("_K")


def _first_match(key: str, table: Iterable[tuple[re.Pattern[str], str]]) -> str | None:
    """Apply the first rule of `table` whose pattern matches the whole key."""
    for pattern, replacement in table:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def ignored_reason(key: str, layout: Layout) -> str | None:
    """Why a source key is knowingly not loaded, or None if it is a weight that must be placed.

    Buffers (rotary ``inv_freq``, CLIP ``position_ids``) are ignored in every layout; the CLIP text
    side only in a LanguageBind tower checkpoint (elsewhere it would be an unknown weight).
    """
    _check_layout(layout)
    for pattern, reason in _BUFFER_REASONS:
        if pattern.search(key):
            return reason
    if layout == "languagebind":
        for pattern, reason in _CLIP_TEXT_REASONS:
            if pattern.search(key):
                return reason
    return None


def to_ours(key: str, layout: Layout, *, tower: Tower | None = None) -> str | None:
    """Our name for a source key of `layout`, or None when the layout has no rule for it.

    `tower` is required for the ``languagebind`` layout: the same file layout serves both towers.
    Ignored keys (see `ignored_reason`) should be filtered first; this function maps names only.
    """
    _check_layout(layout)
    if layout == "ours":
        return key
    if layout == "original":
        return _first_match(key, _ORIGINAL_TO_OURS)
    if layout == "hf":
        return _first_match(key, _HF_TO_OURS)
    if layout == "llm":
        return "language_model." + key
    if layout == "mm_adapter":
        return _first_match(key, _MM_ADAPTER_TO_OURS)
    # languagebind
    if tower not in TOWERS:
        raise ValueError(f"the languagebind layout needs tower='image_tower' or 'video_tower', got {tower!r}")
    match = _LANGUAGEBIND_TO_TOWER.match(key)
    return f"{tower}.{match.group(1)}" if match else None


def from_ours(
    key: str,
    layout: Layout,
    *,
    tower: Tower | None = None,
    hf_style: Literal["disk", "memory"] = "disk",
    hf_vision_model_prefix: bool = True,
) -> str | None:
    """The name of our key in `layout`, or None when that layout does not hold this weight.

    None means: another file holds it (an LLM checkpoint has no towers, a tower checkpoint holds one
    tower only, an adapter file only the projector), or the layout cannot express it (the ``hf`` layout
    has no temporal attention and only a two-linear projector). Callers writing a full model in a layout
    decide which of these is an error.

    Args:
        key: one of our state-dict keys.
        layout: the target layout.
        tower: for ``languagebind``, the tower whose keys to keep.
        hf_style: ``disk`` = the converter's / hub's names (``language_model.model.*``), ``memory`` =
            the names inside a loaded ``VideoLlavaForConditionalGeneration`` (``model.language_model.*``).
        hf_vision_model_prefix: keep the ``vision_model.`` level in -hf tower keys (hub checkpoints have
            it; transformers 5 writes them without).
    """
    _check_layout(layout)
    if layout == "ours":
        return key
    tower_match = _OUR_TOWER.match(key)
    projector_match = _OUR_PROJECTOR.match(key)
    llm_match = _OUR_LLM.match(key)
    if layout == "original":
        if tower_match:
            name, rest = tower_match.groups()
            return f"model.{name}.{name}.{rest}"
        if projector_match:
            return f"model.mm_projector.{projector_match.group(1)}"
        return llm_match.group(1) if llm_match else None
    if layout == "llm":
        return llm_match.group(1) if llm_match else None
    if layout == "languagebind":
        if tower not in TOWERS:
            raise ValueError(f"the languagebind layout needs tower='image_tower' or 'video_tower', got {tower!r}")
        if tower_match and tower_match.group(1) == tower:
            return f"vision_model.{tower_match.group(2)}"
        return None
    if layout == "mm_adapter":
        return f"model.mm_projector.{projector_match.group(1)}" if projector_match else None
    # hf
    if hf_style not in ("disk", "memory"):
        raise ValueError(f"hf_style must be 'disk' or 'memory', got {hf_style!r}")
    outer = "model." if hf_style == "memory" else ""
    if tower_match:
        if _TEMPORAL.match(key):
            return None
        name, rest = tower_match.groups()
        vision = "vision_model." if hf_vision_model_prefix else ""
        return f"{outer}{name}.{vision}{rest}"
    if projector_match:
        hf_projector = _OUR_HF_PROJECTOR.match(key)
        if not hf_projector:
            return None
        index, rest = hf_projector.groups()
        return f"{outer}multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"
    if llm_match:
        rest = llm_match.group(1)
        if rest.startswith("lm_head."):
            return rest if hf_style == "memory" else f"language_model.{rest}"
        if rest.startswith("model."):
            inner = rest[len("model.") :]
            return f"model.language_model.{inner}" if hf_style == "memory" else f"language_model.model.{inner}"
    return None


@dataclass
class KeyMap:
    """How the keys of one source map onto ours.

    Attributes:
        mapped: source key -> our key.
        ignored: source key -> why it is knowingly not loaded.
        unknown: source keys no rule of the layout covers (an error under strict loading).
    """

    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def map_keys(keys: Iterable[str], layout: Layout, *, tower: Tower | None = None) -> KeyMap:
    """Classify every source key of `layout`: mapped to ours, knowingly ignored, or unknown."""
    result = KeyMap()
    for key in keys:
        reason = ignored_reason(key, layout)
        if reason is not None:
            result.ignored[key] = reason
            continue
        target = to_ours(key, layout, tower=tower)
        if target is None:
            result.unknown.append(key)
        else:
            result.mapped[key] = target
    return result


def convert_from_ours(
    state_dict: Mapping[str, _K],
    layout: Layout,
    *,
    tower: Tower | None = None,
    hf_style: Literal["disk", "memory"] = "disk",
    hf_vision_model_prefix: bool = True,
    skip_unrepresentable: bool = False,
) -> dict[str, _K]:
    """Rename our state dict into `layout`, keeping only the keys that layout holds.

    Keys outside the layout's scope (towers for ``llm``, everything but the projector for
    ``mm_adapter``, the other tower for ``languagebind``) are left out by design. Keys the layout is
    meant to hold but cannot express (temporal attention or a deeper projector in ``hf``) raise,
    unless `skip_unrepresentable` says dropping them is intended.
    """
    out: dict[str, _K] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        target = from_ours(
            key, layout, tower=tower, hf_style=hf_style, hf_vision_model_prefix=hf_vision_model_prefix
        )
        if target is None:
            if layout == "hf" and key.startswith(("image_tower.", "video_tower.", "mm_projector.")):
                dropped.append(key)
            continue
        if target in out:
            raise ValueError(f"two keys map to {target!r} in layout {layout!r} (second: {key!r})")
        out[target] = value
    if dropped and not skip_unrepresentable:
        raise ValueError(
            f"the {layout!r} layout cannot hold {len(dropped)} of these weights "
            f"(first: {', '.join(dropped[:3])}); pass skip_unrepresentable=True to drop them"
        )
    return out


def part_of(our_key: str) -> str:
    """The model part an our-layout key belongs to, for reports and parameter counts.

    One of ``video_tower.temporal``, ``video_tower``, ``image_tower``, ``mm_projector``,
    ``language_model``, ``other``.
    """
    if _TEMPORAL.match(our_key):
        return "video_tower.temporal"
    for prefix in ("video_tower", "image_tower", "mm_projector", "language_model"):
        if our_key.startswith(prefix + "."):
            return prefix
    return "other"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
