"""Shared fixtures for the training tests: one synthetic dataset per session, the original's command
line for it, and one reference training run (the original's flags on the tiny model) that the golden,
checkpoint and resume tests all read.

Training runs in-process through ``vidlora.train.run`` so each run costs seconds, not a fresh
interpreter's imports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# The dataset every training test uses: 16 training samples (one is held out for the original's
# `--evaluation_strategy epoch`), 4 eval samples, seed 0, 64 px, 16 frames at 8 fps.
SYNTH_TRAIN, SYNTH_EVAL, SYNTH_SEED = 16, 4, 0
# The reference run: the original's flags with saves every 2 steps and every checkpoint kept.
# 15 samples, one modality group per step, 4 per step -> 5 optimizer steps in the epoch.
REFERENCE_STEPS = 5
REFERENCE_SAVE_STEPS = 2


def original_flags(data_dir: Path, output_dir: Path, cache_dir: Path) -> list[str]:
    """The original's LoRA command (Video-LLaVA's finetune_lora.sh, as in the issue) with its data paths
    swapped for the synthetic set, the tiny model, `--tf32 False` (no NVIDIA GPU) and
    `--report_to none`; sizes as in the issue's single-process run."""
    return [
        "--model_name_or_path", "tiny",
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--version", "v1",
        "--data_path", str(data_dir / "train.json"),
        "--video_folder", str(data_dir),
        "--image_folder", str(data_dir),
        "--X", "Video", "Image",
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_x_start_end", "False",
        "--mm_use_x_patch_token", "False",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--bf16", "False",
        "--output_dir", str(output_dir),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--evaluation_strategy", "epoch",
        "--save_strategy", "steps",
        "--save_steps", "5",
        "--save_total_limit", "1",
        "--learning_rate", "2e-4",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--tf32", "False",
        "--model_max_length", "2048",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--cache_dir", str(cache_dir),
        "--report_to", "none",
    ]  # fmt: skip


def with_flags(argv: list[str], **overrides: str | None) -> list[str]:
    """``argv`` with ``--name value`` replaced (or appended); a value of None removes the flag.

    Only single-valued flags can be overridden this way (``--X`` and ``--data_path`` take lists).
    """
    out = list(argv)
    for name, value in overrides.items():
        flag = f"--{name}"
        if flag in out:
            at = out.index(flag)
            del out[at : at + 2]
        if value is not None:
            out += [flag, value]
    return out


def losses(trainer) -> list[float]:
    """The logged training losses, in step order."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's synthetic dataset (train.json, eval.json, videos/, images/)."""
    from vidlora.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, SYNTH_TRAIN, SYNTH_EVAL, SYNTH_SEED)
    return out


@pytest.fixture(scope="session")
def original_argv(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[str]]:
    """``original_argv(output_dir, **overrides)``: the original's command line on the session dataset."""
    cache = tmp_path_factory.mktemp("cache")

    def build(output_dir: Path, **overrides: str | None) -> list[str]:
        return with_flags(original_flags(synth_dir, output_dir, cache), **overrides)

    return build


@pytest.fixture(scope="session")
def train_in_process() -> Callable[[list[str]], object]:
    """``train_in_process(argv)``: parse like `vidlora train` and run; returns the Trainer."""
    from vidlora.args import parse_train_args
    from vidlora.training.recipe import run

    def train(argv: list[str]):
        model_args, data_args, train_args = parse_train_args([*argv, "--disable_tqdm", "True"])
        return run(model_args, data_args, train_args)

    return train


@pytest.fixture(scope="session")
def reference_run(original_argv, train_in_process, tmp_path_factory: pytest.TempPathFactory):
    """The original's flags, saving every 2 steps and keeping every checkpoint (checkpoint-2, -4 and the
    final step's -5).

    Returns ``(trainer, output_dir)``; tests must not modify the directory.
    """
    out = tmp_path_factory.mktemp("reference")
    argv = original_argv(out, save_steps=str(REFERENCE_SAVE_STEPS), save_total_limit=None)
    trainer = train_in_process(argv)
    return trainer, out
