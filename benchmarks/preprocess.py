"""Video pre-processing benchmark: the original's order (normalise, then resize) vs vidlora's
(resize and crop, then normalise).

Usage: ``python benchmarks/preprocess.py [--repeats N] [--frames T]``

Times :func:`vidlora.data.transforms.preprocess_video` against the original's order
(:func:`vidlora.bench.preprocess_video_original_order`), on random uint8 frames at 1280×720 and
1920×1080 (8 frames, the sample Video-LLaVA's video tower takes), with one thread and with torch's default thread count. A third column times a
resize done in uint8 (``F.interpolate`` accepts uint8 on CPU), which is faster still but rounds
every resized pixel to an integer; its error is printed to show why vidlora does not use it.
Prints a markdown table (median of ``--repeats`` interleaved runs, ms per sample).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vidlora.bench import preprocess_video_original_order
from vidlora.data.transforms import CLIP_MEAN, CLIP_STD, PixelSpec, preprocess_video, video_resize_shape

SIZES = ((720, 1280), (1080, 1920))
MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)
    return x[..., top : top + size, left : left + size]


def original_order(frames: torch.Tensor, size: int) -> torch.Tensor:
    """/255 and normalise at full resolution, then bilinear resize, then crop (the original; the
    same function `vidlora bench`'s straightforward baseline pre-processes with)."""
    return preprocess_video_original_order(frames.numpy(), size, CLIP_MEAN, CLIP_STD)


def uint8_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize in uint8, then crop, convert and normalise (rounds the resized pixels)."""
    x = frames.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=video_resize_shape(*x.shape[-2:], size), mode="bilinear", align_corners=False)
    return ((_crop(x, size).to(torch.float32) / 255.0 - MEAN) / STD).contiguous()


def time_ms(fn: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(frames)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (median reported)")
    parser.add_argument("--frames", type=int, default=8, help="frames per sample")
    args = parser.parse_args(argv)
    spec = PixelSpec()
    default_threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()} with "
        f"{os.cpu_count()} CPU cores; {args.frames} random uint8 frames per sample, median of "
        f"{args.repeats} interleaved runs, ms per sample.\n"
    )
    print(
        "| frames | threads | original order (normalise → resize → crop) | vidlora (resize → crop → normalise) "
        "| ratio | max abs diff | uint8 resize (not used) | its max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for height, width in SIZES:
            frames = torch.randint(0, 256, (args.frames, height, width, 3), dtype=torch.uint8)
            ref = original_order(frames, spec.image_size)
            diff = float((preprocess_video(frames, spec) - ref).abs().max())
            diff_u8 = float((uint8_resize(frames, spec.image_size) - ref).abs().max())
            methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                "old": lambda x: original_order(x, spec.image_size),
                "new": lambda x: preprocess_video(x, spec),
                "u8": lambda x: uint8_resize(x, spec.image_size),
            }
            runs: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
                for name, fn in methods.items():
                    runs[name].append(time_ms(fn, frames))
            old, new, u8 = (statistics.median(runs[k]) for k in ("old", "new", "u8"))
            print(
                f"| {width}×{height} ×{args.frames} | {threads} | {old:.1f} | {new:.1f} | {old / new:.1f}× "
                f"| {diff:.1e} | {u8:.1f} | {diff_u8:.1e} |"
            )
    torch.set_num_threads(default_threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
