"""Load anything `vidlora train` (or the original Video-LLaVA) wrote, for inference.

`--model_path` may be:

* a vidlora LoRA output — the final directory or any ``checkpoint-N`` — holding
  ``adapter_config.json``, ``adapter_model.safetensors``, ``non_lora_trainables.safetensors``,
  ``vidlora_config.json`` and the tokenizer; its base is ``--model_base`` or, when omitted, the
  base recorded in ``vidlora_config.json``;
* a legacy original output (``adapter_model.bin`` + ``non_lora_trainables.bin``, read with
  ``torch.load(weights_only=True)``), whose keys use the original layout;
* a merged model or a base model in any layout `load_pretrained` reads.

Nothing depends on folder names: the files present decide. The pre-processing settings saved at
training time (template, frames, aspect-ratio handling) come back in `InferenceSettings`, so
inference sees exactly what training saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict

from vidlora.model import keymaps
from vidlora.model.loading import load_pretrained
from vidlora.model.lora import build_lora_config
from vidlora.model.modeling import register_auto_classes
from vidlora.training.trainer import NON_LORA_FILE, VIDLORA_CONFIG_FILE, load_non_lora_trainables

LEGACY_ADAPTER = "adapter_model.bin"
LEGACY_NON_LORA = "non_lora_trainables.bin"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class InferenceSettings:
    """Pre-processing that must equal training's (train/serve parity)."""

    template: str = "v1"
    num_frames: int = 8
    image_aspect_ratio: str = "pad"
    model_max_length: int | None = None
    tokenizer_model_max_length: int | None = None

    @classmethod
    def from_data_config(cls, data: dict[str, Any], model_config) -> InferenceSettings:
        frames = data.get("num_frames")
        if frames is None and model_config.video_config is not None:
            frames = model_config.num_frames
        return cls(
            template=data.get("template", "v1"),
            num_frames=int(frames or 8),
            image_aspect_ratio=data.get("image_aspect_ratio", "pad"),
            model_max_length=data.get("model_max_length"),
            tokenizer_model_max_length=data.get("tokenizer_model_max_length"),
        )


@dataclass
class InferenceModel:
    """A model ready for generation, its tokenizer and the settings it was trained with."""

    model: torch.nn.Module
    tokenizer: Any
    settings: InferenceSettings
    description: str


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        return json.load(handle)


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def load_for_inference(
    model_path: str,
    model_base: str | None = None,
    *,
    merge: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: str = "cpu",
    strict: bool = True,
) -> InferenceModel:
    """Load a checkpoint for generation (see the module docstring for what `model_path` may be)."""
    # vidlora checkpoint dirs carry our config.json: let the Auto classes (AutoTokenizer reads it) know it.
    register_auto_classes()
    path = Path(model_path)
    if not (path.is_dir() and is_adapter_dir(path)):
        loaded = load_pretrained(model_path, torch_dtype=torch_dtype, device=device, strict=strict)
        loaded.model.config.run_all_towers = False
        data = _read_json(path / VIDLORA_CONFIG_FILE) if (path / VIDLORA_CONFIG_FILE).is_file() else {}
        settings = InferenceSettings.from_data_config(data, loaded.model.config)
        return InferenceModel(loaded.model, loaded.tokenizer, settings, f"model {model_path} ({loaded.report.layout})")

    data = _read_json(path / VIDLORA_CONFIG_FILE) if (path / VIDLORA_CONFIG_FILE).is_file() else {}
    base = model_base or data.get("base_model")
    if base is None:
        raise ValueError(
            f"{path} is a LoRA adapter without a recorded base model: pass --model_base (the model it was trained on)"
        )
    loaded = load_pretrained(
        base,
        video_tower=data.get("video_tower"),
        image_tower=data.get("image_tower"),
        torch_dtype=torch_dtype,
        device=device,
        strict=strict,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    if (path / NON_LORA_FILE).is_file() or (path / "adapter_model.safetensors").is_file():
        load_non_lora_trainables(model, path / NON_LORA_FILE)
        model = PeftModel.from_pretrained(model, str(path))
        kind = "vidlora adapter"
    elif (path / LEGACY_ADAPTER).is_file():
        model = _load_legacy(model, path)
        kind = "legacy Video-LLaVA adapter"
    else:
        raise FileNotFoundError(f"{path}: adapter_config.json but no adapter weights (adapter_model.safetensors/.bin)")
    if merge:
        model = model.merge_and_unload()
    # Dummy tower passes are for training ranks in lock-step; generation never needs them.
    loaded.model.config.run_all_towers = False
    model.eval()
    settings = InferenceSettings.from_data_config(data, loaded.model.config)
    return InferenceModel(model, tokenizer, settings, f"{kind} {path} on base {base}")


def _legacy_key_to_ours(key: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> our PEFT key."""
    prefix = "base_model.model."
    inner = key[len(prefix) :] if key.startswith(prefix) else key
    ours = keymaps.to_ours(inner, "original")
    if ours is None:
        raise KeyError(f"legacy checkpoint key {key!r} has no counterpart in this model")
    return ours


def _load_legacy(model: torch.nn.Module, path: Path) -> PeftModel:
    """The original's outputs: pickled adapter + projector, read with weights_only=True.

    Its adapter_config lists leaf names (``q_proj`` …) that would also hit the towers' attention
    here, so the LoRA config is rebuilt with our LLM-only targets and the original's r/alpha.
    """
    legacy_config = _read_json(path / ADAPTER_CONFIG)
    non_lora_path = path / LEGACY_NON_LORA
    if non_lora_path.is_file():
        projector = torch.load(non_lora_path, map_location="cpu", weights_only=True)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in projector.items():
                ours = _legacy_key_to_ours(key)
                if ours not in params:
                    raise KeyError(f"{non_lora_path}: {key} -> {ours} is not a parameter of the model")
                params[ours].copy_(tensor.to(params[ours].dtype))
    lora_config: LoraConfig = build_lora_config(
        int(legacy_config.get("r", 8)),
        int(legacy_config.get("lora_alpha", 16)),
        float(legacy_config.get("lora_dropout", 0.0)),
        legacy_config.get("bias", "none"),
    )
    peft_model = PeftModel(model, lora_config)
    adapter = torch.load(path / LEGACY_ADAPTER, map_location="cpu", weights_only=True)
    renamed = {}
    for key, tensor in adapter.items():
        base_key = key.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        ours = _legacy_key_to_ours(base_key)
        suffix = ".lora_A.weight" if ".lora_A." in key else ".lora_B.weight"
        renamed["base_model.model." + ours[: -len(".weight")] + suffix] = tensor
    result = set_peft_model_state_dict(peft_model, renamed)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise KeyError(f"{path / LEGACY_ADAPTER}: tensors with no place in the model: {unexpected[:5]}")
    return peft_model

