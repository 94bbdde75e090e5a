"""QLoRA: quantize the language model only (``--bits 4`` or ``--bits 8``), then prepare it for
k-bit training.

The original Video-LLaVA quantizes at load time (``from_pretrained(quantization_config=
BitsAndBytesConfig(..., llm_int8_skip_modules=["mm_projector"]))``), before its towers exist. Our
loader assembles the model from several checkpoints, so quantization happens afterwards, on the
weights already loaded: every ``nn.Linear`` of ``language_model`` except ``lm_head`` (exactly the
modules that get LoRA, `lora_target_module_names`) becomes a bitsandbytes ``Linear4bit`` or
``Linear8bitLt`` holding those weights. Towers, projector, embeddings, norms and ``lm_head`` stay
in full precision.

Why not transformers' ``replace_with_bnb_linear``: it builds empty modules on the meta device that
only transformers' own ``from_pretrained`` conversion ops know how to fill (they copy private
attributes of the meta ``Params4bit``). Swapping with bitsandbytes' public constructors is as short
and does not depend on that loading protocol.

Why not peft's ``prepare_model_for_kbit_training`` on the whole model: it would cast the towers and
projector to float32 too (the original keeps them in the training precision) and its
checkpointing branch keys on ``from_pretrained``'s attributes. It is applied to the language model
alone; the input-gradient hook is set on the composite model, whose embedding output is what the
first checkpointed LLM layer receives (transformers 5's ``activation_checkpointing_enable`` sets the
same hook; setting it here keeps this function equivalent to peft's on its own).

Quantized layers are frozen bitsandbytes parameters: DeepSpeed ZeRO-3 must not partition them (use
ZeRO-2 or no DeepSpeed with ``--bits``, as the original's QLoRA scripts do).
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from vidlora.model.lora import lora_target_module_names

QUANT_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
# The original's BitsAndBytesConfig default (LLM.int8(): outlier columns above 6.0 stay in fp16).
INT8_THRESHOLD = 6.0
_INSTALL_HINT = "pip install 'vidlora[qlora]'"

_Model = TypeVar("_Model", bound=PreTrainedModel)


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"--bits 4/8 (QLoRA) needs bitsandbytes, which is not installed: {_INSTALL_HINT}"
        ) from err
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (False when bitsandbytes is absent)."""
    try:
        bnb = _import_bnb()
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _quantized_linear(
    linear: nn.Linear,
    bits: int,
    compute_dtype: torch.dtype,
    double_quant: bool,
    quant_type: str,
    device: torch.device,
) -> nn.Linear:
    """A bitsandbytes copy of `linear` on `device`, its weight quantized from `linear`'s values."""
    bnb = _import_bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    # Built on the meta device so no random weight is allocated; the real parameters follow.
    with torch.device("meta"):
        if bits == 4:
            new = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                compress_statistics=double_quant, quant_type=quant_type,
            )  # fmt: skip
        else:
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=has_bias,
                has_fp16_weights=False, threshold=INT8_THRESHOLD,
            )  # fmt: skip
    if bits == 4:
        param = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type, module=new
        )
        # Params4bit quantizes when it is moved to a real device (and tells `module` its quant state).
        new.weight = param.to(device)
    else:
        # Int8Params quantizes only on a move that starts on the CPU.
        new.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return new


def quantize_language_model(
    model: _Model,
    bits: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_type: str = "nf4",
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> _Model:
    """Quantize `model.language_model`'s linear layers (not `lm_head`) in place and prepare k-bit training.

    Args:
        model: a `VideoLlavaForCausalLM` with its weights loaded, before LoRA is applied.
        bits: 4 (QLoRA, `Linear4bit`) or 8 (LLM.int8(), `Linear8bitLt`, outlier threshold 6.0).
        compute_dtype: dtype of the 4-bit matmuls (`--bf16` -> bfloat16); unused for 8 bits.
        double_quant: 4 bits: also quantize the quantization constants (`--double_quant`).
        quant_type: 4 bits: "nf4" or "fp4" (`--quant_type`).
        gradient_checkpointing: make the input embeddings' output require grad, so re-entrant
            checkpointing of the frozen LLM still passes gradients to the adapters.
        device: where the quantized layers go; quantization runs there. Pass the training device
            (`TrainingArguments.device`) on a GPU: quantizing there is fast, and a 4-bit weight that
            was quantized on the CPU and then used for CPU inference is repacked into a CPU-only
            layout that a later `.to("cuda")` does not undo. None: where each weight is now.

    Returns:
        `model` itself: LLM linears quantized and frozen, the LLM's remaining 16-bit parameters
        (embeddings, norms, `lm_head`) in float32 as peft's `prepare_model_for_kbit_training` does,
        towers and projector untouched; `is_loaded_in_4bit`/`is_loaded_in_8bit` set so that PEFT
        wraps the layers with its bitsandbytes LoRA layers.

    Raises:
        ValueError: `bits` not 4 or 8, unknown `quant_type`, no `language_model`, or a language model
            that is already quantized or already carries LoRA.
        ImportError: bitsandbytes is not installed (with the install command).
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be 4 or 8 to quantize the language model, got {bits!r}")
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    _import_bnb()
    from peft import prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        llm = model.get_submodule("language_model")
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no language_model to quantize") from err
    for name, module in llm.named_modules():
        if is_quantized_linear(module):
            raise ValueError(f"language_model.{name} is already quantized; quantize the model once")
        if isinstance(module, BaseTunerLayer):
            raise ValueError(f"language_model.{name} already carries LoRA; quantize before applying LoRA")

    target = torch.device(device) if device is not None else None
    for name in lora_target_module_names(model):
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)  # lora_target_module_names lists nn.Linear modules only
        where = target if target is not None else linear.weight.device
        model.set_submodule(
            name, _quantized_linear(linear, bits, compute_dtype, double_quant, quant_type, where)
        )

    # PEFT picks its bitsandbytes LoRA layers (lora.bnb.Linear4bit / Linear8bitLt: merge and unmerge
    # dequantize) only when the model it wraps says so; from_pretrained sets the same attributes.
    for part in (model, llm):
        for attr, value in (("is_loaded_in_4bit", bits == 4), ("is_loaded_in_8bit", bits == 8)):
            setattr(part, attr, value)  # plain attributes (nn.Module's __setattr__ is typed for tensors)

    # On the LLM alone: freezes it and casts its fp16/bf16 parameters (norms, embeddings, lm_head)
    # to float32 for stable training; checkpointing is left to the Trainer.
    prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model
