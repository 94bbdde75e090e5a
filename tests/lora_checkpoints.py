"""Tiny LoRA checkpoints on disk, in the layout `vidlora train` writes, for the inference tests."""

from __future__ import annotations

from pathlib import Path

import torch

from vidlora.checkpoint import BaseModel, RunRecord, write_record, write_trainables
from vidlora.data.processor import Processor
from vidlora.model.loading import load_pretrained
from vidlora.model.lora import apply_recipe, build_lora_config


def perturbed_lora_model(seed: int = 1, *, r: int = 8):
    """The tiny model with LoRA whose B matrices and projector are moved off their init,
    standing in for a trained adapter (LoRA B starts at zero, which would make merge trivial)."""
    loaded = load_pretrained("tiny")
    torch.manual_seed(seed)  # PEFT initialises lora_A from the global generator
    model = apply_recipe(loaded.model, build_lora_config(loaded.model, r, 2 * r, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    return model, loaded.tokenizer


def save_adapter(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_trainables(model, out)
    processor = Processor.for_model(model.get_base_model().config, template="v1")
    write_record(out, RunRecord(BaseModel("tiny"), processor, training={}))
    tokenizer.save_pretrained(out)
    return out
