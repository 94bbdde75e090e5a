"""`vidlora cache`: decode and pre-process every video and image of a data set once, into a frame cache.

It takes training's model and data flags (the processor, and so the cache keys, are training's:
:func:`vidlora.check.data_processor`), plus ``--frame_cache DIR`` and ``--workers N``, and fills the
cache in N processes (:mod:`vidlora.data.cache_fill`). A rerun only computes what is missing.
Exit status: 0 when every media file is cached, 1 when any failed (each named with its sample),
2 when the command cannot run.
"""

from __future__ import annotations

import json

from vidlora.args import media_folders, parse_cache_args
from vidlora.jsonl import write_text_atomic


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vidlora cache`; returns 0 (all cached) or 1 (some files failed); user errors raise."""
    model_args, data_args, options = parse_cache_args(argv)
    from vidlora.check import data_processor
    from vidlora.data.cache_fill import fill_cache
    from vidlora.data.frame_cache import FrameCache

    cache = FrameCache.from_flag(data_args.frame_cache)
    assert cache is not None, "parse_cache_args requires --frame_cache"
    tokenizer, processor = data_processor(model_args, data_args, command="cache")
    data_paths = [*(data_args.data_path or []), *(data_args.eval_data_path or [])]
    report = fill_cache(
        data_paths,
        processor,
        tokenizer,
        media_folders(data_args),
        cache,
        decode_timeout=data_args.decode_timeout,
        workers=options.workers,
        progress=not options.no_progress,
    )
    print(report.format())
    if options.report:
        write_text_atomic(options.report, json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"report written to {options.report}")
    return 0 if report.ok else 1
