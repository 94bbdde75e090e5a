"""`vidlora cache`'s work: decode every video and image a data set names once, into a frame cache.

The samples go through training's own validation (:func:`~vidlora.data.dataset.prepare_sample`) so
the same files resolve; each distinct file is one job, run in worker processes. Valid entries are
hits (a rerun only computes what is missing or corrupt). A file that cannot be decoded is reported
with every sample that names it, and the other files are still filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from vidlora.data.dataset import (
    MediaFolders,
    ProblemKind,
    SampleProblem,
    classify_media_error,
    prepare_sample,
    read_samples,
)
from vidlora.data.frame_cache import CacheStats, FrameCache
from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, MediaError
from vidlora.data.parallel import map_in_processes
from vidlora.data.processor import Processor

MAX_PRINTED_PROBLEMS = 200
MB = 1e6


@dataclass(frozen=True)
class FillJob:
    """One media file to put into the cache (picklable: sent to worker processes)."""

    path: str
    kind: str  # "video" or "image"
    processor: Processor
    cache: FrameCache
    timeout_s: float


@dataclass
class FillResult:
    """One job's outcome: the entry's size, this job's lookups, or why the file failed."""

    entry_bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    problem: tuple[str, str] | None = None  # (kind, reason)


def fill_one(job: FillJob) -> FillResult:
    """Look up (or compute and store) one file's entry; never raises for a bad file."""
    counted = replace(job.cache.stats)
    result = FillResult()
    path = Path(job.path)
    try:
        if job.kind == "video":
            load = lambda: job.processor.load_video(path, timeout_s=job.timeout_s)  # noqa: E731
        else:
            load = lambda: job.processor.load_image(path)  # noqa: E731
        entry = job.cache.get(path, job.kind, job.processor, load)
        if entry.path is not None:
            result.entry_bytes = entry.path.stat().st_size
    except (MediaError, TimeoutError, ValueError) as exc:
        kind, reason = classify_media_error(path, exc)
        result.problem = (kind.value, reason)
    result.stats = job.cache.stats - counted
    return result


@dataclass
class FillReport:
    """What filling found: lookups, entry sizes per kind, failed files, samples with other problems."""

    stats: CacheStats
    files: dict[str, int]  # kind -> distinct files
    entry_bytes: dict[str, list[int]]  # kind -> size of each cached entry
    failures: list[SampleProblem]  # media files that could not be decoded, per sample naming them
    other_problems: list[SampleProblem]  # not about a media file (records, tokenization): `vidlora check`
    samples: int
    root: str
    disk: tuple[int, int]  # every entry under root: (count, bytes)
    stale_temp_files: int = 0  # left by killed writers, removed before filling

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "root": self.root,
            "samples": self.samples,
            "files": self.files,
            "stats": asdict(self.stats),
            "entries": {
                kind: {"count": len(sizes), "bytes": sum(sizes), "mean_bytes": _mean(sizes)}
                for kind, sizes in self.entry_bytes.items()
            },
            "disk": {"entries": self.disk[0], "bytes": self.disk[1]},
            "stale_temp_files_removed": self.stale_temp_files,
            "failures": [p.to_dict() for p in self.failures],
            "other_problems": [p.to_dict() for p in self.other_problems],
        }

    def format(self) -> str:
        """The summary `vidlora cache` prints."""
        files = self.files
        lines = [
            f"vidlora cache {self.root}: {files['video']} video(s) and {files['image']} image(s) "
            f"named by {self.samples} sample(s)",
            f"  {self.stats.format()}",
        ]
        parts = [
            f"{kind} entries {len(sizes)}, mean {_mean(sizes) / MB:.3f} MB"
            for kind, sizes in self.entry_bytes.items()
        ]
        total = sum(sum(sizes) for sizes in self.entry_bytes.values())
        lines.append("  " + "; ".join(parts) + f"; total {total / MB:.3f} MB")
        lines.append(f"  cache directory: {self.disk[0]} entries, {self.disk[1] / MB:.3f} MB")
        if self.stale_temp_files:
            lines.append(f"  removed {self.stale_temp_files} temporary file(s) left by killed writers")
        if self.other_problems:
            lines.append(
                f"  {len(self.other_problems)} problem(s) not about a media file (records, tokenization): "
                "run `vidlora check` with the same arguments"
            )
        if self.ok:
            lines.append("OK: every media file is cached")
            return "\n".join(lines)
        lines.append(f"FAILED: {len(self.failures)} sample media file(s) could not be cached:")
        lines += ["  " + p.format() for p in self.failures[:MAX_PRINTED_PROBLEMS]]
        if len(self.failures) > MAX_PRINTED_PROBLEMS:
            lines.append(
                f"  ... {len(self.failures) - MAX_PRINTED_PROBLEMS} more (all of them with --report)"
            )
        return "\n".join(lines)


def _mean(sizes: Sequence[int]) -> float:
    return sum(sizes) / len(sizes) if sizes else 0.0


def fill_cache(
    data_paths: Sequence[str | Path],
    processor: Processor,
    tokenizer: PreTrainedTokenizerBase,
    folders: MediaFolders,
    cache: FrameCache,
    *,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    workers: int = 1,
    progress: bool = True,
) -> FillReport:
    """Fill ``cache`` with every media file of ``data_paths`` as training reads them (module docstring)."""
    stale = cache.remove_stale_temp_files()
    samples, problems = read_samples(list(data_paths))
    failures = [p for p in problems if p.file is not None]
    other = [p for p in problems if p.file is None]
    named: dict[tuple[str, str], list[SampleProblem]] = {}  # (kind, file) -> a problem stub per sample
    for sample in samples:
        prepared = prepare_sample(sample, processor, tokenizer, folders)
        failures += [p for p in prepared.problems if p.file is not None]
        other += [p for p in prepared.problems if p.file is None]
        for kind, path in prepared.decodable_media():
            stub = SampleProblem(
                ProblemKind.UNREADABLE_MEDIA, "", sample.id, sample.index, str(sample.source), str(path)
            )
            named.setdefault((kind, str(path)), []).append(stub)
    keys = list(named)
    jobs = [FillJob(path, kind, processor, cache, decode_timeout) for kind, path in keys]
    results = map_in_processes(
        fill_one, jobs, workers, desc="fill frame cache", unit="file", progress=progress
    )
    stats = CacheStats()
    entry_bytes: dict[str, list[int]] = {"video": [], "image": []}
    for (kind, file), result in zip(keys, results, strict=True):
        stats += result.stats
        if result.entry_bytes:
            entry_bytes[kind].append(result.entry_bytes)
        if result.problem is not None:
            problem_kind, reason = result.problem
            failures += [
                replace(s, kind=ProblemKind(problem_kind), reason=reason) for s in named[(kind, file)]
            ]
    cache.stats += stats
    return FillReport(
        stats=stats,
        files={kind: sum(1 for k, _ in keys if k == kind) for kind in ("video", "image")},
        entry_bytes=entry_bytes,
        failures=failures,
        other_problems=other,
        samples=len(samples),
        root=str(cache.root),
        disk=cache.disk_usage(),
        stale_temp_files=stale,
    )
