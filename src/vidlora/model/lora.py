"""What trains, and the one source of LoRA targets and PEFT's naming.

Towers frozen, projector fully trained, LoRA on every linear layer of the LLM (or the ones
``--lora_target`` names; DoRA and rsLoRA are PEFT's, switched on in the config). The original
Video-LLaVA (`find_all_linear_names`) puts LoRA on every ``nn.Linear`` except ``lm_head`` and skips
anything whose name contains ``mm_projector`` or a tower. A plain list of leaf names (``q_proj``,
``k_proj`` ...) is not enough here: PEFT matches a list entry against the *end* of a module path, and
CLIP's attention in both towers uses ``q_proj``/``k_proj``/``v_proj`` too. So the target is a regex
that PEFT matches against the *whole* path, anchored at ``language_model.`` and built from the
model itself (:func:`lora_target_modules`): training, QLoRA (which quantizes exactly these
modules) and the original's legacy adapters all target the same modules, for any LLM.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from torch import nn

from vidlora.errors import UsageError
from vidlora.quiet import quiet_imports

if TYPE_CHECKING:  # peft (and bitsandbytes under it) takes seconds to import; `vidlora info` never needs it
    from peft import LoraConfig, PeftModel

LLM_PREFIX = "language_model."
#: PEFT's prefix of the wrapped model's parameter names, and the marker of its adapter weights.
PEFT_PREFIX = "base_model.model."
LORA_MARKER = "lora_"
# The output head stays a plain linear layer in the original (and in PEFT's own defaults).
_EXCLUDED_LEAVES = frozenset({"lm_head"})
#: ``--lora_target``'s default: every linear layer of the LLM but ``lm_head`` (the original's choice).
ALL_LINEAR = "all-linear"
#: PEFT's `LoraConfig.bias` values (`--lora_bias`).
LoraBias = Literal["none", "all", "lora_only"]


def lora_target_module_names(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Full paths of the modules that get LoRA: every `nn.Linear` under `language_model` but `lm_head`,
    or those of them whose leaf name is in ``targets`` (None or ``[ALL_LINEAR]``: all of them).

    Raises:
        UsageError: a target that is no linear layer of the LLM (the valid names are listed; one
            that exists only in a tower or the projector is refused saying why).
    """
    names = []
    outside: set[str] = set()
    for name, module in model.named_modules():
        if f".{LORA_MARKER}" in name:
            raise ValueError(f"the model already has LoRA layers ({name}); pass the base model")
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if not name.startswith(LLM_PREFIX):
            outside.add(leaf)
        elif leaf not in _EXCLUDED_LEAVES:
            names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear under {LLM_PREFIX!r}: is this a VideoLlavaForCausalLM?")
    if targets is None or list(targets) == [ALL_LINEAR]:
        return names
    valid = sorted({name.rsplit(".", 1)[-1] for name in names})
    problems = []
    for target in targets:
        if target in valid:
            continue
        if target in outside:
            problems.append(
                f"{target!r} is a layer of the towers or the projector only: the towers stay frozen and the "
                "projector trains in full, so LoRA goes on the LLM alone"
            )
        else:
            problems.append(f"{target!r} is not a linear layer of the LLM")
    if problems:
        raise UsageError(
            f"--lora_target {' '.join(targets)}: {'; '.join(problems)}. Valid names: {', '.join(valid)} "
            f"(or {ALL_LINEAR})"
        )
    return [name for name in names if name.rsplit(".", 1)[-1] in targets]


def lora_target_modules(model: nn.Module, targets: Sequence[str] | None = None) -> str:
    """A PEFT `target_modules` regex (full match) selecting exactly `lora_target_module_names(model, targets)`.

    Written as "``language_model.`` + any path + one of the LLM's linear leaf names", so that it stays
    short in ``adapter_config.json`` and applies to any model of the same architecture; the function
    checks that it selects exactly the intended modules of this one.
    """
    names = lora_target_module_names(model, targets)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    pattern = rf"^{re.escape(LLM_PREFIX)}(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})$"
    compiled = re.compile(pattern)
    selected = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and compiled.fullmatch(name)
    ]
    if selected != names:
        extra = sorted(set(selected) - set(names))
        raise ValueError(f"LoRA target regex {pattern!r} would also select {extra[:5]}; refusing")
    return pattern


def build_lora_config(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float = 0.05,
    bias: LoraBias = "none",
    *,
    targets: Sequence[str] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
) -> LoraConfig:
    """The original recipe's LoRA config (task CAUSAL_LM) on ``model``'s LLM (:func:`lora_target_modules`);
    PEFT saves every setting in ``adapter_config.json``, which is what inference and merge read back."""
    with quiet_imports():
        from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"lora_r must be positive, got {r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=lora_target_modules(model, targets),
        task_type="CAUSAL_LM",
        use_dora=use_dora,
        use_rslora=use_rslora,
    )


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` when wrapping a model;
    the FutureWarning it triggers is PEFT's to fix and says nothing to a vidlora user."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def strip_peft_prefix(name: str) -> str:
    """``base_model.model.mm_projector.0.weight`` -> ``mm_projector.0.weight``."""
    return name.removeprefix(PEFT_PREFIX)


def is_lora_name(name: str) -> bool:
    """Whether a parameter name is one of PEFT's adapter weights."""
    return LORA_MARKER in name


def peft_adapter_key(module: str, matrix: str) -> str:
    """The key PEFT saves an adapter matrix under: ``base_model.model.<module>.lora_<A|B>.weight``."""
    return f"{PEFT_PREFIX}{module}.{LORA_MARKER}{matrix}.weight"


def apply_recipe(model: nn.Module, lora_config: LoraConfig | None, *, train_llm: bool = True) -> nn.Module:
    """Declare what trains, in one place.

    Towers: frozen. Projector: fully trainable. LLM: LoRA adapters only when `lora_config` is given
    (the result is then a `PeftModel`; its base weights are frozen), otherwise trained in full (the
    original's non-LoRA run) unless `train_llm` is False (``--freeze_backbone`` /
    ``--tune_mm_mlp_adapter``: the LLM stays frozen and only the projector trains).
    Returns the model to train (the input itself when there is no LoRA).
    """
    for part in ("image_tower", "video_tower"):
        tower = getattr(model, part, None)
        if tower is not None:
            tower.requires_grad_(False)
    llm = model.get_submodule("language_model")
    projector = model.get_submodule("mm_projector")
    if lora_config is None:
        llm.requires_grad_(train_llm)
        projector.requires_grad_(True)
        return model
    with quiet_imports():
        from peft import get_peft_model

    with quiet_peft():
        peft_model: PeftModel = get_peft_model(model, lora_config)
    # get_peft_model froze every base weight; the projector is trained in full, as in the original.
    projector.requires_grad_(True)
    return peft_model
