"""Checkpoints of the original's command: each one is complete and loads on its own for inference, and
resuming from one replays the uninterrupted run exactly.

The uninterrupted run is conftest's reference run (5 steps, saves at steps 2 and 4 and at the last
step, every checkpoint kept). The interrupted run is simulated by copying its `checkpoint-2` into a
fresh output directory and starting a new Trainer there with `--resume_from_checkpoint`: what a
restarted job sees after a crash right after the step-2 save.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from vidlora.infer.load import load_for_inference

NON_LORA = "non_lora_trainables.safetensors"
CHECKPOINTS = ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
PROJECTOR_KEYS = [
    "mm_projector.0.bias",
    "mm_projector.0.weight",
    "mm_projector.2.bias",
    "mm_projector.2.weight",
]
# 2 LLM layers x 7 linears (q, k, v, o, gate, up, down) x (A, B)
ADAPTER_TENSORS = 2 * 7 * 2
RESUME_FROM = 2


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key].detach().cpu(), tensor.detach().cpu()), key


@pytest.mark.parametrize("where", [*CHECKPOINTS, "."])
def test_every_checkpoint_is_complete(reference_run, where):
    _, out = reference_run
    directory = out / where
    for name in ("adapter_config.json", "adapter_model.safetensors", NON_LORA, "config.json",
                 "vidlora_config.json", "tokenizer.json", "tokenizer_config.json"):  # fmt: skip
        assert (directory / name).is_file(), f"{where}/{name}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == CHECKPOINTS
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    assert len(adapter) == ADAPTER_TENSORS and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert sorted(load_file(str(directory / NON_LORA))) == PROJECTOR_KEYS
    data = json.loads((directory / "vidlora_config.json").read_text())
    processor = data["processor"]
    assert (processor["template"], processor["num_frames"], processor["image_aspect_ratio"]) == (
        "v1",
        8,
        "pad",
    )
    assert (processor["image_tokens"], processor["video_tokens"], processor["mm_vision_select_layer"]) == (
        16,
        136,
        -2,
    )
    assert data["base"]["model_name_or_path"] == "tiny" and data["format"] == 2
    training = data["training"]["training_args"]
    assert (training["lora_r"], training["lora_alpha"], training["lora_dropout"]) == (8, 16, 0.05)
    adapter_config = json.loads((directory / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 16)


def test_final_files_hold_the_trained_tensors(reference_run):
    trainer, out = reference_run
    base = trainer.model.get_base_model()
    projector = {f"mm_projector.{k}": v for k, v in base.mm_projector.state_dict().items()}
    adapter = get_peft_model_state_dict(trainer.model)
    for where in ("checkpoint-5", "."):  # the last step's checkpoint and the final save hold the same step
        _assert_same_tensors(load_file(str(out / where / NON_LORA)), projector)
        _assert_same_tensors(load_file(str(out / where / "adapter_model.safetensors")), adapter)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss curve, next to them
    # ... and training moved them: checkpoint-2 differs.
    early = load_file(str(out / "checkpoint-2" / NON_LORA))
    assert not torch.equal(early["mm_projector.0.weight"], projector["mm_projector.0.weight"])


@pytest.mark.parametrize("where", ["checkpoint-2", "."])
def test_a_checkpoint_loads_alone_for_inference(reference_run, where):
    _, out = reference_run
    directory = out / where
    loaded = load_for_inference(str(directory))
    model = loaded.model
    base = model.get_base_model()
    projector = {f"mm_projector.{k}": v for k, v in base.mm_projector.state_dict().items()}
    _assert_same_tensors(projector, load_file(str(directory / NON_LORA)))
    _assert_same_tensors(
        get_peft_model_state_dict(model), load_file(str(directory / "adapter_model.safetensors"))
    )
    processor = loaded.processor
    assert (processor.template, processor.num_frames, processor.image_aspect_ratio) == ("v1", 8, "pad")
    assert len(loaded.tokenizer) == base.get_input_embeddings().num_embeddings


def test_resume_replays_the_uninterrupted_run(reference_run, original_argv, train_in_process, tmp_path):
    reference, ref_out = reference_run
    out = tmp_path / "out"
    out.mkdir()
    start = out / f"checkpoint-{RESUME_FROM}"
    shutil.copytree(ref_out / f"checkpoint-{RESUME_FROM}", start)
    argv = original_argv(out, save_steps="2", save_total_limit=None, resume_from_checkpoint=str(start))
    resumed = train_in_process(argv)

    # The resumed state's log history starts with the checkpoint's (steps 1-2), then the new steps.
    got = _losses(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5]
    want = _losses(reference)
    # Exact on the CPU: same sampler order (group_by_modality_length replays the epoch and skips the
    # seen batches), same RNG (dropout 0.05 masks come from the restored rng_state), same optimizer
    # and scheduler state.
    assert got == want
    ref_eval = [e["eval_loss"] for e in reference.state.log_history if "eval_loss" in e]
    assert [e["eval_loss"] for e in resumed.state.log_history if "eval_loss" in e] == ref_eval
    for name in ("adapter_model.safetensors", NON_LORA):
        _assert_same_tensors(load_file(str(out / name)), load_file(str(ref_out / name)))


def test_resume_replays_the_next_epoch_too(synth_dir, original_argv, train_in_process, tmp_path):
    # A second epoch on a small set (the 4 eval samples as training data: 3 with media, 1 text-only),
    # one sample per step: 4 steps per epoch, 8 in all; the grouped sampler draws epoch 2's order from
    # (seed, epoch 1). Resuming from step 3 must replay the rest of epoch 1 and all of epoch 2.
    small = {
        "data_path": str(synth_dir / "eval.json"), "num_train_epochs": "2", "per_device_train_batch_size": "1",
        "gradient_accumulation_steps": "1", "evaluation_strategy": "no", "save_steps": "3", "save_total_limit": None,
    }  # fmt: skip
    whole = train_in_process(original_argv(tmp_path / "whole", **small))
    assert sorted(_losses(whole)) == list(range(1, 9))

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", out / "checkpoint-3")
    resumed = train_in_process(original_argv(out, **small, resume_from_checkpoint=str(out / "checkpoint-3")))
    assert _losses(resumed) == _losses(whole)
    for name in ("adapter_model.safetensors", NON_LORA):
        _assert_same_tensors(load_file(str(out / name)), load_file(str(tmp_path / "whole" / name)))
