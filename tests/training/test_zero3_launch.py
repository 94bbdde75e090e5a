"""CI's launcher check: a short 2-process DeepSpeed ZeRO-3 run in which the ranks hold different
modalities in the same step finishes, and trains exactly as one process does.

`deepspeed --num_gpus 2 --module vidlora.train --deepspeed configs/zero3.json` (2 CPU processes,
gloo) on 8 samples, per-device batch 1 x 2 ranks x accumulation 2, against one process with
accumulation 4. Modality grouping is off and sampling sequential, so the records' order decides
who gets what: the dataloader deals micro-batch j of a step to rank j mod 2, hence

    step 1: video, text, image, text  -> rank 0 decodes media while rank 1 has text only
    step 2: text, video, text, image  -> the other way round

Under ZeRO-3 every forward gathers each module's partitioned weights collectively, so a rank that
skipped a tower another rank runs would leave that rank waiting for ever; the Trainer runs both
towers and the projector every step (`run_all_towers`), which this run proves by finishing within
its timeout. Equality with one process holds for the reasons given in test_zero3_original_command.py
(same samples per step, loss normalised by the step's token count over ranks, fp32, no dropout).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launch import ZERO3, assert_same_training, deepspeed_command, run_launch

# Step by step, what the ranks get (micro-batch j -> rank j mod 2): media on one rank, text on the other.
ORDER = ["video", "text", "image", "text", "text", "video", "text", "image"]
STEPS = 2
# Finishing is the point: a rank stuck in a collective its peer never joins fails here instead of
# hanging the suite (the launch takes ~40 s on a quiet 2-core machine).
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ordered_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 of 12 synthetic records (2 video, 2 image, 4 text) laid out in ORDER."""
    from vidlora.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("ordered")
    generate_dataset(out, 12, 0, 0, mix={"video": 0.34, "image": 0.33, "text": 0.33})
    pool: dict[str, list[dict]] = {}
    for record in json.loads((out / "train.json").read_text()):
        pool.setdefault(record["modality"], []).append(record)
    (out / "ordered.json").write_text(json.dumps([pool[m].pop(0) for m in ORDER]))
    return out


@pytest.fixture(scope="module")
def runs(ordered_data, original_argv, train_in_process, tmp_path_factory):
    """(ZeRO-3 output dir, one-process output dir, one-process Trainer)."""
    flags = {
        "data_path": str(ordered_data / "ordered.json"),
        "video_folder": str(ordered_data),
        "image_folder": str(ordered_data),
        "group_by_modality_length": "False",
        "train_sampling_strategy": "sequential",
        "evaluation_strategy": "no",
        "per_device_train_batch_size": "1",
        "lora_dropout": "0",
        "save_steps": "1",
        "save_total_limit": None,
        "disable_tqdm": "True",
    }
    zero3_dir = tmp_path_factory.mktemp("zero3")
    argv = original_argv(zero3_dir, **flags, gradient_accumulation_steps="2", deepspeed=str(ZERO3))
    run_launch(deepspeed_command(argv), timeout=TIMEOUT_S)
    single_dir = tmp_path_factory.mktemp("single")
    single = train_in_process(original_argv(single_dir, **flags, gradient_accumulation_steps="4"))
    return zero3_dir, single_dir, single


def test_ranks_with_different_modalities_finish_and_equal_one_process(runs):
    zero3_dir, single_dir, single = runs
    assert_same_training(zero3_dir, single.state.log_history, single_dir, steps=STEPS)
    # Each step's checkpoint holds that step's weights, gathered whole from both ranks.
    assert sorted(p.name for p in zero3_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        first = load_file(str(zero3_dir / "checkpoint-1" / name))
        want = load_file(str(single_dir / "checkpoint-1" / name))
        assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in want.items()}
