"""One error policy: bad input to any command ends in `vidlora <cmd>: error: …` and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

BUG = pytest.mark.xfail(strict=True, reason="bug: tracebacks on bad input")


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vidlora", *argv], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(
            ("predict", "--model_path", "tiny", "--data_path", "missing.json", "--out", "p.jsonl"),
            "missing.json",
            marks=BUG,
        ),
        pytest.param(("chat", "--model_path", "tiny", "--file", "missing.mp4"), "missing.mp4", marks=BUG),
        pytest.param(("merge", "--model_path", "no/such_dir", "--out", "merged"), "no/such_dir", marks=BUG),
        pytest.param(
            ("train", "--data_path", "missing.json", "--output_dir", "out", "--tf32", "False"),
            "missing.json",
            marks=BUG,
        ),
        (("eval", "--predictions", "missing.jsonl", "--out", "r.json"), "missing.jsonl"),
    ],
)
def test_bad_input_is_one_line_error_and_exit_2(argv, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [
        line for line in result.stderr.splitlines() if line.startswith(f"vidlora {argv[0]}: error: ")
    ]
    assert error_lines and says in result.stderr
