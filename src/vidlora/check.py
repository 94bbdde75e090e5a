"""`vidlora check`: read every sample the way `vidlora train` would, and report every problem at once.

It parses training's own model and data flags (`--X`, `--image_aspect_ratio`, the length limits,
`--num_frames`, the folders …), builds the same processor training builds from them — or reads
it back from a vidlora checkpoint given as `--model_name_or_path` — and runs training's own
validation on each sample before decoding its media (:mod:`vidlora.data.check`). No weights are
read. With `--frame_cache` the decoded pixels go into that cache, as training would store them.
Exit status: 0 when every sample is usable, 1 when any is not, 2 when the check itself cannot run
(bad flags, a model that cannot be read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vidlora.args import (
    DataArguments,
    ModelArguments,
    load_options,
    media_folders,
    parse_check_args,
    processor_options,
)
from vidlora.errors import UsageError
from vidlora.jsonl import write_text_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vidlora.data.processor import Processor


def data_processor(
    model_args: ModelArguments, data_args: DataArguments, command: str = "check"
) -> tuple[PreTrainedTokenizerBase, Processor]:
    """The tokenizer and processor training would use with these flags (no weights are read).

    A LoRA checkpoint as ``--model_name_or_path`` brings its own: the data is read as it was trained.
    """
    from vidlora.checkpoint import RECORD_FILE, is_adapter_dir
    from vidlora.data.processor import Processor
    from vidlora.infer.load import load_base
    from vidlora.model.loading import load_pretrained

    path = Path(model_args.model_name_or_path)
    if path.is_dir() and is_adapter_dir(path):
        # A LoRA checkpoint (not something to train from): the data is read the way it was trained.
        base = load_base(str(path), device="meta", cache_dir=model_args.cache_dir)
        print(
            f"vidlora {command}: the data flags of {path}'s training run apply (its {RECORD_FILE})",
            file=sys.stderr,
        )
        return base.tokenizer, base.processor
    loaded = load_pretrained(model_args.model_name_or_path, device="meta", **load_options(model_args))
    if loaded.tokenizer is None:
        raise UsageError(
            f"{model_args.model_name_or_path} has no tokenizer (a shape-only preset); pass the checkpoint "
            "you will train, e.g. --model_name_or_path LanguageBind/Video-LLaVA-7B"
        )
    processor = Processor.for_model(loaded.model.config, **processor_options(model_args, data_args))
    return loaded.tokenizer, processor


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vidlora check`; returns 0 (all usable) or 1 (bad samples); user errors raise."""
    model_args, data_args, options = parse_check_args(argv)
    from vidlora.data.check import format_report, run_check
    from vidlora.data.frame_cache import FrameCache

    tokenizer, processor = data_processor(model_args, data_args)
    # Training reads --eval_data_path under the same rules: a bad evaluation sample stops it too.
    data_paths = [*(data_args.data_path or []), *(data_args.eval_data_path or [])]
    report = run_check(
        data_paths,
        processor,
        tokenizer,
        media_folders(data_args),
        decode_timeout=data_args.decode_timeout,
        workers=options.workers,
        progress=not options.no_progress,
        frame_cache=FrameCache.from_flag(data_args.frame_cache),
    )
    report["settings"]["model_name_or_path"] = model_args.model_name_or_path
    print(format_report(report))
    if options.report:
        write_text_atomic(options.report, json.dumps(report, indent=1) + "\n")
        print(f"report written to {options.report}")
    return 0 if report["ok"] else 1
