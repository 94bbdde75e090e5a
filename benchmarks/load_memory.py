"""Host memory of loading Video-LLaVA-7B weights: peak RSS per shard byte, and the full 7B extrapolated.

    python benchmarks/load_memory.py [--layers 2] [--workdir /tmp/vidlora-load-memory] [--src SRC]

Writes one realistic shard — random bf16 weights for the first ``--layers`` decoder layers of the
7B LLM, with the original Video-LLaVA key names — as a legacy ``pytorch_model-00001-of-00002.bin``
(zip-format ``torch.save``, as the original's shards are) and as safetensors, then loads each into the
meta-built ``videollava-7b`` preset (only that shard's tensors are materialised) in a fresh process
per case, and reads the process's peak RSS (``VmHWM``) and its anonymous / file-backed RSS after
loading from ``/proc/self/status``. ``--src`` runs the loader of another source tree (an earlier
release, for a before/after table); the shard files are deleted at the end.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
CASES = [  # (file format, load dtype)
    ("bin", "float32"),
    ("bin", "bfloat16"),
    ("safetensors", "float32"),
    ("safetensors", "bfloat16"),
]


def status_kib() -> dict[str, int]:
    """The kB fields of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, …)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def shard_tensors(layers: int):
    """Our keys and shapes of decoder layers 0..layers-1 of the meta-built 7B model."""
    from vidlora.model.loading import load_pretrained

    model = load_pretrained("videollava-7b", device="meta").model
    prefixes = tuple(f"language_model.model.layers.{i}." for i in range(layers))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}
    total = sum(p.numel() for p in model.parameters())
    return shapes, total


def write_shards(workdir: Path, layers: int) -> tuple[dict[str, Path], int, int]:
    """The same random bf16 tensors as a zip-format .bin and as safetensors; (files, shard bytes, 7B params)."""
    import torch
    from safetensors.torch import save_file

    from vidlora.model.keymaps import from_ours

    shapes, total_params = shard_tensors(layers)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in sorted(shapes.items()):
        original = from_ours(key, "original")
        assert original is not None, key
        tensors[original] = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {
        "bin": workdir / "pytorch_model-00001-of-00002.bin",
        "safetensors": workdir / "model-00001-of-00002.safetensors",
    }
    torch.save(tensors, files["bin"])
    save_file(tensors, str(files["safetensors"]), metadata={"format": "pt"})
    shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return files, shard_bytes, total_params


def child(path: Path, dtype_name: str) -> None:
    """One case in a fresh process: build the meta 7B, load the shard, print one JSON line."""
    import torch

    import vidlora
    from vidlora.model.layouts import WeightSource
    from vidlora.model.loading import _assign_weights, load_pretrained
    from vidlora.model.report import LoadReport

    dtype = getattr(torch, dtype_name)
    model = load_pretrained("videollava-7b", device="meta").model
    before = status_kib()
    report = LoadReport(layout="original", source=str(path))
    # The same call on releases whose loader had no device argument (they loaded on the CPU).
    extra = (
        {"device": torch.device("cpu")} if "device" in inspect.signature(_assign_weights).parameters else {}
    )
    start = time.perf_counter()
    _assign_weights(model, [WeightSource([path], "original")], dtype, report, fresh_ok=False, **extra)
    seconds = time.perf_counter() - start
    loaded_status = status_kib()
    loaded = [p for p in model.parameters() if not p.is_meta]
    assert {p.dtype for p in loaded} == {dtype}, "weights not in the requested dtype"
    # A memory-mapped weight is resident once read: read every page, as a forward pass (or a copy
    # to the GPU) does, with a stride of 1 KiB (bf16) / 2 KiB (fp32) so no large temporary is made.
    with torch.no_grad():
        checksum = sum(float(p.detach().reshape(-1)[::512].float().sum()) for p in loaded)
    after = status_kib()
    print(
        json.dumps(
            {
                "src": str(Path(vidlora.__file__).parent),
                "loaded_tensors": report.sources[0].loaded,
                "loaded_bytes": sum(p.numel() * p.element_size() for p in loaded),
                "per_file_device": bool(extra),
                "rss_before": before["VmRSS"] * 1024,
                "anon_before": before["RssAnon"] * 1024,
                "peak_loaded": loaded_status["VmHWM"] * 1024,
                "peak": after["VmHWM"] * 1024,
                "checksum": checksum,
                "rss_after": after["VmRSS"] * 1024,
                "anon_after": after["RssAnon"] * 1024,
                "file_after": after["RssFile"] * 1024,
                "file_before": before["RssFile"] * 1024,
                "seconds": seconds,
            }
        )
    )


def run_case(path: Path, dtype: str, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), dtype],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the shard (405 MB each)")
    parser.add_argument("--workdir", default="/tmp/vidlora-load-memory")
    parser.add_argument("--src", default=None, help="source tree whose loader to measure (PYTHONPATH)")
    parser.add_argument(
        "--full_shard_gb", type=float, default=10.0, help="largest shard of a full checkpoint (GB)"
    )
    parser.add_argument("--child", nargs=2, metavar=("FILE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return 0

    import torch

    workdir = Path(args.workdir)
    try:
        files, shard_bytes, total_params = write_shards(workdir, args.layers)
        rows = [(fmt, dtype, run_case(files[fmt], dtype, args.src)) for fmt, dtype in CASES]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    src = rows[0][2]["src"]
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; loader: {src}"
    )
    print(
        f"shard: layers 0-{args.layers - 1} of the 7B LLM, {shard_bytes / GIB:.2f} GiB of bf16 "
        f"({rows[0][2]['loaded_tensors']} tensors); full model {total_params / 1e9:.2f} B parameters\n"
    )
    print(
        "| file | load dtype | s | peak − before, loaded (GiB) | peak − before, all weights read (GiB) "
        "| ÷ shard | resident after: anon / file (GiB) | full 7B on the CPU: peak (GiB) "
        "| full 7B to a GPU: host peak (GiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    full_shard = args.full_shard_gb * 1e9
    full_bytes = total_params * 2  # the 7B model in bf16, as it is shipped
    for fmt, dtype, r in rows:
        base = r["rss_before"]
        peak = r["peak"] - base
        kept = r["rss_after"] - base  # resident per shard once every weight was read
        ratio_peak, ratio_kept = peak / shard_bytes, kept / shard_bytes
        # CPU: every shard stays resident; the transient (peak - kept) of the largest shard comes on top.
        cpu = base + ratio_kept * full_bytes + (ratio_peak - ratio_kept) * full_shard
        # GPU: a loader that sends tensors to the device file by file holds one shard's peak at a
        # time; one without a device argument built the whole model on the host first (= the CPU case).
        gpu = base + ratio_peak * full_shard if r["per_file_device"] else cpu
        anon = r["anon_after"] - r["anon_before"]
        file = r["file_after"] - r["file_before"]
        print(
            f"| {fmt} | {dtype} | {r['seconds']:.1f} | {(r['peak_loaded'] - base) / GIB:.2f} "
            f"| {peak / GIB:.2f} | {ratio_peak:.2f} | {anon / GIB:.2f} / {file / GIB:.2f} "
            f"| {cpu / GIB:.1f} | {gpu / GIB:.1f} |"
        )
    print(
        f"\nbefore loading: RSS {rows[0][2]['rss_before'] / GIB:.2f} GiB (imports + the meta-built 7B); "
        f"extrapolation: full 7B = {full_bytes / GIB:.1f} GiB of bf16, largest shard {args.full_shard_gb:g} GB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
