"""The GPU benchmark and smoke run behind ``benchmarks/gpu.sh``: one command, one JSON + one table.

Usage: ``python benchmarks/gpu.py --out DIR [--dry-run] [--budget SECONDS]``

On one H100/H200 (``--dry-run``: the tiny model on this machine's CPU, 2 steps, the same code paths):

1. ``vidlora bench`` on ``videollava-7b`` with random bf16 weights initialised on the GPU: LoRA r=128,
   α=256, 8 frames, batch 1, video data, ZeRO off; gradient checkpointing on and off; sdpa, and
   flash-attention 2 when ``flash_attn`` is installed. Each run reports samples/s, tokens/s, MFU
   and ``max_memory_allocated``.
2. ``vidlora plan`` for each of those settings, with the bench data's longest sample, so the peak
   it predicts stands next to the one measured.
3. Smoke runs of the CUDA-only paths on the tiny model: the plain bf16 Trainer, single-GPU ZeRO-3
   with gradient checkpointing (needs ``deepspeed``), ``--bits 4`` (needs ``bitsandbytes``), and
   ``predict`` in bf16 on the GPU batched (8) vs one by one (1), answers compared.

A step that cannot run here (a package missing) is recorded as skipped with the reason; a failing
step is recorded with the tail of its output and the others still run. Writes ``DIR/gpu.json`` and
``DIR/gpu.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GB = 2**30


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Runner:
    """Runs steps as subprocesses within a total time budget and records each outcome."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.deadline, self.steps = out, time.monotonic() + budget_s, []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(self, name: str, command: list[str], *, skip: str | None = None, json_out: bool = False) -> Any:
        left = self.deadline - time.monotonic()
        step: dict[str, Any] = {"name": name, "command": " ".join(command)}
        self.steps.append(step)
        if skip is not None or left < 20:
            step["status"] = "skipped"
            step["reason"] = skip or "out of time budget"
            print(f"[gpu] {name}: skipped ({step['reason']})", file=sys.stderr, flush=True)
            return None
        print(f"[gpu] {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=left, env=self.env)
        except subprocess.TimeoutExpired:
            step.update(status="failed", reason="out of time budget", seconds=time.monotonic() - began)
            return None
        step["seconds"] = round(time.monotonic() - began, 1)
        (self.out / f"{name}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        if done.returncode != 0:
            step.update(status="failed", returncode=done.returncode, tail=done.stderr[-2000:])
            print(f"[gpu] {name}: FAILED (rc {done.returncode})", file=sys.stderr, flush=True)
            return None
        step["status"] = "ok"
        return json.loads(done.stdout) if json_out else done.stdout


def vidlora(*args: str) -> list[str]:
    return [sys.executable, "-m", "vidlora", *args]


def bench_and_plan(runner: Runner, dry: bool) -> list[dict[str, Any]]:
    model = "tiny" if dry else "videollava-7b"
    attentions = ["sdpa"] + (["flash_attention_2"] if has("flash_attn") and not dry else [])
    rows = []
    for checkpointing in ("True", "False"):
        for attention in attentions:
            tag = f"gc{checkpointing[0]}_{attention}"
            report = runner.run(
                f"bench_{tag}",
                vidlora(
                    "bench", "--model_name_or_path", model, "--data", "synthetic", "--num_samples", "12",
                    "--modalities", "video", "--baselines",
                    "--lora_r", "128", "--lora_alpha", "256", "--per_device_train_batch_size", "1",
                    "--gradient_checkpointing", checkpointing, "--bf16", "True",
                    "--attn_implementation", attention,
                    "--steps", "2" if dry else "10", "--warmup_steps", "1" if dry else "3",
                    "--dataloader_num_workers", "2", "--json",
                ),
                json_out=True,
            )  # fmt: skip
            row: dict[str, Any] = {"gradient_checkpointing": checkpointing, "attention": attention}
            rows.append(row)
            if report is None:
                continue
            train = report["mixes"]["video"]["scenarios"]["train"]
            row.update(
                samples_per_s=train["samples_per_s"],
                tokens_per_s=train["tokens_per_s"],
                trained_tokens_per_s=train["trained_tokens_per_s"],
                mfu=train.get("mfu"),
                data_wait=train["data_wait_fraction"],
                measured_peak_gb=train.get("peak_cuda_bytes", train["peak_rss_bytes"]) / GB,
                measured_kind="max_memory_allocated" if "peak_cuda_bytes" in train else "RSS (CPU)",
                gpu=report["machine"].get("gpu"),
            )
            sequence = train["sequence"]
            plan = runner.run(
                f"plan_{tag}",
                vidlora(
                    "plan", "--model_name_or_path", model, "--lora_enable", "True",
                    "--lora_r", "128", "--lora_alpha", "256", "--bf16", "True",
                    "--per_device_train_batch_size", "1", "--gradient_checkpointing", checkpointing,
                    "--model_max_length", str(sequence["max_text_tokens"]),
                    "--labelled_tokens", str(sequence["max_labelled_tokens"]),
                    "--modality", "video", "--json",
                ),
                json_out=True,
            )  # fmt: skip
            if plan is not None:
                # max_memory_allocated holds tensors only: compare without the CUDA context constant.
                row["predicted_peak_gb"] = plan["total_gb"] - plan["breakdown"]["cuda_overhead"]
                row["predicted_over_measured"] = row["predicted_peak_gb"] / row["measured_peak_gb"]
    return rows


def smoke(runner: Runner, work: Path, dry: bool) -> None:
    data = work / "data"
    runner.run("synth", vidlora("synth", "--out", str(data), "--train", "24", "--eval", "8"))
    device = ["--tf32", "False"] if dry else ["--tf32", "True"]
    common = [
        "--model_name_or_path", "tiny", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--data_path", str(data / "train.json"), "--video_folder", str(data), "--image_folder", str(data),
        "--group_by_modality_length", "True", "--bf16", "True", "--max_steps", "5",
        "--per_device_train_batch_size", "2", "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--dataloader_num_workers", "2", *device,
    ]  # fmt: skip
    checkpoint = work / "plain_bf16"
    runner.run("smoke_train_bf16", vidlora("train", *common, "--output_dir", str(checkpoint)))
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--module",
        "vidlora.train",
    ]
    runner.run(
        "smoke_zero3_checkpointing",
        [*launcher, *common, "--deepspeed", "configs/zero3.json", "--gradient_checkpointing", "True",
         "--output_dir", str(work / "zero3")],
        skip=None if has("deepspeed") else "deepspeed is not installed",
    )  # fmt: skip
    runner.run(
        "smoke_bits4",
        vidlora("train", *common, "--bits", "4", "--output_dir", str(work / "bits4")),
        skip=None if has("bitsandbytes") else "bitsandbytes is not installed",
    )
    placement = ["--device", "cpu" if dry else "cuda", "--dtype", "bfloat16"]
    answers = {}
    for batch in (8, 1):
        out = work / f"predict_b{batch}.jsonl"
        step = runner.run(
            f"smoke_predict_batch{batch}",
            vidlora(
                "predict", "--model_path", str(checkpoint), "--data_path", str(data / "eval.json"),
                "--video_folder", str(data), "--image_folder", str(data), "--out", str(out),
                "--batch_size", str(batch), *placement,
            ),
        )  # fmt: skip
        if step is not None and out.is_file():
            answers[batch] = [json.loads(line) for line in out.read_text().splitlines()]
    if len(answers) == 2:
        key = "prediction"
        same = sum(a[key] == b[key] for a, b in zip(answers[8], answers[1], strict=True))
        runner.steps.append(
            {"name": "predict_batched_vs_single", "status": "ok", "same_answers": f"{same}/{len(answers[1])}"}
        )


def table(rows: list[dict[str, Any]], steps: list[dict[str, Any]]) -> str:
    def num(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        "| checkpointing | attention | samples/s | tokens/s | trained tok/s | MFU | data wait "
        "| peak measured GB | measured as | peak predicted GB | predicted / measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gradient_checkpointing']} | {r['attention']} | {num(r.get('samples_per_s'), '.2f')} "
            f"| {num(r.get('tokens_per_s'), '.0f')} | {num(r.get('trained_tokens_per_s'), '.0f')} "
            f"| {num(r.get('mfu') and 100 * r['mfu'], '.1f')}{'' if r.get('mfu') is None else ' %'} "
            f"| {num(r.get('data_wait') and 100 * r['data_wait'], '.1f')} % "
            f"| {num(r.get('measured_peak_gb'), '.2f')} | {r.get('measured_kind', '–')} "
            f"| {num(r.get('predicted_peak_gb'), '.2f')} "
            f"| {num(r.get('predicted_over_measured'), '.2f')} |"
        )
    lines += ["", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in steps:
        note = s.get("reason") or s.get("same_answers") or (s.get("tail", "")[-160:].replace("\n", " "))
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where gpu.json, gpu.md and the logs go")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, 2 steps")
    parser.add_argument("--budget", type=float, default=450, help="seconds for everything")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if gpu is None and not args.dry_run:
        print("benchmarks/gpu.py: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    runner = Runner(out, args.budget)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vidlora-gpu-") as tmp:
        rows = bench_and_plan(runner, args.dry_run)
        smoke(runner, Path(tmp), args.dry_run)
    packages = {m: has(m) for m in ("flash_attn", "deepspeed", "bitsandbytes", "liger_kernel")}
    report = {
        "gpu": gpu or "none (dry run on the CPU, tiny model)",
        "dry_run": args.dry_run,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "packages": packages,
        "seconds": round(time.monotonic() - began, 1),
        "bench": rows,
        "steps": runner.steps,
    }
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    header = (
        f"GPU: {report['gpu']}; torch {torch.__version__}; optional packages: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in packages.items())
        + f"; {report['seconds']:.0f} s in all.\n\n"
    )
    (out / "gpu.md").write_text(header + table(rows, runner.steps) + "\n")
    print(header + table(rows, runner.steps))
    return 0 if all(s["status"] != "failed" for s in runner.steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
