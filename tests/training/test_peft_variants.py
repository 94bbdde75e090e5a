"""PEFT's LoRA variants through `vidlora train`: DoRA, rsLoRA, LoRA+ and `--lora_target` train on the tiny
model, are saved with the checkpoint and load back for inference (and merge) with the trained logits.

Fixtures (`original_argv`, `train_in_process`) come from conftest.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vidlora.args import ArgumentProblems, parse_train_args
from vidlora.errors import UsageError
from vidlora.infer.load import load_for_inference
from vidlora.infer.merge import merge
from vidlora.model.loading import load_pretrained
from vidlora.model.lora import apply_recipe, build_lora_config, lora_target_module_names
from vidlora.training.run_dir import run_identity

LR, RATIO, PROJECTOR_LR = 2e-4, 16.0, 2e-5
Q_PROJ = "language_model.model.layers.0.self_attn.q_proj"


def _inputs(tokenizer, config, seed=0):
    """A text+video input with exactly the expanded video tokens."""
    ids = tokenizer("USER: what moves? ASSISTANT:")["input_ids"]
    input_ids = torch.tensor([ids[:1] + [config.video_token_id] * config.video_seq_length + ids[1:]])
    vc = config.video_config
    shape = (1, vc.num_frames, 3, vc.image_size, vc.image_size)
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": pixels,
    }


def _train(original_argv, train_in_process, out, **flags):
    argv = original_argv(out, max_steps="2", save_steps="2", evaluation_strategy="no", **flags)
    return train_in_process(argv)


@pytest.fixture(scope="module")
def dora_run(original_argv, train_in_process, tmp_path_factory):
    """DoRA on q_proj and v_proj only, with LoRA+ and a projector learning rate of its own."""
    out = tmp_path_factory.mktemp("dora")
    argv = original_argv(
        out, max_steps="2", save_steps="2", evaluation_strategy="no", use_dora="True",
        loraplus_lr_ratio=str(RATIO), mm_projector_lr=str(PROJECTOR_LR), learning_rate=str(LR),
    )  # fmt: skip
    return train_in_process([*argv, "--lora_target", "q_proj", "v_proj"]), out


@torch.no_grad()
def test_dora_checkpoint_loads_and_merges_with_the_trained_logits(dora_run, tmp_path):
    trainer, out = dora_run
    config = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is False
    assert config["target_modules"] == r"^language_model\.(?:.*\.)?(?:q_proj|v_proj)$"
    trained = trainer.model.eval()
    loaded = load_for_inference(str(out))
    inputs = _inputs(loaded.tokenizer, loaded.model.get_base_model().config)
    trained_logits = trained(**inputs).logits
    torch.testing.assert_close(loaded.model(**inputs).logits, trained_logits, atol=1e-6, rtol=1e-6)
    layers = {
        n.rsplit(".", 1)[-1] for n, _ in loaded.model.named_modules() if n.endswith("lora_magnitude_vector")
    }
    assert layers == {"lora_magnitude_vector"}

    merged_dir = merge(str(out / "checkpoint-2"), None, str(tmp_path / "merged"), layout="ours")
    merged_logits = load_for_inference(str(merged_dir)).model(**inputs).logits
    base_logits = load_pretrained("tiny").model.eval()(**inputs).logits
    torch.testing.assert_close(merged_logits, trained_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3


def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(dora_run):
    trainer, _ = dora_run
    model = trainer.model
    lr_of = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = [n for n in named if ".lora_B." in n]
    a = [n for n in named if ".lora_A." in n]
    projector = [n for n in named if "mm_projector" in n]
    magnitude = [n for n in named if "lora_magnitude_vector" in n]
    # 2 layers x (q_proj, v_proj); the projector's 2 linears, weight and bias.
    assert (len(a), len(b), len(magnitude), len(projector)) == (4, 4, 4, 4)
    assert [lr_of[id(named[n])] for n in b] == pytest.approx([3.2e-3] * 4)  # 2e-4 x 16
    assert [lr_of[id(named[n])] for n in a + magnitude] == pytest.approx([2e-4] * 8)
    assert [lr_of[id(named[n])] for n in projector] == pytest.approx([2e-5] * 4)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(LR)  # what the Trainer logs
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(named)


def test_rslora_scales_by_alpha_over_sqrt_r_and_loads_back(original_argv, train_in_process, tmp_path):
    trainer = _train(original_argv, train_in_process, tmp_path / "rs", use_rslora="True")
    q_proj = trainer.model.get_base_model().get_submodule(Q_PROJ)
    assert q_proj.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # lora_alpha 16, lora_r 8
    loaded = load_for_inference(str(tmp_path / "rs"))
    loaded_q = loaded.model.get_base_model().get_submodule(Q_PROJ)
    assert loaded_q.scaling["default"] == pytest.approx(5.656854)
    inputs = _inputs(loaded.tokenizer, loaded.model.get_base_model().config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, trainer.model.eval()(**inputs).logits)


def test_plain_lora_scales_by_alpha_over_r():
    loaded = load_pretrained("tiny")
    model = apply_recipe(loaded.model, build_lora_config(loaded.model, 8, 16))
    assert model.get_base_model().get_submodule(Q_PROJ).scaling["default"] == 2.0


def test_lora_target_names_are_checked_against_the_llm():
    model = load_pretrained("tiny").model
    assert [n.rsplit(".", 1)[-1] for n in lora_target_module_names(model, ["o_proj"])] == ["o_proj", "o_proj"]
    assert len(lora_target_module_names(model, ["all-linear"])) == 14  # 2 layers x 7 linears
    with pytest.raises(UsageError) as caught:
        lora_target_module_names(model, ["q_proj", "qkv", "fc1"])
    message = str(caught.value)
    assert "'qkv' is not a linear layer of the LLM" in message
    assert "'fc1' is a layer of the towers or the projector only" in message
    assert (
        "Valid names: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"
        in message
    )


def test_variant_flags_are_checked_with_the_others(original_argv, tmp_path):
    argv = original_argv(tmp_path / "o", lora_enable="False", use_dora="True", loraplus_lr_ratio="0")
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_args([*argv, "--lora_target", "all-linear", "q_proj"], cuda_available=False)
    assert caught.value.problems == [
        "--lora_target all-linear q_proj: all-linear already means every linear layer of the LLM; give it "
        "alone, or only layer names.",
        "--loraplus_lr_ratio 0.0: must be positive (16 is usual).",
        "--use_dora True, --loraplus_lr_ratio 0.0, --lora_target all-linear q_proj: LoRA settings, which need "
        "--lora_enable True.",
    ]


def test_variants_belong_to_the_run_identity_and_old_records_still_match():
    identity = run_identity({}, {}, {"lora_r": 8})
    assert identity == run_identity({}, {}, {"lora_r": 8, "use_dora": False, "lora_target": ["all-linear"]})
    assert identity != run_identity({}, {}, {"lora_r": 8, "use_dora": True})
    assert identity != run_identity({}, {}, {"lora_r": 8, "lora_target": ["q_proj"]})
