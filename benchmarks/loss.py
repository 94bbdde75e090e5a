"""Loss benchmark: the head and loss at the labelled positions only vs full ``[B, L, vocab]`` logits.

Usage: ``python benchmarks/loss.py [--no-write]``

With labels, `VideoLlavaForCausalLM` runs the LM head only where a loss is taken (about 10 % of a
video sample's positions: the rest are media, system prompt and question). The baseline is the
model called without labels (every position's logits) and transformers' ``ForCausalLMLoss`` on them,
which is what the LLM's own loss does. Each case runs in a fresh process (its peak RSS is its own),
one thread, one forward + backward after a warm-up, best of 3; both losses are printed (equal).
The table goes into the loss section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from decode import replace_section

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- loss:begin -->", "<!-- loss:end -->"
CASES = ((130, 64, 256, 4), (32064, 256, 2048, 2), (32064, 1024, 2048, 1))  # vocab, hidden, L, B


def one(mode: str, vocab: int, hidden: int, length: int, batch: int) -> dict[str, float]:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.loss.loss_utils import ForCausalLMLoss

    from vidlora.model.configuration import LanguageBindVideoConfig, VideoLlavaConfig
    from vidlora.model.modeling import VideoLlavaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tower = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    config = VideoLlavaConfig(
        text_config=text,
        image_config=CLIPVisionConfig(**tower),
        video_config=LanguageBindVideoConfig(**tower, num_frames=4),
        image_token_id=vocab - 2,
        video_token_id=vocab - 1,
        pad_token_id=0,
    )
    model = VideoLlavaForCausalLM(config)
    ids = torch.randint(3, vocab - 3, (batch, length))
    labels = ids.clone()
    labels[:, : int(length * 0.9)] = -100  # 90 % of positions take no loss, as in a video sample

    def step() -> float:
        if mode == "labelled":
            loss = model(input_ids=ids, labels=labels).loss
        else:
            loss = ForCausalLMLoss(model(input_ids=ids).logits, labels, vocab)
        loss.backward()
        model.zero_grad()
        return float(loss)

    step()
    times, loss = [], 0.0
    for _ in range(3):
        began = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - began)
    return {
        "ms": 1e3 * min(times),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)  # internal: one case in this process
    args = parser.parse_args(argv)
    if args.case:
        mode, *sizes = args.case
        print(json.dumps(one(mode, *map(int, sizes))))
        return 0
    rows = [
        "| vocab | hidden | B × L | full logits ms | labelled only ms | speed-up | full peak RSS MB "
        "| labelled peak RSS MB | loss (both) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for vocab, hidden, length, batch in CASES:
        got = {}
        for mode in ("full", "labelled"):
            command = [
                sys.executable,
                __file__,
                "--case",
                mode,
                str(vocab),
                str(hidden),
                str(length),
                str(batch),
            ]
            got[mode] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        full, lab = got["full"], got["labelled"]
        rows.append(
            f"| {vocab} | {hidden} | {batch} × {length} | {full['ms']:.0f} | {lab['ms']:.0f} "
            f"| {full['ms'] / lab['ms']:.1f}× | {full['peak_mb']:.0f} | {lab['peak_mb']:.0f} "
            f"| {full['loss']:.6f} / {lab['loss']:.6f} |"
        )
        print(rows[-1], flush=True)
    body = (
        "## Loss at the labelled positions (`python benchmarks/loss.py`)\n\n"
        "2-layer LLaMA, one thread, one forward + backward (best of 3) with 90 % of positions at -100; "
        "full = every position's logits + transformers' `ForCausalLMLoss`, labelled = vidlora's forward "
        "with labels. Peak RSS of a fresh process per case.\n\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        replace_section(RESULTS, BEGIN, END, f"{BEGIN}\n{body}\n{END}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
