"""One error policy: bad input to any command ends in `vidlora <cmd>: error: …` and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vidlora.cli import main

BAD_INPUT = [
    (("predict", "--model_path", "tiny", "--data_path", "missing.json", "--out", "p.jsonl"), "missing.json"),
    (("chat", "--model_path", "tiny", "--file", "missing.mp4"), "missing.mp4"),
    (("merge", "--model_path", "no/such_dir", "--out", "merged"), "no/such_dir"),
    (("merge", "--model_path", "tiny", "--out", "merged", "--layout", "hf"), "temporal attention"),
    (("train", "--data_path", "missing.json", "--output_dir", "out", "--tf32", "False"), "missing.json"),
    (
        ("train", "--data_path", "d.json", "--output_dir", "out", "--tf32", "False", "--num_frames", "16"),
        "16",
    ),
    (("check", "--data_path", "d.json", "--num_frames", "4"), "trained for 8 frames"),
    (("check", "--data_path", "d.json", "--X", "Audio"), "unknown modality"),
    (("eval", "--predictions", "missing.jsonl", "--out", "r.json"), "missing.jsonl"),
    (
        (
            "train",
            "--data_path",
            "d.json",
            "--output_dir",
            "out",
            "--tf32",
            "False",
            "--evaluation_strategy",
            "epoch",
        ),
        "cannot hold out 1 of 1",
    ),
    (
        ("train", "--data_path", "d.json", "--output_dir", "out", "--tf32", "False", "--version", "v9"),
        "unknown template",
    ),
    (("predict", "--model_path", "ckpt", "--data_path", "d.json", "--out", "p.jsonl"), "not valid JSON"),
]


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "adapter_config.json").write_text("{}")
    (tmp_path / "ckpt" / "vidlora_config.json").write_text("{not json")
    (tmp_path / "d.json").write_text(
        '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, '
        '{"from": "gpt", "value": "hello"}]}]'
    )
    return tmp_path


@pytest.mark.parametrize(("argv", "says"), BAD_INPUT)
def test_bad_input_is_one_line_error_and_exit_2(argv, says, in_empty_dir, capsys):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith(f"vidlora {argv[0]}: error: ")]
    assert error_lines and says in err, err


def test_launcher_entry_points_follow_the_same_policy(in_empty_dir):
    """`python -m vidlora.infer.predict` (what torchrun starts) prints the error, exits 2, no traceback."""
    argv = ["--model_path", "tiny", "--data_path", "missing.json", "--out", "p.jsonl"]
    result = subprocess.run(
        [sys.executable, "-m", "vidlora.infer.predict", *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("vidlora predict: error: ")
