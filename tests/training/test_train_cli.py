"""`vidlora train` end to end on the tiny model: the original's flags parse, bad flags are all reported
before any model loads, a NaN stops training without checkpointing the broken weights, and the
QLoRA (`--bits 4`) and rank-128 variants of the original's command train on the CPU.

Fixtures (`original_argv`, `train_in_process`, `synth_dir`) come from conftest.py.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from vidlora.args import ArgumentProblems, parse_train_args
from vidlora.cli import main as vidlora

ROOT = Path(__file__).resolve().parents[2]
ZERO3 = ROOT / "configs" / "zero3.json"


def main(argv: list[str]) -> int:
    """`vidlora train ARGV` through the CLI (its error policy included)."""
    return vidlora(["train", *argv])


def _logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _refuse_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load fail loudly, to prove argument checks come first."""
    import vidlora.model.loading

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(vidlora.model.loading, "load_pretrained", fail)


# -- argument handling (no training) ----------------------------------------------------------------


def test_every_flag_of_the_seed_command_is_accepted(original_argv, tmp_path):
    model, data, train = parse_train_args(original_argv(tmp_path / "out"), cuda_available=False)

    assert (model.model_name_or_path, model.version, model.X) == ("tiny", "v1", ["Video", "Image"])
    assert (model.mm_projector_type, model.mm_vision_select_layer) == ("mlp2x_gelu", -2)
    assert model.mm_use_x_start_end is False and model.mm_use_x_patch_token is False
    assert data.data_path == [str(Path(data.video_folder) / "train.json")]
    assert data.video_folder == data.image_folder and data.image_aspect_ratio == "pad"
    assert data.lazy_preprocess is True
    assert (train.lora_enable, train.lora_r, train.lora_alpha) == (True, 8, 16)
    assert train.group_by_modality_length is True and train.bf16 is False and train.tf32 is False
    assert (train.per_device_train_batch_size, train.per_device_eval_batch_size) == (2, 2)
    assert train.gradient_accumulation_steps == 2 and train.num_train_epochs == 1
    assert (train.save_steps, train.save_total_limit, train.logging_steps) == (5, 1, 1)
    assert train.learning_rate == 2e-4 and train.weight_decay == 0.0
    assert str(train.lr_scheduler_type.value) == "cosine" and str(train.save_strategy.value) == "steps"
    assert data.model_max_length == 2048 and train.gradient_checkpointing is True
    assert train.dataloader_num_workers == 0 and train.report_to == []
    assert Path(model.cache_dir).is_dir()
    # No GPU here: the Trainer is told to use the CPU.
    assert train.use_cpu is True


def test_old_flag_names_map_to_the_new_ones(original_argv, tmp_path):
    _, _, train = parse_train_args(original_argv(tmp_path / "out"), cuda_available=False)
    # --evaluation_strategy epoch -> eval_strategy; --warmup_ratio 0.03 -> warmup_steps 0.03
    # (transformers 5 reads a warmup_steps below 1 as a fraction of all steps).
    assert str(train.eval_strategy.value) == "epoch"
    assert train.warmup_steps == pytest.approx(0.03)


def test_every_problem_is_reported_at_once(original_argv, tmp_path, monkeypatch):
    _refuse_model_loading(monkeypatch)
    argv = original_argv(tmp_path / "out", tf32="True", report_to="wandb", bits="3", data_path=None)
    at = argv.index("--X")
    argv[at + 1 : at + 3] = ["Video", "Audio"]
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_args(argv, cuda_available=False)
    problems = caught.value.problems
    expected = ["--X Video Audio", "--bits 3", "--data_path is required", "--tf32 True"]
    if importlib.util.find_spec("wandb") is None:
        expected.append("--report_to wandb")
    assert len(problems) == len(expected), problems
    for start in expected:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)


def test_qlora_with_zero3_is_refused_with_the_other_problems(original_argv, tmp_path):
    argv = original_argv(tmp_path / "out", bits="4", deepspeed=str(ZERO3), tf32="True")
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_args(argv, cuda_available=False)
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("--bits 4 with a ZeRO-3 config") and "zero2.json" in problems[0]
    assert problems[1].startswith("--tf32 True")


def test_main_returns_2_and_prints_every_problem(original_argv, tmp_path, monkeypatch, capsys):
    _refuse_model_loading(monkeypatch)
    argv = original_argv(tmp_path / "out", bits="3", data_path=None, num_frames="0")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "vidlora train: error: 3 problem(s) with the arguments:" in err
    for text in (
        "--bits 3: use 4, 8 or 16.",
        "--data_path is required",
        "--num_frames 0: must be at least 1.",
    ):
        assert text in err
    assert not (tmp_path / "out").exists()


# -- training variants ------------------------------------------------------------------------------


def test_nan_loss_stops_training_and_keeps_only_earlier_checkpoints(original_argv, tmp_path, capsys):
    # No warmup and an absurd learning rate: step 1's update (lr 1e10) wrecks the weights; step 2's
    # loss still comes out finite (logits ~1e10) but its gradient norm is NaN, caught before the
    # optimizer step. Checkpoints every step: checkpoint-1 is the last good one.
    out = tmp_path / "out"
    argv = original_argv(
        out, learning_rate="1e10", warmup_ratio="0", max_grad_norm="0", save_steps="1",
        save_total_limit=None, max_steps="3", evaluation_strategy="no", disable_tqdm="True",
    )  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    message = next(line for line in err.splitlines() if line.startswith("vidlora train: training stopped"))
    # The step's four samples are named (which ones: tests/training/test_nonfinite.py pins them).
    assert message.startswith(
        "vidlora train: training stopped at step 2: the gradient norm is nan (the step's batch held samples "
    )
    assert "the latest checkpoint, checkpoint-1, is from before the failure" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "adapter_model.safetensors").exists()  # no final save of the broken weights


def test_rank_128_lora_trains_and_the_loss_falls(original_argv, train_in_process, tmp_path):
    # The original's rank/alpha on the tiny model (hidden size 128: r equals the width). A higher
    # learning rate than the original's so 8 steps show learning: the answers come from a closed set.
    argv = original_argv(
        tmp_path / "out", lora_r="128", lora_alpha="256", learning_rate="2e-3", max_steps="8",
        per_device_train_batch_size="2", gradient_accumulation_steps="1", save_steps="8",
        evaluation_strategy="no",
    )  # fmt: skip
    trainer = train_in_process(argv)
    losses = _logged_losses(trainer)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Measured: first three 6.518, last three 5.672 (a fall of 0.85 nats in 8 steps).
    assert last < first - 0.5, losses
    adapter = trainer.model.peft_config["default"]
    assert (adapter.r, adapter.lora_alpha) == (128, 256)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_4bit_trains_on_cpu_and_writes_a_checkpoint(original_argv, train_in_process, tmp_path):
    out = tmp_path / "out"
    argv = original_argv(out, bits="4", max_steps="2", save_steps="2", evaluation_strategy="no")
    trainer = train_in_process(argv)
    losses = _logged_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    ckpt = out / "checkpoint-2"
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors", "vidlora_config.json"):
        assert (ckpt / name).is_file(), name
    import bitsandbytes as bnb

    base = trainer.model.get_base_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.language_model.modules())


def test_projector_lr_has_its_own_groups_and_the_log_shows_the_main_rate(
    original_argv, train_in_process, tmp_path
):
    argv = original_argv(
        tmp_path / "out", mm_projector_lr="2e-5", warmup_ratio="0", max_steps="2", save_steps="2",
        per_device_train_batch_size="2", gradient_accumulation_steps="1", evaluation_strategy="no",
    )  # fmt: skip
    trainer = train_in_process(argv)
    base = trainer.model.get_base_model()
    projector = {id(p) for p in base.mm_projector.parameters()}
    lora = {id(p) for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" in n}
    groups = trainer.optimizer.param_groups
    grouped = [({id(p) for p in g["params"]}, g["initial_lr"], g["weight_decay"]) for g in groups]
    # LoRA (decay group; --weight_decay 0.) at --learning_rate, projector weights and biases at
    # --mm_projector_lr, in that order.
    assert [(ids <= lora, ids <= projector, lr) for ids, lr, _ in grouped] == [
        (True, False, 2e-4), (False, True, 2e-5), (False, True, 2e-5),
    ]  # fmt: skip
    assert set().union(*(ids for ids, _, _ in grouped)) == lora | projector
    # The logged rate is --learning_rate's schedule (no warmup: 2e-4 at step 1), not the projector's.
    rates = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    assert rates[0] == pytest.approx(2e-4)


def test_deepspeed_without_a_launcher_returns_2_before_loading(original_argv, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    _refuse_model_loading(monkeypatch)
    assert main(original_argv(tmp_path / "out", deepspeed=str(ZERO3))) == 2
    err = capsys.readouterr().err
    assert (
        "vidlora train: error: --deepspeed needs a distributed launcher (missing environment: RANK, LOCAL_RANK"
        in err
    )
    assert "deepspeed --num_gpus N --module vidlora.train" in err


def test_dataloader_defaults_read_in_workers_kept_between_epochs(original_argv, tmp_path):
    import os

    argv = original_argv(tmp_path / "out", dataloader_num_workers=None)
    _, _, train = parse_train_args(argv, cuda_available=False)
    assert train.dataloader_num_workers == min(4, os.cpu_count() or 1)
    assert train.dataloader_persistent_workers is True
    # torch refuses persistent workers without workers: 0 workers turn persistence off.
    _, _, train = parse_train_args(original_argv(tmp_path / "out"), cuda_available=False)
    assert (train.dataloader_num_workers, train.dataloader_persistent_workers) == (0, False)
    argv = original_argv(tmp_path / "out", dataloader_num_workers="2", dataloader_persistent_workers="False")
    _, _, train = parse_train_args(argv, cuda_available=False)
    assert (train.dataloader_num_workers, train.dataloader_persistent_workers) == (2, False)
