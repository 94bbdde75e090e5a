"""The web UI tests' data and model: one synthetic dataset and one LoRA checkpoint of the tiny model
trained on it for 3 steps (in-process, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def webui_synth(tmp_path_factory) -> Path:
    from vidlora.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 8, 2, seed=0)
    return out


@pytest.fixture(scope="session")
def webui_checkpoint(webui_synth, tmp_path_factory) -> Path:
    from vidlora.args import parse_train_args
    from vidlora.training.recipe import run

    out = tmp_path_factory.mktemp("trained")
    synth = webui_synth
    argv = [
        "--model_name_or_path", "tiny", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--data_path", str(synth / "train.json"), "--video_folder", str(synth), "--image_folder", str(synth),
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--save_strategy", "no", "--report_to", "none", "--tf32", "False", "--dataloader_num_workers", "0",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    run(*parse_train_args(argv))
    return out
