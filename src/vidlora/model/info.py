"""Parameter counts per part, and what trains under the LoRA recipe (`vidlora info` prints them).

Counts come from the module structure only, so ``videollava-7b`` is counted on the meta device in
seconds. LoRA parameters are counted analytically, r * (in + out) for every target linear layer
(`lora.lora_target_module_names`), which is exactly what PEFT adds with ``bias="none"``
(tests check the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vidlora.model import keymaps
from vidlora.model.lora import is_lora_name, lora_target_module_names, strip_peft_prefix

PARTS = ("video_tower", "video_tower.temporal", "image_tower", "mm_projector", "language_model")
_LABELS = {
    "video_tower": "video tower (spatial)",
    "video_tower.temporal": "video tower (temporal)",
    "image_tower": "image tower",
    "mm_projector": "projector",
    "language_model": "LLM",
    "lora": "LoRA adapters",
}


@dataclass
class ParameterCounts:
    """Parameters per part and the trainable/frozen split under the recipe.

    Attributes:
        parts: part -> parameters (tied weights counted once). ``video_tower`` excludes the temporal
            layers, which ``video_tower.temporal`` counts.
        lora: parameters LoRA adds (0 without LoRA).
        lora_r: the rank counted, or None.
        trainable: projector + LoRA (with LoRA), or projector + LLM (without).
        frozen: towers (+ LLM with LoRA).
    """

    parts: dict[str, int] = field(default_factory=dict)
    lora: int = 0
    lora_r: int | None = None
    trainable: int = 0
    frozen: int = 0

    @property
    def base_total(self) -> int:
        """All parameters of the model without LoRA."""
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        """All parameters including LoRA."""
        return self.base_total + self.lora


def lora_parameter_count(model: nn.Module, r: int) -> int:
    """Parameters LoRA of rank `r` adds to `model`: r * (in + out) per target linear (no bias)."""
    total = 0
    for name in lora_target_module_names(model):
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)  # lora_target_module_names lists nn.Linear modules only
        total += r * (linear.in_features + linear.out_features)
    return total


def _numel(param: nn.Parameter) -> int:
    """Logical element count: bitsandbytes packs two 4-bit weights per byte (as transformers'
    ``num_parameters`` counts them)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2
    return param.numel()


def count_parameters(
    model: nn.Module, lora_r: int | None = None, *, from_flags: bool = False
) -> ParameterCounts:
    """Count `model`'s parameters per part and split them as the recipe trains them.

    The recipe (`lora.apply_recipe`): towers frozen, projector trained, LLM under LoRA of rank
    `lora_r` (frozen base), or trained in full when `lora_r` is None. Works on meta-device models.
    A model that already carries PEFT LoRA layers (a `PeftModel` or its injected base) is counted as
    it is: its LoRA parameters are the ``lora`` part and `lora_r` is not needed.
    With `from_flags`, trainable/frozen are read from the parameters' ``requires_grad`` instead of the
    recipe (for a model already prepared for training, e.g. with ``--freeze_mm_mlp_adapter``).
    """
    counts = ParameterCounts(parts=dict.fromkeys(PARTS, 0), lora_r=lora_r)
    injected = 0
    flagged = 0
    for name, param in model.named_parameters():  # named_parameters drops tied duplicates
        flagged += _numel(param) if param.requires_grad else 0
        name = strip_peft_prefix(name)
        if is_lora_name(name):
            injected += _numel(param)
            continue
        part = keymaps.part_of(name.replace(".base_layer.", "."))
        if part == "other":
            raise ValueError(f"parameter {name!r} belongs to no known part of a VideoLlavaForCausalLM")
        counts.parts[part] += _numel(param)
    if injected:
        counts.lora = injected
    elif lora_r is not None:
        counts.lora = lora_parameter_count(model, lora_r)
    with_lora = counts.lora > 0
    llm = counts.parts["language_model"]
    towers = counts.parts["video_tower"] + counts.parts["video_tower.temporal"] + counts.parts["image_tower"]
    counts.trainable = counts.parts["mm_projector"] + (counts.lora if with_lora else llm)
    counts.frozen = towers + (llm if with_lora else 0)
    if from_flags:
        counts.trainable = flagged
        counts.frozen = counts.base_total + injected - flagged
    return counts


def format_counts(counts: ParameterCounts, title: str = "") -> str:
    """A table for people: parameters per part, trainable vs frozen."""
    rows = [(_LABELS[p], counts.parts[p]) for p in PARTS]
    if counts.lora:
        rank = f" (r={counts.lora_r})" if counts.lora_r is not None else ""
        rows.append((f"{_LABELS['lora']}{rank}", counts.lora))
    width = max(len(label) for label, _ in rows)
    lines = [title] if title else []
    lines += [f"{label:<{width}}  {n:>15,}" for label, n in rows]
    total = counts.total
    lines.append("-" * (width + 17))
    lines.append(f"{'total':<{width}}  {total:>15,}")
    lines.append(f"{'trainable':<{width}}  {counts.trainable:>15,}  ({100 * counts.trainable / total:.2f}%)")
    lines.append(f"{'frozen':<{width}}  {counts.frozen:>15,}")
    return "\n".join(lines)
