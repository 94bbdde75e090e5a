"""`vidlora check`'s work: read every sample the way training would and report every problem at once.

Each record goes through training's own validation (:func:`~vidlora.data.dataset.prepare_sample`:
records, accepted media, path resolution, files, tokenization with the run's processor and length
limits), then its sampled video frames and images are decoded through the same processor that
training uses. Nothing stops at the first problem: every bad sample is listed with its id, record
file, media file and a reason category (:class:`~vidlora.data.dataset.ProblemKind`), so a sample
training refuses is reported here, and the reverse.

The summary gives samples per modality, media statistics from :func:`~vidlora.data.media.probe_video`
(duration, fps, resolution, codec), text and expanded token-length histograms and how many samples
would be truncated or rejected. ``workers`` decodes in several processes (results in input order).
The command (flags, model loading) is :mod:`vidlora.check`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from vidlora.data.dataset import (
    MediaFolders,
    ProblemKind,
    SampleProblem,
    classify_media_error,
    prepare_sample,
    read_samples,
    stat_problem,
)
from vidlora.data.frame_cache import CacheStats, FrameCache, video_pixels
from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, MediaError, probe_video, read_image
from vidlora.data.parallel import map_in_processes
from vidlora.data.processor import Processor

HISTOGRAM_BINS = 10
MAX_PRINTED_PROBLEMS = 200


@dataclass(frozen=True)
class MediaJob:
    """One sample's media to decode (picklable: sent to worker processes)."""

    video: str | None
    images: tuple[str, ...]
    processor: Processor
    timeout_s: float
    frame_cache: FrameCache | None = None  # pre-processed pixels are read from / stored in it


@dataclass
class MediaResult:
    """What decoding one sample's media found: problems ``(kind, reason, file)`` and media facts."""

    problems: list[tuple[str, str, str]] = field(default_factory=list)
    video: dict[str, Any] | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    cache_stats: CacheStats | None = None  # this job's frame-cache lookups (a worker counts its own)


def check_media(job: MediaJob) -> MediaResult:
    """Probe and decode one sample's video and images exactly as training would; never raises for bad media.

    With a frame cache, the pixels come from (or go into) it, as in training with the same cache.
    """
    result = MediaResult()
    cache = job.frame_cache
    counted = CacheStats() if cache is None else replace(cache.stats)

    def failed(path: Path, exc: BaseException) -> None:
        kind, reason = classify_media_error(path, exc)
        result.problems.append((kind.value, reason, str(path)))

    if job.video is not None:
        path = Path(job.video)
        found = stat_problem(path)
        if found is not None:
            result.problems.append((found[0].value, found[1], str(path)))
        else:
            try:
                info = probe_video(path, timeout_s=job.timeout_s)
                video_pixels(job.processor, path, cache, timeout_s=job.timeout_s)
                result.video = asdict(info)  # only videos that decode enter the statistics
            except (MediaError, TimeoutError, ValueError) as exc:
                failed(path, exc)
    for image in job.images:
        path = Path(image)
        found = stat_problem(path)
        if found is not None:
            result.problems.append((found[0].value, found[1], str(path)))
            continue
        try:
            decoded = read_image(path)  # decoded even on a cache hit: its size is a statistic
            if cache is not None:
                cache.get(path, "image", job.processor, partial(job.processor.preprocess_image, decoded))
            else:
                job.processor.preprocess_image(decoded)
            result.image_sizes.append(decoded.size)
        except (MediaError, TimeoutError, ValueError) as exc:
            failed(path, exc)
    if cache is not None:
        result.cache_stats = cache.stats - counted  # this job's lookups (a worker holds a copy of the cache)
    return result


@dataclass
class SampleInfo:
    """Per-sample facts that go into the report."""

    id: str
    source: str
    index: int
    modality: str
    text_tokens: int | None = None  # placeholders counted once (what model_max_length bounds)
    expanded_tokens: int | None = None  # media placeholders expanded (what the model sees)
    truncated: bool = False
    ok: bool = True


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(array, bins=HISTOGRAM_BINS)
    return {
        "count": len(values),
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def _counter(values: Iterable[Any]) -> dict[str, int]:
    return dict(sorted(Counter(str(v) for v in values).items()))


def run_check(
    data_paths: Sequence[str | Path],
    processor: Processor,
    tokenizer: PreTrainedTokenizerBase,
    folders: MediaFolders,
    *,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    workers: int = 1,
    progress: bool = True,
    frame_cache: FrameCache | None = None,
) -> dict[str, Any]:
    """Check every sample of ``data_paths`` as training reads it; return the full report.

    With ``frame_cache``, decoded pixels go through it (and so fill it); the report counts its lookups.
    """
    samples, problems = read_samples(list(data_paths))
    invalid_records = sum(1 for p in problems if p.index is not None)
    invalid_files = len(problems) - invalid_records
    infos: list[SampleInfo] = []
    jobs: list[tuple[int, MediaJob]] = []
    records_bar = tqdm(samples, desc="check records", unit="sample", disable=not progress, file=sys.stderr)
    for sample in records_bar:
        prepared = prepare_sample(sample, processor, tokenizer, folders)
        info = SampleInfo(
            sample.id, str(sample.source), sample.index, sample.modality,
            text_tokens=prepared.text_length, expanded_tokens=prepared.full_length, truncated=prepared.truncated,
        )  # fmt: skip
        infos.append(info)
        problems += prepared.problems
        # Decode what resolved and exists; the files training would refuse are reported already.
        media = prepared.decodable_media()
        video = next((str(path) for kind, path in media if kind == "video"), None)
        images = tuple(str(path) for kind, path in media if kind == "image")
        if video is not None or images:
            jobs.append((len(infos) - 1, MediaJob(video, images, processor, decode_timeout, frame_cache)))

    results = map_in_processes(
        check_media, [job for _, job in jobs], workers, desc="check media", unit="sample", progress=progress
    )
    videos: list[dict[str, Any]] = []
    image_sizes: list[tuple[int, int]] = []
    cache_stats = CacheStats()
    for (position, _), result in zip(jobs, results, strict=True):
        if result.cache_stats is not None:
            cache_stats += result.cache_stats
        sample = samples[position]
        for kind, reason, file in result.problems:
            problems.append(
                SampleProblem(ProblemKind(kind), reason, sample.id, sample.index, str(sample.source), file)
            )
        if result.video is not None:
            videos.append(result.video)
        image_sizes += result.image_sizes

    # Problems in input order: by record file (in --data_path order), then record index.
    file_order = {str(Path(p)): k for k, p in enumerate(data_paths)}
    problems.sort(
        key=lambda p: (
            file_order.get(p.source or "", len(file_order)),
            p.index if p.index is not None else -1,
        )
    )
    bad_keys = {(p.source, p.index) for p in problems}
    for info in infos:
        info.ok = (info.source, info.index) not in bad_keys
    bad_ids = list(dict.fromkeys(p.sample_id for p in problems if p.sample_id is not None))
    id_counts = Counter(s.id for s in samples)
    text_lengths = [i.text_tokens for i in infos if i.text_tokens is not None]
    expanded = [i.expanded_tokens for i in infos if i.expanded_tokens is not None]
    return {
        "ok": not problems,
        "settings": {
            "data_path": [str(p) for p in data_paths],
            "video_folder": None if folders.video_folder is None else str(folders.video_folder),
            "image_folder": None if folders.image_folder is None else str(folders.image_folder),
            "allow_outside": folders.allow_outside,
            "decode_timeout": decode_timeout,
            "processor": processor.to_dict(),
        },
        "counts": {
            "invalid_files": invalid_files,
            "invalid_records": invalid_records,
            "valid_records": len(samples),
            "bad_samples": len(bad_keys),
            "problems": len(problems),
        },
        "problem_kinds": _counter(p.kind.value for p in problems),
        "bad_ids": bad_ids,
        "problems": [p.to_dict() for p in problems],
        "modalities": _counter(i.modality for i in infos),
        "duplicate_ids": sorted(k for k, n in id_counts.items() if n > 1),
        "tokens": {
            "text": _stats(text_lengths),
            "expanded": _stats(expanded),
            "truncated": sum(1 for i in infos if i.truncated),
            "rejected": sum(1 for p in problems if p.kind is ProblemKind.TOKENIZATION),
        },
        "media": {
            "videos": {
                "decoded": len(videos),
                # Fewer frames than sampled: frames repeat (the original's linspace), not an error.
                "shorter_than_num_frames": sum(
                    1 for v in videos if v["num_frames"] < (processor.num_frames or 0)
                ),
                "duration_s": _stats([v["duration_s"] for v in videos]),
                "num_frames": _stats([v["num_frames"] for v in videos]),
                "fps": _counter(round(v["fps"], 3) for v in videos),
                "resolution": _counter(f"{v['width']}x{v['height']}" for v in videos),
                "codec": _counter(v["codec"] for v in videos),
                "rotation": _counter(v["rotation"] for v in videos),
            },
            "images": {
                "decoded": len(image_sizes),
                "resolution": _counter(f"{w}x{h}" for w, h in image_sizes),
            },
        },
        "samples": [asdict(i) for i in infos],
        "frame_cache": None
        if frame_cache is None
        else {"root": str(frame_cache.root), **asdict(cache_stats)},
    }


def _histogram_lines(title: str, stats: dict[str, Any], width: int = 30) -> list[str]:
    if not stats.get("count"):
        return [f"  {title}: none"]
    lines = [
        f"  {title}: min {stats['min']:.0f}  median {stats['median']:.0f}  mean {stats['mean']:.1f}  max {stats['max']:.0f}"
    ]
    counts, edges = stats["histogram"]["counts"], stats["histogram"]["edges"]
    top = max(counts) or 1
    for k, n in enumerate(counts):
        bar = "#" * round(width * n / top)
        lines.append(
            f"    [{edges[k]:8.0f}, {edges[k + 1]:8.0f}{']' if k == len(counts) - 1 else ')'} {n:6d} {bar}"
        )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary printed by the command."""
    counts = report["counts"]
    lines = [
        f"vidlora check: {counts['valid_records']} valid record(s) read from {len(report['settings']['data_path'])} file(s)"
    ]
    lines.append("  modalities: " + ", ".join(f"{k} {v}" for k, v in report["modalities"].items()))
    videos, images = report["media"]["videos"], report["media"]["images"]
    lines.append(f"  videos decoded: {videos['decoded']}")
    if videos["decoded"]:
        d = videos["duration_s"]
        lines.append(f"    duration s: min {d['min']:.2f}  median {d['median']:.2f}  max {d['max']:.2f}")
        if videos["shorter_than_num_frames"]:
            lines.append(
                f"    fewer frames than --num_frames (frames repeat): {videos['shorter_than_num_frames']}"
            )
        for key in ("fps", "resolution", "codec", "rotation"):
            lines.append(f"    {key}: " + ", ".join(f"{k} ({v})" for k, v in videos[key].items()))
    lines.append(f"  images decoded: {images['decoded']}")
    if images["decoded"]:
        lines.append("    resolution: " + ", ".join(f"{k} ({v})" for k, v in images["resolution"].items()))
    tokens = report["tokens"]
    lines += _histogram_lines("text tokens (placeholders counted once)", tokens["text"])
    lines += _histogram_lines("expanded tokens", tokens["expanded"])
    lines.append(f"  would be truncated: {tokens['truncated']}   rejected: {tokens['rejected']}")
    cache = report.get("frame_cache")
    if cache is not None:
        stats = CacheStats(**{k: v for k, v in cache.items() if k != "root"})
        lines.append(f"  frame cache {cache['root']}: {stats.format()}")
    if report["duplicate_ids"]:
        shown = ", ".join(report["duplicate_ids"][:10])
        lines.append(f"  warning: {len(report['duplicate_ids'])} duplicate id(s): {shown}")
    problems = report["problems"]
    if not problems:
        lines.append("OK: every sample can be read, tokenised and decoded")
        return "\n".join(lines)
    lines.append(
        f"PROBLEMS: {counts['bad_samples']} bad sample(s), {counts['problems']} problem(s): "
        + ", ".join(f"{k} {v}" for k, v in report["problem_kinds"].items())
    )
    for p in problems[:MAX_PRINTED_PROBLEMS]:
        problem = SampleProblem(
            ProblemKind(p["kind"]), p["reason"], p["id"], p["index"], p["source"], p["file"]
        )
        lines.append("  " + problem.format())
    if len(problems) > MAX_PRINTED_PROBLEMS:
        lines.append(
            f"  ... {len(problems) - MAX_PRINTED_PROBLEMS} more (write them all with --report out.json)"
        )
    return "\n".join(lines)
