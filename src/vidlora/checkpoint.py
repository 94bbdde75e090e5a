"""The on-disk format of a vidlora checkpoint: this module alone writes and reads it.

Every ``checkpoint-N`` directory (and the final output directory) is usable on its own:

============================================  ======================================================
``adapter_config.json``, ``adapter_model.safetensors``  the LoRA adapter (PEFT writes it)
``non_lora_trainables.safetensors``           every other trained tensor (the projector), our names
``vidlora_config.json``                       the run record: the base model to load (and how), the
                                              :class:`~vidlora.data.processor.Processor`, the
                                              resolved training arguments (for reference)
``config.json``                               the model's config as trained (select layer, frames)
tokenizer files                               the tokenizer as trained (its ``legacy`` kept)
============================================  ======================================================

The original Video-LLaVA's outputs (``adapter_model.bin`` + ``non_lora_trainables.bin``, pickles
read with ``weights_only=True``) are read by :mod:`vidlora.infer.load`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vidlora.data.processor import MEDIA_MODALITIES, Processor
from vidlora.errors import UsageError
from vidlora.jsonl import read_json_object, write_text_atomic
from vidlora.model.configuration import ConfigOverrides
from vidlora.model.lora import is_lora_name, strip_peft_prefix
from vidlora.model.safetensors_check import check_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
RECORD_FILE = "vidlora_config.json"
LEGACY_ADAPTER = "adapter_model.bin"
LEGACY_NON_LORA = "non_lora_trainables.bin"
#: 1: the untyped settings dict of vidlora 0.1; 2: base + processor + training.
RECORD_FORMAT = 2


@dataclass(frozen=True)
class BaseModel:
    """Where the model a checkpoint was trained on comes from: `load_pretrained`'s arguments.

    The processor's `config_overrides` complete them, so the loaded base is the trained model.
    """

    model_name_or_path: str
    video_tower: str | None = None
    image_tower: str | None = None
    pretrain_mm_mlp_adapter: str | None = None
    mm_projector_type: str | None = None
    cache_dir: str | None = None
    #: The attention kernel trained with; None (records before it was recorded): transformers' default.
    attn_implementation: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """`load_pretrained`'s keyword arguments for this base (the model name aside)."""
        return {
            "video_tower": self.video_tower,
            "image_tower": self.image_tower,
            "pretrain_mm_mlp_adapter": self.pretrain_mm_mlp_adapter,
            "mm_projector_type": self.mm_projector_type,
            "cache_dir": self.cache_dir,
            "attn_implementation": self.attn_implementation,
        }


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint was trained from and how its inputs were made.

    ``processor`` is None only for a checkpoint of vidlora 0.1, whose settings (``legacy``) are
    turned into a processor once the base model's config is known (:meth:`processor_for`).
    """

    base: BaseModel
    processor: Processor | None
    training: dict[str, Any]
    legacy: dict[str, Any] | None = None

    def processor_for(self, config: Any) -> Processor:
        """The processor of this checkpoint, checked against the loaded base model's config."""
        if self.processor is not None:
            self.processor.check_model(config)
            return self.processor
        old = self.legacy or {}
        processor = Processor.for_model(
            config,
            template=old.get("template", "v1"),
            image_aspect_ratio=old.get("image_aspect_ratio", "pad"),
            model_max_length=old.get("model_max_length"),
            tokenizer_model_max_length=old.get("tokenizer_model_max_length"),
            modalities=old.get("modalities") or MEDIA_MODALITIES,
        )
        # vidlora 0.1 tokenized text after a placeholder as text after a special token, whatever the layout.
        return replace(processor, prompt_tokenization="whole_prompt")

    @property
    def absent_legacy(self) -> bool:
        """How to read a saved tokenizer whose config has no ``legacy`` key: vidlora 0.1 trained with
        transformers 5's default (``False``) and saved no key; later vidlora always writes one."""
        return self.processor is not None

    @property
    def config_overrides(self) -> ConfigOverrides:
        """The overrides that rebuild the trained model from its base (see `Processor.config_overrides`)."""
        if self.processor is not None:
            return self.processor.config_overrides
        old = self.legacy or {}
        return ConfigOverrides(
            mm_vision_select_layer=(old.get("model_args") or {}).get("mm_vision_select_layer"),
            num_frames=old.get("num_frames"),
        )

    def to_dict(self) -> dict[str, Any]:
        if self.processor is None:
            raise ValueError("a vidlora 0.1 record is read, never written")
        return {
            "format": RECORD_FORMAT,
            "base": asdict(self.base),
            "processor": self.processor.to_dict(),
            "training": self.training,
        }


def write_record(directory: Path, record: RunRecord) -> None:
    """``vidlora_config.json`` in ``directory``, written atomically (a kill leaves the old one or the new)."""
    write_text_atomic(
        directory / RECORD_FILE, json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    )


def read_record(directory: str | Path) -> RunRecord | None:
    """The run record of a checkpoint directory; None when it has none (not a vidlora checkpoint).

    Raises:
        UsageError: the record is unreadable or of an unknown format.
    """
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    data = read_json_object(path)
    version = data.get("format", 1)
    if version == 1:
        base = BaseModel(str(data.get("base_model") or ""), data.get("video_tower"), data.get("image_tower"))
        return RunRecord(base=base, processor=None, training={}, legacy=data)
    if version != RECORD_FORMAT:
        raise UsageError(
            f"{path}: record format {version} is newer than this vidlora reads ({RECORD_FORMAT})"
        )
    base_data, processor_data = data.get("base"), data.get("processor")
    if not isinstance(base_data, dict) or not isinstance(base_data.get("model_name_or_path"), str):
        raise UsageError(f"{path}: 'base' must be an object naming model_name_or_path")
    if not isinstance(processor_data, dict):
        raise UsageError(f"{path}: 'processor' must be an object")
    base_fields = {f.name for f in fields(BaseModel)}
    base = BaseModel(**{k: v for k, v in base_data.items() if k in base_fields})
    processor = Processor.from_dict(processor_data, where=str(path))
    return RunRecord(base=base, processor=processor, training=data.get("training", {}))


# -- trained tensors ---------------------------------------------------------------------------------


def non_lora_trainable_names(model: torch.nn.Module) -> list[str]:
    """Trainable parameters that are not LoRA adapters (the projector, in the default recipe)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not is_lora_name(n)]


def write_trainables(model: Any, directory: Path, state_dict: dict | None = None) -> None:
    """The non-LoRA trainables (safetensors, our names) and the model's config, next to an adapter.

    ``model`` is PEFT-wrapped or not. ``state_dict`` is the Trainer's gathered one under ZeRO-3
    (trainable parameters only); without it the parameters are read from ``model`` directly.
    """
    names = non_lora_trainable_names(model)
    if state_dict is None:
        params = dict(model.named_parameters())
        tensors = {n: params[n] for n in names}
    else:
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise RuntimeError(f"the gathered state dict lacks trainable parameters: {missing[:5]}")
        tensors = {n: state_dict[n] for n in names}
    if tensors:
        cpu = {strip_peft_prefix(n): t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
        save_file(cpu, str(directory / NON_LORA_FILE), metadata={"format": "pt"})
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(directory)


def read_trainables(path: Path) -> dict[str, torch.Tensor]:
    """Saved non-LoRA trainables by our names, the file checked before it is read."""
    check_safetensors(path)
    return load_file(str(path))


def load_trainables(model: torch.nn.Module, path: Path) -> None:
    """Copy saved non-LoRA trainables into ``model`` (PEFT-wrapped or not); strict on names and shapes."""
    if not path.exists():
        return
    saved = read_trainables(path)
    params = {strip_peft_prefix(n): p for n, p in model.named_parameters()}
    unknown = [k for k in saved if k not in params]
    if unknown:
        raise UsageError(f"{path} holds tensors the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for key, tensor in saved.items():
            if params[key].shape != tensor.shape:
                raise UsageError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, model expects {tuple(params[key].shape)}"
                )
            params[key].copy_(tensor.to(params[key].dtype))


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` holds a LoRA adapter (ours or the original's)."""
    return (path / ADAPTER_CONFIG).is_file()
