"""Watchdog benchmark: what decoding in a watched child process (training's default) costs per sample.

Usage: ``PYTHONPATH=src python benchmarks/watchdog.py [--out DIR] [--repeats N] [--results PATH] [--no-write]``

Times ``read_video`` (8 sampled frames) in this process against the same call through
``vidlora.data.watchdog.DecodeWatchdog`` (request over a pipe, decode in the child, the frames back as
raw bytes), interleaved, on the synthetic training clips (64x64, what the tests train on) and two of
``benchmarks/decode.py``'s clips (398x224 and 60 s 1280x720 with a 2 s keyframe interval: 22 MB of
frames per sample through the pipe, the costliest transfer). Frames are checked equal. Also reported:
the one-off start of a child (a fresh interpreter importing PyAV) and its resident memory. The table
goes into the watchdog section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from decode import CLIPS, NUM_FRAMES, encode_clip, replace_section
from vidlora.data.media import read_video
from vidlora.data.synthetic import generate_dataset
from vidlora.data.watchdog import DecodeWatchdog

BEGIN, END = "<!-- watchdog:begin -->", "<!-- watchdog:end -->"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clips(out_dir: Path) -> list[tuple[str, Path]]:
    synthetic = out_dir / "synthetic"
    if not synthetic.exists():
        generate_dataset(synthetic, 16, 0, 0)
    found = [("synthetic 64x64 (16 frames)", sorted((synthetic / "videos").glob("*.mp4"))[0])]
    for clip in CLIPS:
        if clip.name in ("10s_224p_gop250", "60s_720p_gop50"):
            path = out_dir / f"{clip.name}.mp4"
            if not path.exists():
                encode_clip(clip, path)
            found.append((f"{clip.name} ({clip.width}x{clip.height})", path))
    return found


def run(out_dir: Path, repeats: int) -> tuple[list[dict[str, object]], float, float]:
    found = clips(out_dir)
    dog = DecodeWatchdog()
    try:
        began = time.perf_counter()
        dog(found[0][1], NUM_FRAMES)
        startup = time.perf_counter() - began
        rows = []
        for name, path in found:
            inline: list[float] = []
            watched: list[float] = []
            for _ in range(repeats):
                began = time.perf_counter()
                want, _ = read_video(path, NUM_FRAMES)
                inline.append(time.perf_counter() - began)
                began = time.perf_counter()
                got, _ = dog(path, NUM_FRAMES)
                watched.append(time.perf_counter() - began)
                if not np.array_equal(got, want):
                    raise RuntimeError(f"{path}: the watchdog returned other frames")
            rows.append(
                {
                    "clip": name,
                    "mb": want.nbytes / 1e6,
                    "inline": statistics.median(inline),
                    "watched": statistics.median(watched),
                }
            )
        assert dog.pid is not None
        rss = _rss_mb(dog.pid)
    finally:
        dog.close()
    return rows, startup, rss


def table(rows: list[dict[str, object]], startup: float, rss: float, repeats: int) -> str:
    lines = [
        f"Python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPU cores shared "
        f"with other jobs; median of {repeats} interleaved runs; {NUM_FRAMES} frames per sample; frames "
        f"checked equal. A child starts once per reading process (each DataLoader worker): {startup:.2f} s, "
        f"{rss:.0f} MB resident after the runs below.",
        "",
        "| clip | frames per sample (MB) | in-process s / sample | watchdog s / sample | overhead ms / sample |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        inline, watched = float(row["inline"]), float(row["watched"])  # type: ignore[arg-type]
        lines.append(
            f"| {row['clip']} | {float(row['mb']):.2f} | {inline:.4f} | {watched:.4f} "  # type: ignore[arg-type]
            f"| {1e3 * (watched - inline):+.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the generated clips here (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=9, help="runs per measurement (median reported)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows, startup, rss = run(out_dir, args.repeats)
    body = table(rows, startup, rss, args.repeats)
    print(body)
    if not args.no_write:
        section = f"{BEGIN}\n## Decode watchdog (`python benchmarks/watchdog.py`)\n\n{body}\n{END}"
        replace_section(args.results, BEGIN, END, section)
        print(f"wrote the watchdog section of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
