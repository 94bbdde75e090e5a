"""Checkpoint key maps: one table per layout, applied in both directions.

Our model (`VideoLlavaForCausalLM`) names its weights ``language_model.model.*`` /
``language_model.lm_head.*`` (an AutoModelForCausalLM), ``image_tower.*`` / ``video_tower.*``
(LanguageBind's ``vision_model.*`` keys minus that prefix) and ``mm_projector.*``
(``mm_projector.0`` / ``.2`` for ``mlp2x_gelu``). Each layout is a list of :class:`Rule` s, an
our-prefix <-> their-prefix pair; reading a key applies the first rule one of whose spellings it
starts with, writing applies the first rule whose our-prefix it starts with. The same rows serve
both directions, so the two cannot drift apart (torchtune inverts one dict for the same reason).

Layouts (checked against PKU-YuanGroup/Video-LLaVA ``llava_arch.py``, transformers
``convert_video_llava_weights_to_hf.py`` and its ``video_llava`` conversion mapping):

``original``      Video-LLaVA's ``LlavaLlamaForCausalLM``: ``model.*``, ``lm_head.*``,
                  ``model.mm_projector.*``, embedded towers ``model.{image,video}_tower.{image,video}_tower.*``.
``hf``            transformers' port, written as the hub's ``-hf`` repos hold it (the converter's
                  names: ``language_model.model.*``, ``{image,video}_tower.vision_model.*``,
                  ``multi_modal_projector.linear_{1,2}.*``); read also in transformers' in-memory
                  names (``model.language_model.*``, ``lm_head.*``) and without ``vision_model.``
                  (transformers 5 saves them so). It has no temporal attention and a two-linear projector.
``llm``           a plain causal LM (LLaMA/Vicuna): ours are ``language_model.`` + its keys.
``languagebind``  a LanguageBind tower (a CLIP model): ``vision_model.*`` is the tower; the CLIP
                  text side is knowingly ignored.
``mm_adapter``    a ``--pretrain_mm_mlp_adapter`` file: like the original, any key containing
                  ``mm_projector.`` is the projector (``get_w`` keeps what follows it).
``ours``          our own names (a merged vidlora checkpoint).

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

# A CLIP vision transformer's own sub-modules: a bare tower key starts with one of these.
_VISION_ROOTS = re.compile(r"(?:embeddings|pre_layrnorm|encoder|post_layernorm)\.")
_TEMPORAL = re.compile(r"^video_tower\.encoder\.layers\.\d+\.temporal_")

# Keys that are not weights: buffers recomputed at construction. Ignored in every layout.
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


@dataclass(frozen=True)
class Rule:
    """Our prefix <-> a layout's prefix.

    Attributes:
        ours: our key prefix.
        theirs: the layout's prefix, the one written.
        also_read: other spellings of the same prefix that reading accepts.
        rest: what follows the prefix must start with this (tells a bare tower key from others).
        anywhere: their prefix may follow any dotted prefix (``mm_adapter``: ``*.mm_projector.``).
        read_only: never used for writing (another spelling of a weight another rule writes).
        cannot_hold: our keys under ``ours`` that the layout has no place for (-hf: temporal layers).
    """

    ours: str
    theirs: str
    also_read: tuple[str, ...] = ()
    rest: re.Pattern[str] | None = None
    anywhere: bool = False
    read_only: bool = False
    cannot_hold: re.Pattern[str] | None = None


RULES: Mapping[str, tuple[Rule, ...]] = {
    "ours": (Rule("", ""),),
    "original": (
        Rule("image_tower.", "model.image_tower.image_tower."),
        Rule("video_tower.", "model.video_tower.video_tower."),
        Rule("mm_projector.", "model.mm_projector."),
        Rule("language_model.model.", "model."),
        Rule("language_model.lm_head.", "lm_head."),
    ),
    "hf": (
        Rule(
            "image_tower.",
            "image_tower.vision_model.",
            ("model.image_tower.vision_model.", "image_tower.", "model.image_tower."),
            rest=_VISION_ROOTS,
        ),
        Rule(
            "video_tower.",
            "video_tower.vision_model.",
            ("model.video_tower.vision_model.", "video_tower.", "model.video_tower."),
            rest=_VISION_ROOTS,
            cannot_hold=_TEMPORAL,
        ),
        Rule(
            "mm_projector.0.", "multi_modal_projector.linear_1.", ("model.multi_modal_projector.linear_1.",)
        ),
        Rule(
            "mm_projector.2.", "multi_modal_projector.linear_2.", ("model.multi_modal_projector.linear_2.",)
        ),
        Rule("language_model.model.", "language_model.model.", ("model.language_model.",)),
        Rule("language_model.lm_head.", "language_model.lm_head.", ("lm_head.",)),
    ),
    "llm": (Rule("language_model.", ""),),
    "mm_adapter": (
        Rule("mm_projector.", "model.mm_projector.", ("mm_projector.",), anywhere=True),
        Rule("mm_projector.0.", "multi_modal_projector.linear_1.", anywhere=True, read_only=True),
        Rule("mm_projector.2.", "multi_modal_projector.linear_2.", anywhere=True, read_only=True),
    ),
}
# A LanguageBind file holds one tower; which one is the caller's to say.
_LANGUAGEBIND_RULES: Mapping[str, Rule] = {
    tower: Rule(f"{tower}.", "vision_model.", ("",), rest=_VISION_ROOTS) for tower in TOWERS
}

_K = TypeVar("_K")


def _rules(layout: str, tower: str | None) -> tuple[Rule, ...]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout != "languagebind":
        return RULES[layout]
    if tower not in TOWERS:
        raise ValueError(f"the languagebind layout needs tower='image_tower' or 'video_tower', got {tower!r}")
    return (_LANGUAGEBIND_RULES[tower],)


def _after(key: str, prefix: str, anywhere: bool) -> str | None:
    """What follows ``prefix`` in ``key`` (at the start, or after any ``x.`` when ``anywhere``)."""
    if key.startswith(prefix):
        return key[len(prefix) :]
    if anywhere and prefix:
        at = key.find("." + prefix)
        return key[at + 1 + len(prefix) :] if at >= 0 else None
    return None


def ignored_reason(key: str, layout: Layout) -> str | None:
    """Why a source key is knowingly not loaded, or None if it is a weight that must be placed.

    Buffers (rotary ``inv_freq``, CLIP ``position_ids``) are ignored in every layout; the CLIP text
    side only in a LanguageBind tower checkpoint (elsewhere it would be an unknown weight).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    reasons = _BUFFER_REASONS + (_CLIP_TEXT_REASONS if layout == "languagebind" else ())
    return next((reason for pattern, reason in reasons if pattern.search(key)), None)


def to_ours(key: str, layout: Layout, *, tower: Tower | None = None) -> str | None:
    """Our name for a source key of ``layout``, or None when no rule of the layout covers it.

    ``tower`` is required for ``languagebind`` (one file layout serves both towers). Ignored keys
    (:func:`ignored_reason`) should be filtered first; this maps names only.
    """
    for rule in _rules(layout, tower):
        for spelling in (rule.theirs, *rule.also_read):
            rest = _after(key, spelling, rule.anywhere)
            if rest is not None and (rule.rest is None or rule.rest.match(rest)):
                return rule.ours + rest
    return None


def from_ours(key: str, layout: Layout, *, tower: Tower | None = None) -> str | None:
    """The name of our ``key`` in ``layout``, or None when that layout does not hold this weight.

    None means another file holds it (an LLM checkpoint has no towers, a tower checkpoint one
    tower, an adapter file only the projector), or the layout cannot express it (the ``hf`` layout
    has no temporal attention and only a two-linear projector); :func:`convert_from_ours` tells
    the two apart.
    """
    for rule in _rules(layout, tower):
        if rule.read_only or not key.startswith(rule.ours):
            continue
        rest = key[len(rule.ours) :]
        if rule.cannot_hold is not None and rule.cannot_hold.match(key):
            return None
        if rule.rest is None or rule.rest.match(rest):
            return rule.theirs + rest
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
    """Classify every source key of ``layout``: mapped to ours, knowingly ignored, or unknown."""
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
    skip_unrepresentable: bool = False,
) -> dict[str, _K]:
    """Rename our state dict into ``layout``, keeping only the keys that layout holds.

    Keys outside the layout's scope (towers for ``llm``, everything but the projector for
    ``mm_adapter``, the other tower for ``languagebind``) are left out by design. Keys the ``hf``
    layout is meant to hold but cannot express (temporal attention, a deeper projector) raise,
    unless ``skip_unrepresentable`` says dropping them is intended.
    """
    out: dict[str, _K] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        target = from_ours(key, layout, tower=tower)
        if target is None:
            if layout == "hf" and part_of(key) != "language_model":
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
    """The model part of one of our keys, for reports and parameter counts.

    One of ``video_tower.temporal``, ``video_tower``, ``image_tower``, ``mm_projector``,
    ``language_model``, ``other``.
    """
    if _TEMPORAL.match(our_key):
        return "video_tower.temporal"
    for prefix in ("video_tower", "image_tower", "mm_projector", "language_model"):
        if our_key.startswith(prefix + "."):
            return prefix
    return "other"
