"""Training benchmark: `vidlora bench` runs, written into the bench section of ``benchmarks/RESULTS.md``.

Usage: ``python benchmarks/bench.py NAME [vidlora bench options …] [--no-write]``

Runs ``vidlora bench`` with the given options (each scenario in its own process, all in this one
invocation so the ratios compare runs made at the same moment), prints the tables and puts them,
with the machine and the reproducing command, into the part ``NAME`` of the bench section
(between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->``, inside
``<!-- bench:begin -->`` … ``<!-- bench:end -->``; the rest of the file is kept). E.g.::

    python benchmarks/bench.py realres --data realres
    python benchmarks/bench.py synthetic --data synthetic
    python benchmarks/bench.py workers-realres --data realres --modalities mixed --baselines \\
        --dataloader_num_workers 0 1 2
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from decode import replace_section
from vidlora.bench import bench, format_markdown, parse_args

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEADER = "## Training throughput (`vidlora bench`, `python benchmarks/bench.py`)"


def machine_line(report: dict) -> str:
    m = report["machine"]
    where = (
        m.get("gpu") or f"{m['cpu_count']} CPU cores shared with other jobs (wall times move between runs)"
    )
    return f"{m['platform']}, {where}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}."


def write_part(name: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN not in text:
        replace_section(RESULTS, BEGIN, END, f"{BEGIN}\n{HEADER}\n{END}")
        text = RESULTS.read_text()
    part_begin, part_end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    part = f"{part_begin}\n{body}\n{part_end}"
    head, rest = text.split(BEGIN, 1)
    inside, tail = rest.split(END, 1)
    if part_begin in inside and part_end in inside:
        before, after = inside.split(part_begin, 1)
        inside = before + part + after.split(part_end, 1)[1]
    else:
        inside = inside.rstrip("\n") + "\n\n" + part + "\n"
    RESULTS.write_text(head + BEGIN + inside + END + tail)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    name, options = argv[0], [a for a in argv[1:] if a != "--no-write"]
    started = time.perf_counter()
    report = bench(parse_args(options))
    minutes = (time.perf_counter() - started) / 60
    body = (
        f"### {name}\n\n`vidlora bench {shlex.join(options)}` ({minutes:.0f} min, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n{machine_line(report)}\n\n"
        + format_markdown(report)
    )
    print(body)
    if "--no-write" not in argv:
        write_part(name, body)
        print(f"wrote the {name} part of the bench section of {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
