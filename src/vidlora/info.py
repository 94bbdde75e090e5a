"""`vidlora info`: parameter counts per part of a model, trainable vs frozen under the LoRA recipe.

Counts come from the module structure only (:mod:`vidlora.model.info`), so ``videollava-7b`` is
counted on the meta device in seconds. The LoRA flags default to `vidlora train`'s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from vidlora.errors import UsageError
from vidlora.model.info import count_parameters, format_counts


def _bool(value: str) -> bool:
    """The original's booleans: True/False (also yes/no, 1/0)."""
    lowered = value.lower()
    if lowered in ("true", "yes", "1", "t", "y"):
        return True
    if lowered in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _training_default(name: str) -> object:
    # Defaults live with the training arguments; read them without building TrainingArguments.
    from vidlora.args import TrainingArguments

    return TrainingArguments.__dataclass_fields__[name].default


def build_parser() -> argparse.ArgumentParser:
    """The `vidlora info` command line."""
    parser = argparse.ArgumentParser(
        prog="vidlora info",
        description="Parameter counts per part of a Video-LLaVA model, trainable vs frozen under LoRA.",
    )
    parser.add_argument(
        "--model_name_or_path", default="tiny", help="preset (tiny, videollava-7b), directory or hub id"
    )
    parser.add_argument("--video_tower", default=None, help="LanguageBind video tower (for a plain LLM)")
    parser.add_argument("--image_tower", default=None, help="LanguageBind image tower (for a plain LLM)")
    # None = "not given": the training defaults are looked up only then (importing the training
    # arguments pulls in the Trainer stack, seconds that `info` should not pay when flags are given).
    parser.add_argument(
        "--lora_enable", type=_bool, default=None, help="True/False (default: vidlora train's)"
    )
    parser.add_argument("--lora_r", type=int, default=None, help="LoRA rank (default: vidlora train's)")
    parser.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: vidlora train's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `vidlora info`; returns the exit status."""
    from vidlora.model.loading import load_pretrained

    args = build_parser().parse_args(argv)
    for name in ("lora_enable", "lora_r", "lora_alpha"):
        if getattr(args, name) is None:
            setattr(args, name, _training_default(name))
    if args.lora_enable and args.lora_r < 1:
        raise UsageError(f"--lora_r {args.lora_r}: must be at least 1")
    loaded = load_pretrained(
        args.model_name_or_path, video_tower=args.video_tower, image_tower=args.image_tower, device="meta"
    )
    counts = count_parameters(loaded.model, lora_r=args.lora_r if args.lora_enable else None)
    if args.json:
        payload = asdict(counts) | {
            "model": args.model_name_or_path,
            "lora_alpha": args.lora_alpha if args.lora_enable else None,
            "base_total": counts.base_total,
            "total": counts.total,
        }
        print(json.dumps(payload, indent=2))
    else:
        recipe = (
            f"LoRA r={args.lora_r} alpha={args.lora_alpha}"
            if args.lora_enable
            else "no LoRA (LLM trained in full)"
        )
        print(
            format_counts(
                counts, title=f"{args.model_name_or_path}: towers frozen, projector trained, {recipe}"
            )
        )
    return 0
