"""Projector pre-training (`--tune_mm_mlp_adapter True`, Video-LLaVA's stage 1): only the projector
trains, each checkpoint holds the projector alone (not a copy of the frozen model), and resuming
from one replays the uninterrupted run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidlora.model.keymaps import to_ours
from vidlora.model.presets import build_preset

NON_LORA = "non_lora_trainables.safetensors"
PROJECTOR_KEYS = [
    "mm_projector.0.bias",
    "mm_projector.0.weight",
    "mm_projector.2.bias",
    "mm_projector.2.weight",
]
# tiny: Linear(64 -> 128) + GELU + Linear(128 -> 128), float32
PROJECTOR_BYTES = 4 * (64 * 128 + 128 + 128 * 128 + 128)
FULL_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")


def _pretrain_argv(original_argv, out: Path, **overrides: str | None) -> list[str]:
    return original_argv(
        out,
        lora_enable="False",
        tune_mm_mlp_adapter="True",
        learning_rate="1e-3",
        save_steps="2",
        save_total_limit=None,
        **overrides,
    )


@pytest.fixture(scope="module")
def pretrain_run(original_argv, train_in_process, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pretrain")
    return train_in_process(_pretrain_argv(original_argv, out)), out


@pytest.mark.parametrize("where", ["checkpoint-2", "checkpoint-4", "checkpoint-5", "."])
def test_checkpoints_hold_the_projector_alone(pretrain_run, where):
    _, out = pretrain_run
    folder = out / where
    assert not [name for name in FULL_MODEL_FILES if (folder / name).exists()]
    saved = load_file(str(folder / NON_LORA))
    assert sorted(saved) == PROJECTOR_KEYS
    # Stage 2 reads the file with --pretrain_mm_mlp_adapter (the mm_adapter key layout).
    assert [to_ours(key, "mm_adapter") for key in sorted(saved)] == PROJECTOR_KEYS
    assert sum(t.numel() * t.element_size() for t in saved.values()) == PROJECTOR_BYTES
    assert (folder / NON_LORA).stat().st_size < PROJECTOR_BYTES + 4096  # header only on top
    for name in ("config.json", "vidlora_config.json", "tokenizer_config.json", "training_args.bin"):
        assert (folder / name).is_file(), name


def test_only_the_projector_moved(pretrain_run):
    trainer, out = pretrain_run
    untrained, _ = build_preset("tiny")
    trained = dict(trainer.model.named_parameters())
    for name, before in untrained.named_parameters():
        after = trained[name].detach()
        if name.startswith("mm_projector."):
            assert not torch.equal(after, before), name
        else:
            assert torch.equal(after, before), name
    final = load_file(str(out / NON_LORA))
    for key in PROJECTOR_KEYS:
        assert torch.equal(final[key], trained[key].detach()), key


def test_resume_replays_the_uninterrupted_pretraining(
    pretrain_run, original_argv, train_in_process, tmp_path
):
    reference, ref_out = pretrain_run
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(ref_out / "checkpoint-2", out / "checkpoint-2")
    resumed = train_in_process(
        _pretrain_argv(original_argv, out, resume_from_checkpoint=str(out / "checkpoint-2"))
    )

    def step_losses(trainer) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    assert sorted(step_losses(resumed)) == [1, 2, 3, 4, 5]
    assert step_losses(resumed) == step_losses(reference)
    got, want = load_file(str(out / NON_LORA)), load_file(str(ref_out / NON_LORA))
    for key in PROJECTOR_KEYS:
        assert torch.equal(got[key], want[key]), key


def test_resume_without_the_projector_file_is_refused(
    pretrain_run, original_argv, train_in_process, tmp_path
):
    _, ref_out = pretrain_run
    start = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(ref_out / "checkpoint-2", start)
    (start / NON_LORA).unlink()
    with pytest.raises(FileNotFoundError, match=r"non_lora_trainables\.safetensors is missing"):
        train_in_process(_pretrain_argv(original_argv, tmp_path / "out", resume_from_checkpoint=str(start)))
