"""API server benchmark: requests/s and latency of `vidlora serve` for 1 client vs N concurrent ones.

Usage: ``PYTHONPATH=src python benchmarks/serve.py [--model_path tiny] [--requests 16] [--clients 8]
[--max_tokens 16] [--results PATH] [--no-write]``

Starts the server in this process on a free port (uvicorn, the app `vidlora serve` runs), then sends
the same video questions (a synthetic clip by file://, greedy, ``max_tokens`` each, the `openai`
client) first one after the other from one client, then from ``--clients`` threads at once. Answers
must be equal both ways (batching changes no answer); the table gives requests/s, latency and how
many ``generate`` calls the engine made. The table goes into the serve section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from decode import replace_section
from vidlora.data.synthetic import generate_dataset
from vidlora.infer.adapters import ModelSet, parse_adapters
from vidlora.serve.app import ServeSettings, create_app
from vidlora.serve.media import MediaPolicy

BEGIN, END = "<!-- serve:begin -->", "<!-- serve:end -->"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(app) -> tuple[str, object]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return url, server
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the server did not start")


def run(args: argparse.Namespace) -> str:
    import openai

    media = Path(tempfile.mkdtemp(prefix="vidlora-bench-serve-"))
    generate_dataset(media, 8, 0, 0)
    videos = sorted((media / "videos").glob("*.mp4"))
    models = ModelSet.load(
        args.model_path, adapters=parse_adapters(args.adapters), device=args.device, dtype="auto"
    )
    app = create_app(models, ServeSettings(media=MediaPolicy(allowed_dir=media)), max_batch_size=args.clients)
    url, server = _serve(app)
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    questions = [
        (videos[i % len(videos)], f"Question {i}: what moves in the video?") for i in range(args.requests)
    ]

    def ask(question) -> tuple[float, str, int]:
        video, text = question
        began = time.perf_counter()
        reply = client.chat.completions.create(
            model=models.names[0],
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"file://{video}"}}, {"type": "text", "text": text}]}],
            temperature=0, max_tokens=args.max_tokens,
        )  # fmt: skip
        return (
            time.perf_counter() - began,
            reply.choices[0].message.content or "",
            reply.usage.completion_tokens,
        )

    ask(questions[0])  # warm-up: first-call allocations, thread pools
    rows, answers = [], {}
    for clients in (1, args.clients):
        engine = app.state.engine
        batches = engine.batches
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = list(pool.map(ask, questions))
        wall = time.perf_counter() - began
        answers[clients] = [text for _, text, _ in results]
        latencies = sorted(latency for latency, _, _ in results)
        tokens = sum(n for _, _, n in results)
        rows.append((clients, wall, latencies, tokens, engine.batches - batches))
    server.should_exit = True
    if answers[1] != answers[args.clients]:
        raise SystemExit("answers differ between sequential and concurrent requests")
    base_rate = len(questions) / rows[0][1]
    lines = [
        f"{len(questions)} video questions, {args.max_tokens} tokens each (greedy), model `{args.model_path}`, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}.",
        "",
        "| clients | wall s | requests/s | tokens/s | latency p50 s | latency p95 s | generate calls | vs 1 client |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, wall, latencies, tokens, calls in rows:
        rate = len(questions) / wall
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        lines.append(
            f"| {clients} | {wall:.2f} | {rate:.2f} | {tokens / wall:.1f} | {statistics.median(latencies):.3f} | "
            f"{p95:.3f} | {calls} | {rate / base_rate:.2f}x |"
        )
    lines.append("")
    lines.append("Answers were equal, request by request, in both runs.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", default="tiny")
    parser.add_argument("--adapters", nargs="*", default=[])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    table = run(args)
    print(table)
    if not args.no_write:
        section = f"{BEGIN}\n## API server (`python benchmarks/serve.py`)\n\n{table}\n{END}"
        replace_section(args.results, BEGIN, END, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
