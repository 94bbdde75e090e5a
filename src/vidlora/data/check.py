"""`vidlora check`: read every sample the way training would and report every problem at once.

For each record: validation (:mod:`vidlora.data.records`), media path resolution, tokenisation
with the model's tokenizer, template and media token counts (and the length limits), then
decoding of the sampled video frames and the images through the same pre-processing training
uses (:mod:`vidlora.data.dataset`). Nothing stops at the first problem: every bad sample is listed
with its id, record file, media file and a reason category (:class:`~vidlora.data.dataset.ProblemKind`).

The summary gives samples per modality, media statistics from :func:`~vidlora.data.media.probe_video`
(duration, fps, resolution, codec), text and expanded token-length histograms and how many samples
would be truncated or rejected. ``--workers K`` decodes in K processes (results in input order);
``--report out.json`` writes everything machine-readably. Exit status: 0 when every sample is
usable, 1 when any is not, 2 when the check itself cannot run (bad arguments, model not loadable).

``--model_name_or_path tiny`` (the default) uses the tiny preset's tokenizer and config: no
weights are built. Other names are loaded with ``device="meta"`` (config and tokenizer only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from vidlora.data.dataset import (
    ASPECT_MODES,
    ProblemKind,
    SampleProblem,
    classify_media_error,
    frames_from_config,
    load_video,
    pixel_spec_from_config,
    read_samples,
    record_field_path,
    stat_problem,
)
from vidlora.data.media import MediaError, probe_video, read_image
from vidlora.data.records import RecordError, Sample, resolve_media
from vidlora.data.templates import Template, TemplateError, get_template
from vidlora.data.tokenize import MediaTokenCounts, TokenizationError, tokenize_sample
from vidlora.data.transforms import PixelSpec, preprocess_image

HISTOGRAM_BINS = 10
MAX_PRINTED_PROBLEMS = 200


@dataclass(frozen=True)
class CheckSettings:
    """What training would use to read the data (a subset of the training flags)."""

    data_path: tuple[str, ...]
    video_folder: str | None = None
    image_folder: str | None = None
    version: str = "v1"
    num_frames: int = 8
    model_max_length: int | None = 2048
    tokenizer_model_max_length: int | None = None
    image_aspect_ratio: str = "pad"
    allow_outside: bool = False
    decode_timeout: float = 60.0


@dataclass(frozen=True)
class MediaJob:
    """One sample's media to decode (picklable: sent to worker processes)."""

    video: str | None
    images: tuple[str, ...]
    num_frames: int
    spec: PixelSpec
    aspect: str
    timeout_s: float


@dataclass
class MediaResult:
    """What decoding one sample's media found: problems ``(kind, reason, file)`` and media facts."""

    problems: list[tuple[str, str, str]] = field(default_factory=list)
    video: dict[str, Any] | None = None
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


def check_media(job: MediaJob) -> MediaResult:
    """Probe and decode one sample's video and images exactly as training would; never raises for bad media."""
    result = MediaResult()

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
                load_video(path, job.num_frames, job.spec, job.timeout_s)
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
            image = read_image(path)
            preprocess_image(image, job.spec, aspect=job.aspect)
            result.image_sizes.append(image.size)
        except (MediaError, TimeoutError, ValueError) as exc:
            failed(path, exc)
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


def modality_of(sample: Sample) -> str:
    """``video``, ``image``, ``video+image`` or ``text``."""
    if sample.video is not None:
        return "video+image" if sample.images else "video"
    return "image" if sample.images else "text"


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


def _tokenize_checks(
    sample: Sample,
    info: SampleInfo,
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    counts: MediaTokenCounts,
    settings: CheckSettings,
) -> SampleProblem | None:
    """Fill token lengths; return a problem when training would reject the sample."""

    def problem(reason: str) -> SampleProblem:
        return SampleProblem(ProblemKind.TOKENIZATION, reason, sample.id, sample.index, str(sample.source))

    try:
        full = tokenize_sample(sample, tokenizer, template, counts)
    except TokenizationError as err:
        return problem(err.reason)
    placeholders = int(sample.video is not None) + len(sample.images)
    info.text_tokens = full.num_text_tokens + placeholders
    info.expanded_tokens = len(full.input_ids)
    mml, tmml = settings.model_max_length, settings.tokenizer_model_max_length
    if (mml is not None and info.text_tokens > mml) or (tmml is not None and info.expanded_tokens > tmml):
        try:
            tokenize_sample(
                sample, tokenizer, template, counts, model_max_length=mml, tokenizer_model_max_length=tmml
            )
        except TokenizationError as err:
            return problem(err.reason)
        info.truncated = True
    return None


def run_check(
    settings: CheckSettings,
    tokenizer: PreTrainedTokenizerBase,
    counts: MediaTokenCounts,
    spec: PixelSpec,
    *,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Check every sample; return the full report (see the module docstring).

    Raises:
        TemplateError: unknown ``settings.version``.
        ValueError: unknown ``settings.image_aspect_ratio``.
    """
    template = get_template(settings.version)
    if settings.image_aspect_ratio not in ASPECT_MODES:
        raise ValueError(f"--image_aspect_ratio must be one of {sorted(ASPECT_MODES)}")
    aspect = ASPECT_MODES[settings.image_aspect_ratio]
    samples, problems = read_samples(list(settings.data_path))
    invalid_records = sum(1 for p in problems if p.index is not None)
    invalid_files = len(problems) - invalid_records
    infos: list[SampleInfo] = []
    jobs: list[tuple[int, MediaJob]] = []
    records_bar = tqdm(samples, desc="check records", unit="sample", disable=not progress, file=sys.stderr)
    for sample in records_bar:
        info = SampleInfo(sample.id, str(sample.source), sample.index, modality_of(sample))
        infos.append(info)
        try:
            video, images = resolve_media(
                sample, settings.video_folder, settings.image_folder, settings.allow_outside
            )
        except RecordError as err:
            problems.append(
                SampleProblem(
                    ProblemKind.BAD_PATH,
                    err.reason,
                    sample.id,
                    sample.index,
                    str(sample.source),
                    record_field_path(sample, err.field),
                )
            )
        else:
            if sample.has_media:
                job = MediaJob(
                    None if video is None else str(video),
                    tuple(str(p) for p in images),
                    settings.num_frames,
                    spec,
                    aspect,
                    settings.decode_timeout,
                )
                jobs.append((len(infos) - 1, job))
        found = _tokenize_checks(sample, info, tokenizer, template, counts, settings)
        if found is not None:
            problems.append(found)

    results = _decode_all([job for _, job in jobs], workers, progress)
    videos: list[dict[str, Any]] = []
    image_sizes: list[tuple[int, int]] = []
    for (position, _), result in zip(jobs, results, strict=True):
        sample = samples[position]
        for kind, reason, file in result.problems:
            problems.append(
                SampleProblem(ProblemKind(kind), reason, sample.id, sample.index, str(sample.source), file)
            )
        if result.video is not None:
            videos.append(result.video)
        image_sizes += result.image_sizes

    # Problems in input order: by record file (in --data_path order), then record index.
    file_order = {str(Path(p)): k for k, p in enumerate(settings.data_path)}
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
            **asdict(settings),
            "data_path": list(settings.data_path),
            "media_token_counts": asdict(counts),
            "image_size": spec.image_size,
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
                "shorter_than_num_frames": sum(1 for v in videos if v["num_frames"] < settings.num_frames),
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
    }


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _decode_all(jobs: list[MediaJob], workers: int, progress: bool) -> list[MediaResult]:
    bar = tqdm(total=len(jobs), desc="check media", unit="sample", disable=not progress, file=sys.stderr)
    with bar:
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(check_media(job))
                bar.update(1)
            return results
        # Forked workers start in milliseconds (spawn re-imports torch and transformers in each).
        # A forked child must not use the OpenMP pool the parent already started (it hangs), so
        # each worker runs torch single-threaded, as torch's own DataLoader workers do.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_single_threaded
        ) as pool:
            results = []
            # map keeps input order; chunks amortise the inter-process round trips.
            for result in pool.map(check_media, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                results.append(result)
                bar.update(1)
            return results


# -- the command ------------------------------------------------------------------------------


def load_tokenizer_and_config(
    model_name_or_path: str, video_tower: str | None = None, image_tower: str | None = None
) -> tuple[PreTrainedTokenizerBase, Any]:
    """Tokenizer (with media tokens) and model config, without reading any weights."""
    if model_name_or_path == "tiny":
        from vidlora.model.presets import build_config
        from vidlora.model.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        return tokenizer, build_config("tiny", tokenizer=tokenizer)
    from vidlora.model.loading import load_pretrained

    loaded = load_pretrained(
        model_name_or_path, video_tower=video_tower, image_tower=image_tower, device="meta"
    )
    return loaded.tokenizer, loaded.model.config


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


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `vidlora check` (names as in `vidlora train`)."""
    parser = argparse.ArgumentParser(
        prog="vidlora check",
        description="Read every sample the way training would and report every problem (exit 1 if any).",
    )
    parser.add_argument("--data_path", nargs="+", required=True, help="JSON/JSONL record file(s).")
    parser.add_argument("--video_folder", default=None, help="Folder that video paths are relative to.")
    parser.add_argument("--image_folder", default=None, help="Folder that image paths are relative to.")
    parser.add_argument(
        "--model_name_or_path", default="tiny", help="Preset or checkpoint (config and tokenizer only)."
    )
    parser.add_argument(
        "--video_tower", default=None, help="LanguageBind video tower (for a plain LLM checkpoint)."
    )
    parser.add_argument(
        "--image_tower", default=None, help="LanguageBind image tower (for a plain LLM checkpoint)."
    )
    parser.add_argument("--version", default="v1", help="Prompt template (v1, llava_v1, v0, plain, llama_2).")
    parser.add_argument(
        "--num_frames", type=int, default=None, help="Frames per video (default: the model's)."
    )
    parser.add_argument(
        "--model_max_length", type=int, default=2048, help="Max text tokens (placeholders count once)."
    )
    parser.add_argument("--tokenizer_model_max_length", type=int, default=None, help="Max expanded tokens.")
    parser.add_argument("--image_aspect_ratio", default="pad", choices=sorted(ASPECT_MODES))
    parser.add_argument(
        "--allow_media_outside_folder", action="store_true", help="Accept absolute/escaping paths."
    )
    parser.add_argument(
        "--decode_timeout", type=float, default=60.0, help="Seconds allowed to read one video."
    )
    parser.add_argument("--workers", type=int, default=1, help="Decode in this many processes.")
    parser.add_argument("--report", default=None, help="Write the full report as JSON here.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vidlora check`; returns 0 (all usable), 1 (bad samples) or 2 (cannot check)."""
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("vidlora check: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        get_template(args.version)
        tokenizer, config = load_tokenizer_and_config(
            args.model_name_or_path, args.video_tower, args.image_tower
        )
        num_frames = frames_from_config(config, args.num_frames)
        counts = MediaTokenCounts.from_config(config)
        spec = pixel_spec_from_config(config)
    except (TemplateError, ValueError, OSError) as err:
        print(f"vidlora check: {err}", file=sys.stderr)
        return 2
    settings = CheckSettings(
        data_path=tuple(args.data_path),
        video_folder=args.video_folder,
        image_folder=args.image_folder,
        version=args.version,
        num_frames=num_frames,
        model_max_length=args.model_max_length,
        tokenizer_model_max_length=args.tokenizer_model_max_length,
        image_aspect_ratio=args.image_aspect_ratio,
        allow_outside=args.allow_media_outside_folder,
        decode_timeout=args.decode_timeout,
    )
    report = run_check(settings, tokenizer, counts, spec, workers=args.workers, progress=not args.no_progress)
    report["settings"]["model_name_or_path"] = args.model_name_or_path
    print(format_report(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report written to {args.report}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from vidlora.cli import run_command

    raise SystemExit(run_command("check", main, sys.argv[1:]))
