"""A normal run says nothing the user cannot act on: `vidlora train` (2 steps on the tiny model), `predict`
and `chat` (stdin) each in a fresh interpreter with every warning shown (``PYTHONWARNINGS=default``),
and no line of their output mentions a warning or a deprecation except vidlora's own, listed here.

What the optional packages print when imported (bitsandbytes through PEFT, DeepSpeed through
accelerate) is filtered by :mod:`vidlora.quiet`; each command is its own process because each imports
them on its own path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vidlora.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
#: vidlora's own warnings that a normal tiny run may print (each says what to do); none at present.
ALLOWED: tuple[str, ...] = ()
NOISE = re.compile(r"warn|deprecat", re.IGNORECASE)


def _run(args: list[str], cwd: Path, stdin: str = "") -> str:
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "vidlora.cli", *args],
        cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if NOISE.search(line) and not line.startswith(ALLOWED)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A 2-step tiny run from configs/tiny_lora.yaml on 4 synthetic samples; returns the run's folder and output."""
    root = tmp_path_factory.mktemp("quiet")
    generate_dataset(root / "demo_data", 4, 2, seed=0)
    output = _run([
        "train", str(ROOT / "configs" / "tiny_lora.yaml"), "--max_steps", "2", "--disable_tqdm", "True",
    ], cwd=root)  # fmt: skip
    return root, output


def test_train_prints_no_warning(trained):
    _, output = trained
    assert "vidlora train: 2 steps" in output
    assert _noise(output) == []


def test_chat_prints_no_warning(trained):
    root, _ = trained
    video = next((root / "demo_data" / "videos").iterdir())
    chatted = _run(
        [
            "chat",
            "--model_path",
            str(root / "out" / "tiny_lora"),
            "--file",
            str(video),
            "--max_new_tokens",
            "2",
        ],
        root,
        stdin="what?\n",
    )
    assert "USER:" in chatted and _noise(chatted) == []


@pytest.mark.slow
def test_predict_prints_no_warning(trained):
    root, _ = trained
    data = [
        "--data_path",
        "demo_data/eval.json",
        "--video_folder",
        "demo_data",
        "--image_folder",
        "demo_data",
    ]
    predicted = _run(
        ["predict", "--model_path", str(root / "out" / "tiny_lora"), *data, "--out", "preds.jsonl",
         "--max_new_tokens", "2"],
        root,
    )  # fmt: skip
    assert (root / "preds.jsonl").is_file() and _noise(predicted) == []
