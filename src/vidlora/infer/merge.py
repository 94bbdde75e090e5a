"""`vidlora merge`: fold a LoRA checkpoint into its base model and save a standalone model.

    vidlora merge --model_path out/checkpoint-50 [--model_base BASE] --out merged/ [--layout ours|hf]
                  [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32]

The projector trained alongside the adapter is included. The result is sharded safetensors plus
config, tokenizer and the training's data config, and loads with `vidlora chat/predict
--model_path merged/`. With ``--layout hf`` (the default when the base was in the transformers
`-hf` layout) it is written for transformers' ``VideoLlavaForConditionalGeneration``; that layout
has no temporal attention, so a base with temporal layers cannot be written there. The merged
weights keep the checkpoint's dtype unless ``--dtype`` says otherwise (:mod:`vidlora.infer.device`):
a bf16 base gives a bf16 model, never a float32 one twice its size.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidlora.checkpoint import BaseModel, RunRecord, read_record, write_record
from vidlora.errors import UsageError
from vidlora.infer.device import DEVICE_HELP, DTYPE_HELP, detect_placement
from vidlora.infer.load import checkpoint_dtype, load_for_inference
from vidlora.jsonl import write_text_atomic
from vidlora.model import keymaps


def hf_cannot_hold(config) -> str | None:
    """Why transformers' ``VideoLlavaForConditionalGeneration`` cannot hold this model, or None."""
    if config.video_config is not None and config.video_config.add_time_attn:
        return "it has no temporal attention (the video tower's temporal layers)"
    if config.mm_projector_type != "mlp2x_gelu":
        return f"its projector is mlp2x_gelu only (this model's is {config.mm_projector_type})"
    towers = [c for c in (config.image_config, config.video_config) if c is not None]
    vision = [{k: v for k, v in c.to_dict().items() if k not in ("num_frames", "add_time_attn", "model_type")}
              for c in towers]  # fmt: skip
    if len(towers) != 2 or vision[0] != vision[1]:
        return "it has one vision config for both towers (this model's towers differ or one is missing)"
    return None


def hf_config_dict(config, prompt_tokenization: str) -> dict:
    """A transformers ``VideoLlavaConfig`` for our config (both towers share one vision config)."""
    from transformers import VideoLlavaConfig

    tower = config.image_config if config.image_config is not None else config.video_config
    vision = tower.to_dict()
    for key in ("num_frames", "add_time_attn", "model_type", "transformers_version"):
        vision.pop(key, None)
    # Not a declared field of this config: transformers keeps extra keyword arguments as attributes,
    # which the __init__ that its dataclass_transform declares does not show.
    hf = VideoLlavaConfig(  # type: ignore[call-arg]
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        video_token_index=config.video_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy="default",
        image_seq_length=config.image_seq_length if config.image_config is not None else 256,
        video_seq_length=config.video_seq_length if config.video_config is not None else 2056,
        pad_token_id=config.pad_token_id,
    )
    # Not a transformers field: how the model's prompts were tokenized in training, for vidlora.
    return {**hf.to_dict(), "prompt_tokenization": prompt_tokenization}


def save_sharded(
    tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int, dtype: torch.dtype | None = None
) -> None:
    """Write safetensors shards plus the index transformers reads.

    Floating-point tensors are stored in ``dtype`` (default: as they are). Shards are planned from
    the sizes first and copied to the host one at a time, so a model on a GPU never has all of its
    weights in host memory at once.
    """

    def nbytes(tensor: torch.Tensor) -> int:
        itemsize = (
            dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        )
        return tensor.numel() * itemsize

    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + nbytes(tensors[key]) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes(tensors[key])

    def host(keys: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            tensor = tensors[key].detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out[key] = tensor.to("cpu").contiguous()
        return out

    if len(shards) == 1:
        save_file(host(shards[0]), str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(host(keys), str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(nbytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def merge(
    model_path: str,
    model_base: str | None,
    out: str,
    *,
    layout: str | None = None,
    max_shard_size_mb: int = 4096,
    cache_dir: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Merge and save; returns the output directory.

    ``device``/``dtype``: as ``--device``/``--dtype`` (default ``auto``: the GPU when there is one,
    the checkpoint's dtype).
    """
    if layout not in (None, "ours", "hf"):
        raise UsageError(f"--layout {layout}: use ours or hf")
    placement = detect_placement(
        device,
        dtype,
        checkpoint_dtype=checkpoint_dtype(model_path, model_base, cache_dir=cache_dir),
        purpose="merge",
    )
    loaded = load_for_inference(
        model_path,
        model_base,
        merge=True,
        cache_dir=cache_dir,
        torch_dtype=placement.dtype,
        device=str(placement.device),
    )
    model = loaded.model
    config = model.config
    reason = hf_cannot_hold(config)
    if layout is None:
        layout = "ours" if reason else "hf"
    if layout == "hf" and reason:
        raise UsageError(
            f"--layout hf: transformers' VideoLlavaForConditionalGeneration {reason}; use --layout ours"
        )
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    # The merged model is tokenized as the checkpoint was trained (its processor), whatever its base says.
    tokenization = loaded.processor.prompt_tokenization
    state = dict(model.state_dict())
    dtype_name = str(placement.dtype).removeprefix("torch.")
    if layout == "hf":
        tensors = keymaps.convert_from_ours(state, "hf")
        hf_config = {**hf_config_dict(config, tokenization), "dtype": dtype_name}
        write_text_atomic(target / "config.json", json.dumps(hf_config, indent=2))
    else:
        tensors = state
        merged_config = copy.deepcopy(config)
        merged_config.prompt_tokenization = tokenization
        merged_config.dtype = placement.dtype  # what the weights are stored in; read back by "auto"
        merged_config.save_pretrained(target)
    # The projector and other trained tensors may be float32 beside a bf16 base: one dtype for all.
    save_sharded(tensors, target, max_shard_size_mb * 1024 * 1024, placement.dtype)
    loaded.tokenizer.save_pretrained(target)
    record = read_record(model_path) if Path(model_path).is_dir() else None
    base = record.base if record is not None else BaseModel(model_path)
    training = record.training if record is not None else {}
    write_record(target, RunRecord(base=base, processor=loaded.processor, training=training))
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidlora merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="a vidlora LoRA checkpoint directory")
    parser.add_argument("--model_base", default=None, help="its base model (default: the recorded one)")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--layout",
        choices=("ours", "hf"),
        default=None,
        help="ours (default with temporal attention) or hf (VideoLlavaForConditionalGeneration)",
    )
    parser.add_argument("--max_shard_size_mb", type=int, default=4096)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument(
        "--cache_dir", default=None, help="hub cache for the base model (default: the recorded one)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = merge(
        args.model_path,
        args.model_base,
        args.out,
        layout=args.layout,
        max_shard_size_mb=args.max_shard_size_mb,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
    )
    print(f"vidlora merge: wrote {path}", file=sys.stderr)
    return 0
