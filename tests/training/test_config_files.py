"""`vidlora train config.yaml [--flag value …]`: the file holds the same flags as the command line, is
checked by the same parser, and a run's resolved `config.yaml` gives back its arguments and reruns it.

Fixtures (`original_argv`, `synth_dir`) come from conftest.py.
"""

from __future__ import annotations

import json
import shlex
from itertools import accumulate
from pathlib import Path

import pytest
import yaml

from vidlora.args import ArgumentProblems, format_config, parse_train_config, train_config
from vidlora.cli import main as vidlora
from vidlora.training.run_dir import CONFIG_FILE, FINISHED_FILE

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_the_resolved_config_parses_back_to_the_same_arguments(original_argv, tmp_path):
    argv = original_argv(tmp_path / "out", overwrite_output_dir="True")
    *parsed, config = parse_train_config(argv, cuda_available=False)
    path = tmp_path / "config.yaml"
    path.write_text(format_config(config))
    *again, config_again = parse_train_config([str(path)], cuda_available=False)
    # An action of one invocation is not part of the run: rerunning its config must not delete it.
    assert "overwrite_output_dir" not in config and parsed[2].overwrite_output_dir is True
    assert again[2].overwrite_output_dir is False
    parsed[2].overwrite_output_dir = False
    assert again == parsed
    assert config_again == config
    text = path.read_text()
    assert "X: [Video, Image]\n" in text and "lora_r: 8\n" in text and "hub_token" not in text


def test_command_line_flags_override_the_file(synth_dir, tmp_path):
    path = _write(
        tmp_path / "run.yaml",
        {"lora_enable": True, "lora_r": 8, "X": ["Image"], "data_path": str(synth_dir / "train.json")},
    )
    model, _, train, _ = parse_train_config(
        [str(path), "--lora_r", "4", "--output_dir", str(tmp_path / "o")], cuda_available=False
    )
    assert (train.lora_enable, train.lora_r, model.X) == (True, 4, ["Image"])
    # The DeepSpeed launcher puts --local_rank=N first: the file is still found.
    _, _, train, _ = parse_train_config(["--local_rank=0", str(path)], cuda_available=False)
    assert train.lora_r == 8


def test_unknown_keys_are_named_with_the_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"lora_alhpa": 8, "lora_enable": True, "vidoe_folder": "x"})
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_config([str(path)], cuda_available=False)
    assert caught.value.problems == [
        f"{path}: unknown key 'lora_alhpa': not a flag of vidlora train (did you mean 'lora_alpha'?)",
        f"{path}: unknown key 'vidoe_folder': not a flag of vidlora train (did you mean 'video_folder'?)",
    ]


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"lora_r": "eight"}, "argument --lora_r: invalid int value: 'eight'"),
        ({"lr_scheduler_type": "wavy"}, "argument --lr_scheduler_type: invalid choice: 'wavy'"),
        ({"num_frames": [8, 16]}, "num_frames: a list of 2, but --num_frames takes one value"),
        ({"lora_alpha": None}, "lora_alpha: None; give a value"),
    ],
)
def test_wrong_values_are_refused_by_the_command_lines_parser(tmp_path, mapping, expected):
    path = _write(tmp_path / "bad.yaml", mapping)
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_config([str(path)], cuda_available=False)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: ") and expected in problem, problem


def test_a_bad_config_is_one_error_line_through_the_cli(tmp_path, capsys):
    path = _write(tmp_path / "bad.yaml", {"lora_rr": 8})
    assert vidlora(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"vidlora train: error: 1 problem(s) with the arguments:\n  - {path}: unknown key 'lora_rr'" in err


def _script_flags() -> list[str]:
    """The flags `scripts/finetune_lora.sh` passes on a GPU with its default variables."""
    script = (ROOT / "scripts" / "finetune_lora.sh").read_text()
    # NAME=${NAME:-default}
    defaults = {
        line.split("=", 1)[0]: line.split(":-", 1)[1].rstrip("}")
        for line in script.splitlines()
        if "=${" in line and ":-" in line and not line.startswith(" ")
    }
    command = script[script.index("exec deepspeed") :].replace("\\\n", " ")
    tokens = shlex.split(command.split('"$@"')[0])
    flags = tokens[tokens.index("vidlora.train") + 1 :]
    out = []
    for token in flags:
        if token == "${DEVICE_FLAGS[@]}":
            out += ["--tf32", "True"]  # the script's GPU branch
        elif token.startswith("$"):
            out.append(defaults[token.lstrip("$")])
        else:
            out.append(token)
    return out


def test_finetune_lora_yaml_holds_the_scripts_flags():
    flags = _script_flags()
    assert flags[:2] == ["--deepspeed", "configs/zero3.json"] and "--lora_r" in flags
    assert train_config([str(ROOT / "configs" / "finetune_lora.yaml")]) == train_config(flags)
    # The comparison is not vacuous: one flag apart differs.
    assert train_config([str(ROOT / "configs" / "finetune_lora.yaml"), "--lora_r", "64"]) != train_config(
        flags
    )


def test_the_tiny_config_trains_and_its_resolved_config_reruns_the_run(synth_dir, tmp_path, capsys):
    """configs/tiny_lora.yaml runs on the CPU; its run's config.yaml reproduces the run: rerun as is, it
    is finished; with more steps it resumes from the run's checkpoint instead of mismatching."""
    out = tmp_path / "tiny"
    data = [
        "--data_path", str(synth_dir / "train.json"), "--eval_data_path", str(synth_dir / "eval.json"),
        "--video_folder", str(synth_dir), "--image_folder", str(synth_dir),
    ]  # fmt: skip
    argv = [str(ROOT / "configs" / "tiny_lora.yaml"), *data, "--output_dir", str(out), "--max_steps", "2"]
    assert vidlora(["train", *argv, "--disable_tqdm", "True"]) == 0
    first = (out / CONFIG_FILE).read_text()
    assert yaml.safe_load(first)["max_steps"] == 2 and (out / FINISHED_FILE).is_file()
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()

    assert vidlora(["train", str(out / CONFIG_FILE)]) == 0
    assert f"{out} holds this run, finished at step 2: nothing to do" in capsys.readouterr().err

    assert vidlora(["train", str(out / CONFIG_FILE), "--max_steps", "3"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in err and "--max_steps: 2 -> 3" in err
    assert yaml.safe_load((out / CONFIG_FILE).read_text())["max_steps"] == 3
    assert (out / "checkpoint-3").is_dir()
    # The resumed run's cumulative token count goes on from the checkpoint's.
    history = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in history] == [1, 2, 3]
    assert [e["trained_tokens_total"] for e in history] == list(
        accumulate(e["trained_tokens"] for e in history)
    )
