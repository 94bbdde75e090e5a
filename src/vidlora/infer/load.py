"""Load anything `vidlora train` (or the original Video-LLaVA) wrote, for inference.

`--model_path` may be:

* a vidlora LoRA output — the final directory or any ``checkpoint-N`` (:mod:`vidlora.checkpoint`);
  its base is rebuilt from the run record (the base model, its towers, the feature layer and
  frames it trained with), or from ``--model_base`` when given;
* a legacy original output (``adapter_model.bin`` + ``non_lora_trainables.bin``, read with
  ``torch.load(weights_only=True)``, memory-mapped), whose keys use the original layout;
* a merged model or a base model in any layout `load_pretrained` reads.

Nothing depends on folder names: the files present decide. The processor comes from the run
record when there is one (checked against the loaded model), else from the model itself, so
inference sees exactly what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidlora.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LEGACY_ADAPTER,
    LEGACY_NON_LORA,
    NON_LORA_FILE,
    RECORD_FILE,
    RunRecord,
    is_adapter_dir,
    load_trainables,
    read_record,
)
from vidlora.data.processor import Processor
from vidlora.errors import NotFoundError, UsageError
from vidlora.jsonl import read_json_object
from vidlora.model import keymaps
from vidlora.model.hub import keys_of, read_config, read_tensors, resolve_directory
from vidlora.model.loading import PRESETS, declared_dtype, grow_embeddings, load_pretrained
from vidlora.model.lora import build_lora_config, peft_adapter_key, quiet_peft, strip_peft_prefix
from vidlora.model.modeling import register_auto_classes
from vidlora.model.safetensors_check import check_safetensors
from vidlora.model.tokenizer import load_tokenizer
from vidlora.quiet import quiet_imports


@dataclass
class InferenceModel:
    """A model ready for generation, its tokenizer and the processor it was trained with."""

    model: Any  # VideoLlavaForCausalLM, or a PeftModel around it (an adapter not merged)
    tokenizer: Any
    processor: Processor
    description: str


def load_base(
    model_path: str,
    model_base: str | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str = "cpu",
    strict: bool = True,
    cache_dir: str | None = None,
) -> InferenceModel:
    """The model ``model_path`` holds — for a LoRA checkpoint, its base rebuilt as trained, without
    the adapter — with the checkpoint's tokenizer and processor. ``device="meta"`` reads no weights.
    """
    # vidlora checkpoint dirs carry our config.json: let the Auto classes (AutoTokenizer reads it) know it.
    register_auto_classes()
    path = Path(model_path)
    record = read_record(path) if path.is_dir() else None
    options: dict[str, Any] = {"torch_dtype": torch_dtype, "device": device, "strict": strict}
    if not (path.is_dir() and is_adapter_dir(path)):
        loaded = load_pretrained(model_path, cache_dir=cache_dir, **options)
        processor = _processor(record, loaded.model.config)
        return InferenceModel(
            loaded.model, loaded.tokenizer, processor, f"model {model_path} ({loaded.report.layout})"
        )
    if record is None and (path / NON_LORA_FILE).is_file():
        raise UsageError(
            f"{path} holds vidlora's trained tensors but no {RECORD_FILE} (was its save interrupted?), so "
            "the settings it was trained with are unknown: use an earlier checkpoint"
        )
    base_name = model_base or (record.base.model_name_or_path if record is not None else None)
    if not base_name:
        raise UsageError(
            f"{path} is a LoRA adapter without a recorded base model: pass --model_base (the model it was trained on)"
        )
    base_kwargs = record.base.load_kwargs() if record is not None else {}
    if holds_projector(path):
        # The checkpoint's own projector replaces the pre-trained one: that file is not needed.
        base_kwargs["pretrain_mm_mlp_adapter"] = None
    if cache_dir is not None:
        base_kwargs["cache_dir"] = cache_dir
    loaded = load_pretrained(
        base_name, overrides=record.config_overrides if record else None, **base_kwargs, **options
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    if (path / "tokenizer_config.json").is_file():
        absent_legacy = record.absent_legacy if record is not None else True
        tokenizer = load_tokenizer(path, text_config=model.config.text_config, absent_legacy=absent_legacy)
        # Grow only: a vocabulary padded past the tokenizer (the -hf port's 32064 rows) stays as trained.
        grow_embeddings(model, len(tokenizer))
    processor = _processor(record, model.config)
    return InferenceModel(model, tokenizer, processor, f"adapter {path} on base {base_name}")


def load_for_inference(
    model_path: str,
    model_base: str | None = None,
    *,
    merge: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: str = "cpu",
    strict: bool = True,
    cache_dir: str | None = None,
) -> InferenceModel:
    """Load a checkpoint for generation (see the module docstring for what ``model_path`` may be).

    Args:
        model_path: a checkpoint directory, a merged/base model directory, a hub id or a preset.
        model_base: the base of a LoRA checkpoint, instead of the recorded one.
        merge: fold the adapter into the weights (`merge_and_unload`).
        torch_dtype / device / strict: as for `load_pretrained`.
        cache_dir: hub cache for the base (default: the one recorded at training, else the hub's).
    """
    loaded = load_base(
        model_path, model_base, torch_dtype=torch_dtype, device=device, strict=strict, cache_dir=cache_dir
    )
    path = Path(model_path)
    if not (path.is_dir() and is_adapter_dir(path)):
        return loaded
    model = loaded.model
    if (path / NON_LORA_FILE).is_file() or (path / ADAPTER_WEIGHTS).is_file():
        with quiet_imports():
            from peft import PeftModel

        load_trainables(model, path / NON_LORA_FILE)
        if (path / ADAPTER_WEIGHTS).is_file():
            check_safetensors(path / ADAPTER_WEIGHTS)  # PEFT reads it next, unchecked
        with quiet_peft():
            model = PeftModel.from_pretrained(model, str(path))
        kind = "vidlora adapter"
    elif (path / LEGACY_ADAPTER).is_file():
        model = _load_legacy(model, path)
        kind = "legacy Video-LLaVA adapter"
    else:
        raise NotFoundError(
            f"{path}: {ADAPTER_CONFIG} but no adapter weights ({ADAPTER_WEIGHTS} or {LEGACY_ADAPTER})"
        )
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return InferenceModel(
        model, loaded.tokenizer, loaded.processor, loaded.description.replace("adapter", kind, 1)
    )


def load_for_inference_on(
    model_path: str,
    model_base: str | None = None,
    *,
    device: str,
    dtype: str,
    cache_dir: str | None = None,
) -> InferenceModel:
    """:func:`load_for_inference` placed by the ``--device``/``--dtype`` flags' one rule
    (:func:`~vidlora.infer.device.detect_placement`): the GPU and bf16 when there is one."""
    from vidlora.infer.device import detect_placement

    placement = detect_placement(device, dtype, purpose="inference")
    return load_for_inference(
        model_path, model_base, cache_dir=cache_dir, torch_dtype=placement.dtype, device=str(placement.device)
    )


def checkpoint_dtype(
    model_path: str, model_base: str | None = None, *, cache_dir: str | None = None
) -> torch.dtype | None:
    """The dtype the weights behind ``model_path`` are stored in, as their config declares it.

    For a LoRA checkpoint that is its base's (``model_base``, else the recorded one); None for a
    preset or a config that declares none. Reads config files only, no weights.
    """
    path = Path(model_path)
    name = model_path
    if path.is_dir() and is_adapter_dir(path):
        record = read_record(path)
        name = model_base or (record.base.model_name_or_path if record is not None else "")
        if cache_dir is None and record is not None:
            cache_dir = record.base.cache_dir
        if not name:
            return None  # load_base says what is missing
    if name in PRESETS:
        return None
    return declared_dtype(read_config(resolve_directory(name, cache_dir=cache_dir, weights=False)))


def holds_projector(path: Path) -> bool:
    """Whether a checkpoint's non-LoRA trainables include the projector (they replace any other)."""
    file = path / NON_LORA_FILE
    return file.is_file() and any(key.startswith("mm_projector.") for key in keys_of([file]))


def _processor(record: RunRecord | None, config: Any) -> Processor:
    """The recorded processor (checked against the model), else the model's own with default data settings."""
    if record is not None:
        return record.processor_for(config)
    return Processor.for_model(config)


def _legacy_key_to_ours(key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.weight`` -> our (unprefixed) key."""
    ours = keymaps.to_ours(strip_peft_prefix(key), "original")
    if ours is None:
        raise UsageError(f"legacy checkpoint key {key!r} has no counterpart in this model")
    return ours


def _load_legacy(model: torch.nn.Module, path: Path):
    """The original's outputs: pickled adapter + projector, read with weights_only=True.

    Its adapter_config lists leaf names (``q_proj`` …) that would also hit the towers' attention
    here, so the LoRA config is rebuilt with our LLM-only targets and the original's r/alpha.
    """
    with quiet_imports():
        from peft import PeftModel, set_peft_model_state_dict

    legacy_config = read_json_object(path / ADAPTER_CONFIG)
    non_lora_path = path / LEGACY_NON_LORA
    if non_lora_path.is_file():
        projector = read_tensors(non_lora_path)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in projector.items():
                ours = _legacy_key_to_ours(key)
                if ours not in params:
                    raise UsageError(f"{non_lora_path}: {key} -> {ours} is not a parameter of the model")
                params[ours].copy_(tensor.to(params[ours].dtype))
    lora_config = build_lora_config(
        model,
        int(legacy_config.get("r", 8)),
        int(legacy_config.get("lora_alpha", 16)),
        float(legacy_config.get("lora_dropout", 0.0)),
        legacy_config.get("bias", "none"),
    )
    with quiet_peft():
        peft_model = PeftModel(model, lora_config)
    adapter = read_tensors(path / LEGACY_ADAPTER)
    renamed = {}
    for key, tensor in adapter.items():
        matrix = "A" if ".lora_A." in key else "B"
        module = _legacy_key_to_ours(key.replace(f".lora_{matrix}.weight", ".weight")).removesuffix(".weight")
        renamed[peft_adapter_key(module, matrix)] = tensor
    result = set_peft_model_state_dict(peft_model, renamed)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UsageError(f"{path / LEGACY_ADAPTER}: tensors with no place in the model: {unexpected[:5]}")
    return peft_model
