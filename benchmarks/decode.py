"""Decode benchmark: seek-based ``read_video`` (8 sampled frames) vs decoding every frame.

Usage: ``python benchmarks/decode.py [--out DIR] [--repeats N] [--results PATH] [--no-write]``

Generates deterministic h264 clips (``vidlora.data.synthetic.write_texture_clip``: 25 fps, libx264
preset veryfast, B-frames on):
60 s 1280×720 with libx264's default keyframe interval (250 frames = 10 s) and with a 2 s
interval (50 frames, typical of phones and streaming sites), and 10 s 398×224 (the size
Video-LLaVA's short-side resize works at). Then times, per clip:

* ``read_video``  – vidlora's reader: demux-only frame table + seek/decode of the 8 sampled frames;
* ``frame table`` – the demux-only pass alone (its share of ``read_video``);
* ``decode all``  – decode every frame in order and keep the 8 sampled ones (what a naive reader
  does; the cost of any reader that cannot seek). It converts to RGB the way ``read_video`` does
  (one reused swscale context), so the ratio is the seeking alone.

A second table times that conversion against PyAV's ``frame.to_ndarray(format="rgb24")``, which
builds a new swscale context for every frame: 2 s clips at 64×64 (the demo's), 398×224 and
1280×720, every frame converted both ways, pixels checked equal.

Both readers are checked to return the same frames (the clips carry their frame index in the
pixels). The table is printed and written to the decode section of ``benchmarks/RESULTS.md``
(between ``<!-- decode:begin -->`` and ``<!-- decode:end -->``; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vidlora.data.media import read_video, sample_indices
from vidlora.data.synthetic import read_frame_index as read_index
from vidlora.data.synthetic import write_texture_clip

BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"
FPS = 25
NUM_FRAMES = 8


@dataclass(frozen=True)
class Clip:
    name: str
    seconds: int
    width: int
    height: int
    gop: int | None  # keyframe interval in frames; None = libx264's default (250, plus scene cuts)


CLIPS = (
    Clip("60s_720p_gop250", 60, 1280, 720, None),
    Clip("60s_720p_gop50", 60, 1280, 720, 50),
    Clip("10s_224p_gop250", 10, 398, 224, None),
)


def encode_clip(clip: Clip, path: Path) -> None:
    write_texture_clip(path, clip.seconds, clip.width, clip.height, fps=FPS, gop=clip.gop)


def frame_table_only(path: Path) -> int:
    """The demux-only pass read_video starts with (packets read, nothing decoded)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_all(path: Path, num_frames: int) -> tuple[np.ndarray, int]:
    """Decode every frame in order, keeping (and converting to RGB) only the sampled ones.

    The count comes from the container's metadata (correct for these clips), so this is the
    cheapest possible sequential reader: no frame is held longer than needed.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames
        wanted = set(sample_indices(total, num_frames).tolist())
        kept = {}
        reformatter = VideoReformatter()
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = reformatter.reformat(frame, format="rgb24").to_ndarray()
        return np.stack([kept[i] for i in sample_indices(total, num_frames)]), total


@dataclass(frozen=True)
class Timing:
    """Median wall-clock and CPU (user + system, all threads of this process) seconds."""

    wall_s: float
    cpu_s: float


def measure(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time each function ``repeats`` times, interleaved, so a change in machine load hits all alike."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            results[name] = fn()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    timings = {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}
    return timings, results


def run(out_dir: Path, repeats: int) -> list[dict[str, object]]:
    rows = []
    for clip in CLIPS:
        path = out_dir / f"{clip.name}.mp4"
        if not path.exists():
            start = time.perf_counter()
            encode_clip(clip, path)
            print(f"encoded {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        timings, results = measure(
            {
                "read_video": lambda p=path: read_video(p, NUM_FRAMES),
                "table": lambda p=path: frame_table_only(p),
                "decode_all": lambda p=path: decode_all(p, NUM_FRAMES),
            },
            repeats,
        )
        frames, indices = results["read_video"]
        all_frames, total = results["decode_all"]
        got = [read_index(f) for f in frames]
        if got != indices.tolist() or [read_index(f) for f in all_frames] != got:
            raise RuntimeError(f"{path}: wrong frames: read_video {got}, expected {indices.tolist()}")
        rows.append(
            {
                "clip": f"{clip.name} ({clip.width}x{clip.height}, {total} frames, "
                f"{path.stat().st_size / 1e6:.1f} MB)",
                "total": total,
                **timings,
            }
        )
    return rows


CONVERT_CLIPS = (
    Clip("2s_64px", 2, 64, 64, None),
    Clip("2s_224p", 2, 398, 224, None),
    Clip("2s_720p", 2, 1280, 720, None),
)


def convert_rows(out_dir: Path, repeats: int) -> list[dict[str, object]]:
    """Per-frame RGB conversion: a new swscale context per frame vs one reused context."""
    rows = []
    for clip in CONVERT_CLIPS:
        path = out_dir / f"{clip.name}.mp4"
        if not path.exists():
            encode_clip(clip, path)
        with av.open(str(path)) as container:
            frames = list(container.decode(video=0))
        reformatter = VideoReformatter()
        timings, results = measure(
            {
                "per_frame": lambda f=frames: [x.to_ndarray(format="rgb24") for x in f],
                "reused": lambda f=frames, r=reformatter: [
                    r.reformat(x, format="rgb24").to_ndarray() for x in f
                ],
            },
            repeats,
        )
        if not all(
            np.array_equal(a, b) for a, b in zip(results["per_frame"], results["reused"], strict=True)
        ):
            raise RuntimeError(f"{path}: the two conversions differ")
        rows.append({"clip": f"{clip.name} ({clip.width}x{clip.height})", "frames": len(frames), **timings})
    return rows


def convert_table(rows: list[dict[str, object]]) -> str:
    lines = [
        '| clip | frames | `to_ndarray(format="rgb24")` ms / frame (wall / CPU) '
        "| reused `VideoReformatter` ms / frame (wall / CPU) | ratio (wall / CPU) |",
        "|---|---:|---|---|---|",
    ]
    for row in rows:
        per, reused, n = row["per_frame"], row["reused"], row["frames"]
        lines.append(
            f"| {row['clip']} | {n} | {1e3 * per.wall_s / n:.3f} / {1e3 * per.cpu_s / n:.3f} "
            f"| {1e3 * reused.wall_s / n:.3f} / {1e3 * reused.cpu_s / n:.3f} "
            f"| {per.wall_s / reused.wall_s:.1f}× / {per.cpu_s / reused.cpu_s:.1f}× |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, object]], repeats: int) -> str:
    lines = [
        f"PyAV {av.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} with {os.cpu_count()} CPU cores shared with other jobs (wall times move "
        f"±50% between runs; CPU time is steadier); median of {repeats} interleaved runs; {NUM_FRAMES} frames "
        "sampled with `np.linspace(0, n-1, 8, dtype=int)`; both readers verified to return the same frames.",
        "",
        "| clip | read_video s / 8-frame sample (wall / CPU) | read_video frames/s (wall) "
        "| of which frame table, demux only (wall s) | decode-all s / sample (wall / CPU) "
        "| decode-all frames/s decoded (wall) | decode-all / read_video (wall / CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seek, tab, full, total = row["read_video"], row["table"], row["decode_all"], row["total"]
        lines.append(
            f"| {row['clip']} | {seek.wall_s:.3f} / {seek.cpu_s:.3f} | {NUM_FRAMES / seek.wall_s:.1f} "
            f"| {tab.wall_s:.3f} | {full.wall_s:.2f} / {full.cpu_s:.2f} | {total / full.wall_s:.0f} "
            f"| {full.wall_s / seek.wall_s:.1f}× / {full.cpu_s / seek.cpu_s:.1f}× |"
        )
    return "\n".join(lines)


def replace_section(results: Path, begin: str, end: str, section: str) -> None:
    """Put ``section`` (markers included) between ``begin`` and ``end`` in ``results``, or append it;
    the rest of the file is kept."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)


def write_section(results: Path, body: str) -> None:
    replace_section(
        results, BEGIN, END, f"{BEGIN}\n## Decode (`python benchmarks/decode.py`)\n\n{body}\n{END}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the generated clips here (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        body = table(run(out_dir, args.repeats), args.repeats)
        body += "\n\nRGB conversion of decoded frames (same runs' settings):\n\n"
        body += convert_table(convert_rows(out_dir, args.repeats))
    print(body)
    if not args.no_write:
        write_section(args.results, body)
        print(f"wrote the decode section of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
