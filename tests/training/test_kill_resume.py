"""The kill suite: SIGKILL `vidlora train` at chosen and random moments, rerun the exact same
command, and compare with the uninterrupted run.

The run: the original's flags on the tiny model, 2 epochs of 5 steps, a checkpoint every 2 steps
(`--save_total_limit` 1 or 2), evaluation every 3 steps on 12 eval samples (long enough to be
hit). The uninterrupted run is the same command in-process, once. After every kill the output
directory is checked for what the kill must leave (the previous complete checkpoint intact, at
most one partial directory), then the same command runs again, and may be killed again; the
last launch runs to the end. Equal means exactly equal: the logged losses (training and eval),
learning rates and gradient norms of every step, and every tensor of the final adapter and
projector — the Trainer restores the optimizer, scheduler and RNG states, the sampler order is a
function of the seed and epoch, and the tiny model runs in fp32 on the CPU with the same kernels.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path

import pytest
import torch
from killing import (
    Outcome,
    after_step,
    before_training,
    during_eval,
    during_save,
    launch,
    train_command,
)
from safetensors.torch import load_file

from conftest import original_flags, with_flags
from vidlora.training.run_dir import COMPLETE_MARKER, FINISHED_FILE, checkpoint_problem

STEPS = 10  # 15 training samples after grouping -> 5 steps of 4 per epoch, 2 epochs
EVAL_EVERY = 3
SAVE_EVERY = 2
WEIGHT_FILES = ("adapter_model.safetensors", "non_lora_trainables.safetensors")
LOGGED = ("loss", "eval_loss", "learning_rate", "grad_norm", "trained_tokens")


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    from vidlora.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("kill_data")
    generate_dataset(out, 16, 12, 0)
    return out


def kill_argv(data: Path, output_dir: Path, cache: Path, **overrides: str) -> list[str]:
    flags = {
        "num_train_epochs": "2",
        "save_steps": str(SAVE_EVERY),
        "save_total_limit": "2",
        "evaluation_strategy": "steps",
        "eval_steps": str(EVAL_EVERY),
        "per_device_eval_batch_size": "1",
        "disable_tqdm": "True",
    }
    argv = with_flags(original_flags(data, output_dir, cache), **{**flags, **overrides})
    return [*argv, "--eval_data_path", str(data / "eval.json")]


def _history(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [
        {k: e[k] for k in ("step", *LOGGED) if k in e} for e in state["log_history"] if set(LOGGED) & set(e)
    ]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in WEIGHT_FILES for k, v in load_file(str(output_dir / name)).items()}


def assert_same_run(got: Path, want: Path) -> None:
    assert _history(got) == _history(want)
    got_weights, want_weights = _weights(got), _weights(want)
    assert sorted(got_weights) == sorted(want_weights)
    for key, tensor in want_weights.items():
        assert torch.equal(got_weights[key], tensor), key


@pytest.fixture(scope="module")
def uninterrupted(kill_data, tmp_path_factory):
    """The same command, never killed (in-process): what every killed-and-rerun sequence must equal."""
    from vidlora.train import main

    cache = tmp_path_factory.mktemp("kill_cache")

    def run(output_dir: Path, **overrides: str) -> Path:
        assert main(kill_argv(kill_data, output_dir, cache, **overrides)) == 0
        return output_dir

    return run, cache


def assert_kill_left_a_resumable_directory(outcome: Outcome, output_dir: Path) -> None:
    """What a SIGKILL at any moment must leave: every checkpoint-N complete, at most one partial."""
    assert outcome.killed, outcome.output[-3000:]
    assert len(outcome.partial_dirs) <= 1
    for name in outcome.checkpoints:
        assert checkpoint_problem(output_dir / name) is None, name
    assert not (output_dir / FINISHED_FILE).exists()


def rerun_to_the_end(command: list[str], output_dir: Path) -> Outcome:
    done = launch(command, output_dir)
    assert done.returncode == 0, done.output[-4000:]
    return done


def test_killed_mid_save_the_rerun_resumes_from_the_previous_checkpoint_and_equals_the_uninterrupted_run(
    kill_data, uninterrupted, tmp_path
):
    """The short version for the default suite: one epoch, `--save_total_limit 1`, killed while
    checkpoint-4 is being written — checkpoint-2 must survive (no rotation before the new one is
    complete) and the rerun resumes from it."""
    run, cache = uninterrupted
    overrides = {"num_train_epochs": "1", "save_total_limit": "1"}
    want = run(tmp_path / "uninterrupted", **overrides)
    out = tmp_path / "killed"
    command = train_command(kill_argv(kill_data, out, cache, **overrides))

    killed = launch(
        command, out, lambda progress, directory: progress.step >= 4 and during_save()(progress, directory)
    )
    assert_kill_left_a_resumable_directory(killed, out)
    assert killed.partial_dirs == [".partial-checkpoint-4"] and killed.checkpoints == ["checkpoint-2"]

    done = rerun_to_the_end(command, out)
    assert "removed .partial-checkpoint-4: a checkpoint that was being written" in done.output
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in done.output
    assert_same_run(out, want)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]
    assert (out / "checkpoint-5" / COMPLETE_MARKER).is_file()

    # Rerunning a finished run: exit 0, no training, nothing written.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = rerun_to_the_end(command, out)
    assert "finished at step 5: nothing to do" in again.output and "'loss'" not in again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.slow
def test_kill_suite_five_moments_one_process(kill_data, uninterrupted, tmp_path):
    """Five kills in one sequence, each rerun killed again: while loading, at two random moments
    in a step, while a checkpoint is written, during evaluation; then the last rerun finishes."""
    run, cache = uninterrupted
    want = run(tmp_path / "uninterrupted")
    out = tmp_path / "killed"
    command = train_command(kill_argv(kill_data, out, cache))
    rng = random.Random(11)
    kills = [
        ("loading", before_training(rng.uniform(1.0, 4.0))),
        ("random step", after_step(rng.randint(1, 3), rng.uniform(0.0, 0.5))),
        # Eval at step 6 runs after step 6's training log and before its save.
        ("evaluation", during_eval(2 * EVAL_EVERY)),
        ("saving", lambda p, d: p.step >= 8 and during_save()(p, d)),
        ("random step", after_step(9, rng.uniform(0.0, 0.5))),
    ]
    for moment, trigger in kills:
        outcome = launch(command, out, trigger)
        assert_kill_left_a_resumable_directory(outcome, out)
        if moment == "loading":
            assert outcome.step == 0 and outcome.checkpoints == []
        if moment == "evaluation":
            assert outcome.step == 6 and "checkpoint-6" not in outcome.checkpoints
            assert "'eval_loss'" not in outcome.output.split("'loss'")[-1], (
                "the kill came after the evaluation"
            )
        if moment == "saving":
            assert outcome.partial_dirs == [".partial-checkpoint-8"]
    done = rerun_to_the_end(command, out)
    assert "resuming from" in done.output
    assert_same_run(out, want)


# -- two processes, DeepSpeed ZeRO-3 ------------------------------------------------------------------

ZERO3 = Path(__file__).resolve().parents[2] / "configs" / "zero3.json"
# Cross-rank reductions sum in a fixed order, so a resumed ZeRO-3 run normally replays bit for bit;
# the tolerances are test_zero3_original_command's (fp32 sums in another order, 1e-8 measured).
ZERO3_LOSS_TOL, ZERO3_TENSOR_TOL = 1e-5, 1e-6


def _deepspeed_command(argv: list[str], port: int) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    assert launcher.is_file(), f"the project installs deepspeed (dev extra); {launcher} is missing"
    return [str(launcher), "--num_gpus", "2", "--master_port", str(port), "--module", "vidlora.train", *argv]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_close_run(got: Path, want: Path) -> None:
    got_h, want_h = _history(got), _history(want)
    assert [e["step"] for e in got_h] == [e["step"] for e in want_h]
    for a, b in zip(got_h, want_h, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=ZERO3_LOSS_TOL), (a["step"], key)
    got_w, want_w = _weights(got), _weights(want)
    assert sorted(got_w) == sorted(want_w)
    for key, tensor in want_w.items():
        torch.testing.assert_close(got_w[key], tensor, rtol=0, atol=ZERO3_TENSOR_TOL, msg=key)


@pytest.mark.slow
def test_kill_suite_zero3_two_processes(kill_data, tmp_path):
    """`deepspeed --num_gpus 2 … --deepspeed configs/zero3.json`, its whole process group killed
    twice (mid-step, then while checkpoint-4 is written by both ranks), rerun as is each time."""
    cache = tmp_path / "cache"
    env = {"DS_ACCELERATOR": "cpu"}
    flags = {
        "num_train_epochs": "1",
        "lora_dropout": "0",
        "per_device_train_batch_size": "1",
        "deepspeed": str(ZERO3),
    }
    full_env = {**os.environ, **env}
    want = tmp_path / "uninterrupted"
    done = launch(
        _deepspeed_command(kill_argv(kill_data, want, cache, **flags), _free_port()), want, env=full_env
    )
    assert done.returncode == 0, done.output[-4000:]

    out = tmp_path / "killed"
    command = _deepspeed_command(kill_argv(kill_data, out, cache, **flags), _free_port())
    rng = random.Random(5)
    for moment, trigger in [
        ("random step", after_step(rng.randint(1, 2), rng.uniform(0.0, 0.5))),
        ("saving", lambda p, d: p.step >= 4 and during_save()(p, d)),
    ]:
        outcome = launch(command, out, trigger, env=full_env)
        assert_kill_left_a_resumable_directory(outcome, out)
        if moment == "saving":
            assert outcome.partial_dirs == [".partial-checkpoint-4"]
            assert outcome.checkpoints == ["checkpoint-2"]
    done = launch(command, out, env=full_env)
    assert done.returncode == 0, done.output[-4000:]
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in done.output
    assert_close_run(out, want)
