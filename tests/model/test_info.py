"""Parameter counts (hand counts), the LoRA recipe (which modules, what trains) and `vidlora info`."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from torch import nn

from vidlora import info as info_command
from vidlora.model import info
from vidlora.model.lora import apply_recipe, build_lora_config, lora_target_module_names, lora_target_modules
from vidlora.model.presets import build_preset


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny", seed=0)


def tiny_hand_counts(vocab: int) -> dict[str, int]:
    """The tiny preset counted by hand from its sizes.

    LLM: hidden h=128, FFN f=256, 2 layers, 4 heads (no GQA), untied head, no biases.
    Towers: CLIP ViT, width d=64, MLP 256, 2 layers, 64 px / patch 16 -> 16 patches + CLS; 8 frames.
    """
    h, f, n_llm = 128, 256, 2
    llm_layer = 4 * h * h + 3 * h * f + 2 * h  # q,k,v,o + gate,up,down + two RMSNorms
    llm = n_llm * llm_layer + 2 * vocab * h + h  # + embed_tokens, lm_head, final norm

    d, m, n_vit, positions, frames = 64, 256, 2, 17, 8
    embeddings = d + d * 3 * 16 * 16 + positions * d  # class, patch conv (no bias), positions
    vit_layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d  # attn, fc1, fc2, 2 LayerNorms
    tower = embeddings + 2 * d + n_vit * vit_layer + 2 * d  # + pre_layrnorm, post_layernorm
    temporal = n_vit * (frames * d + 4 * (d * d + d) + 2 * d)  # embedding, attention, LayerNorm

    projector = (d * h + h) + (h * h + h)  # Linear(64->128), GELU, Linear(128->128)
    return {
        "video_tower": tower,
        "video_tower.temporal": temporal,
        "image_tower": tower,
        "mm_projector": projector,
        "language_model": llm,
    }


def test_tiny_counts_equal_the_hand_count(tiny) -> None:
    model, tokenizer = tiny
    counts = info.count_parameters(model, lora_r=8)
    assert counts.parts == tiny_hand_counts(len(tokenizer))
    assert counts.parts["video_tower"] == 150_528
    assert counts.parts["video_tower.temporal"] == 34_560
    assert counts.parts["mm_projector"] == 24_832
    # LoRA r=8 per LLM layer: 4 attention projections 8*(128+128), gate/up 8*(128+256), down 8*(256+128).
    assert counts.lora == 2 * (4 * 8 * 256 + 2 * 8 * 384 + 8 * 384) == 34_816
    assert counts.trainable == 24_832 + 34_816
    assert counts.frozen == 2 * 150_528 + 34_560 + counts.parts["language_model"]
    assert counts.base_total == sum(p.numel() for p in model.parameters())


def test_without_lora_the_llm_trains(tiny) -> None:
    model, _ = tiny
    counts = info.count_parameters(model)
    assert counts.lora == 0
    assert counts.trainable == counts.parts["mm_projector"] + counts.parts["language_model"]
    assert counts.frozen == 2 * 150_528 + 34_560


def test_lora_targets_are_the_llm_linears_only(tiny) -> None:
    model, _ = tiny
    names = lora_target_module_names(model)
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert names == [
        f"language_model.model.layers.{i}.{'self_attn' if leaf[0] in 'qkvo' else 'mlp'}.{leaf}"
        for i in range(2)
        for leaf in leaves
    ]
    pattern = lora_target_modules(model)
    # CLIP attention in both towers uses q_proj/k_proj/v_proj too: the regex must not reach it.
    assert not re.fullmatch(pattern, "video_tower.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "video_tower.encoder.layers.0.temporal_attn.k_proj")
    assert not re.fullmatch(pattern, "image_tower.encoder.layers.1.self_attn.v_proj")
    assert not re.fullmatch(pattern, "language_model.lm_head")
    assert not re.fullmatch(pattern, "mm_projector.0")


def test_recipe_with_peft_matches_the_analytic_count() -> None:
    model, _ = build_preset("tiny", seed=0)
    expected = info.count_parameters(model, lora_r=8)
    config = build_lora_config(model, 8, 16)
    assert config.task_type == "CAUSAL_LM" and config.lora_dropout == 0.05 and config.bias == "none"
    peft_model = apply_recipe(model, config)

    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * 7 * 2  # A and B for 7 linears in 2 layers
    assert all(".language_model." in n for n in lora_names)
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if "lora_" in n) == 34_816
    assert sum(v for n, v in trainable.items() if "mm_projector" in n) == 24_832
    assert set(trainable) == set(lora_names) | {n for n in trainable if ".mm_projector." in n}
    assert sum(trainable.values()) == expected.trainable
    # Counting the adapted model gives the same split (its LoRA layers are counted as they are).
    assert (
        info.count_parameters(peft_model)
        == info.count_parameters(model)
        == expected.__class__(
            parts=expected.parts,
            lora=expected.lora,
            lora_r=None,
            trainable=expected.trainable,
            frozen=expected.frozen,
        )
    )


def test_lora_targets_come_from_the_model_for_any_llm() -> None:
    """A Phi LLM's MLP is fc1/fc2, as CLIP's: the targets are the LLM's own linears, never a tower's."""
    from transformers import PhiConfig

    from vidlora.model.modeling import VideoLlavaForCausalLM
    from vidlora.model.presets import build_config

    tiny = build_config("tiny")
    text = PhiConfig(
        vocab_size=tiny.text_config.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = build_config("tiny")
    config.text_config = text
    model = VideoLlavaForCausalLM(config)
    pattern = build_lora_config(model, 8, 16).target_modules
    selected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    assert selected == lora_target_module_names(model)
    assert {n.rsplit(".", 1)[-1] for n in selected} == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    assert all(n.startswith("language_model.") for n in selected) and len(selected) == 2 * 6


def test_recipe_without_lora_trains_llm_and_projector() -> None:
    model, _ = build_preset("tiny", seed=0)
    model.requires_grad_(False)
    same = apply_recipe(model, None)
    assert same is model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = info.count_parameters(model)
    assert trainable == counts.trainable == counts.parts["language_model"] + counts.parts["mm_projector"]


def test_recipe_with_frozen_llm_trains_the_projector_only() -> None:
    model, _ = build_preset("tiny", seed=0)
    apply_recipe(model, None, train_llm=False)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"mm_projector"}
    assert info.count_parameters(model, from_flags=True).trainable == 24_832


def test_counts_from_flags_follow_what_was_frozen_after_the_recipe() -> None:
    model, _ = build_preset("tiny", seed=0)
    peft_model = apply_recipe(model, build_lora_config(model, 8, 16))
    model.mm_projector.requires_grad_(False)  # --freeze_mm_mlp_adapter
    by_flags = info.count_parameters(peft_model, from_flags=True)
    assert by_flags.trainable == 34_816
    assert by_flags.frozen == by_flags.total - 34_816
    assert info.count_parameters(peft_model).trainable == 34_816 + 24_832  # the recipe's view


def test_peft_works_on_the_meta_device() -> None:
    # `vidlora info` counts analytically; this checks that the real PEFT path agrees on meta too.
    model, _ = build_preset("tiny", seed=0, device="meta")
    analytic = info.lora_parameter_count(model, 4)
    peft_model = apply_recipe(model, build_lora_config(model, 4, 8))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == analytic == 34_816 // 2
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora_target_module_names(model)


def test_cli_table_for_tiny(capsys) -> None:
    assert (
        info_command.main(
            ["--model_name_or_path", "tiny", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "LoRA r=8 alpha=16" in out
    assert re.search(r"video tower \(temporal\)\s+34,560", out)
    assert re.search(r"LoRA adapters \(r=8\)\s+34,816", out)
    assert re.search(r"trainable\s+59,648", out)


def test_cli_rejects_non_boolean(capsys) -> None:
    with pytest.raises(SystemExit):
        info_command.main(["--lora_enable", "maybe"])
    assert "expected True or False, got 'maybe'" in capsys.readouterr().err


def test_cli_videollava_7b_json(capsys) -> None:
    start = time.perf_counter()
    status = info_command.main(
        [
            "--model_name_or_path",
            "videollava-7b",
            "--lora_enable",
            "True",
            "--lora_r",
            "128",
            "--lora_alpha",
            "256",
            "--json",
        ]
    )
    elapsed = time.perf_counter() - start
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    # 32 layers x [4*128*(4096+4096) + 2*128*(4096+11008) + 128*(11008+4096)]
    assert result["lora"] == 32 * (4 * 128 * 8192 + 2 * 128 * 15104 + 128 * 15104) == 319_815_680
    # Linear(1024->4096) + Linear(4096->4096), with biases
    assert result["parts"]["mm_projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    # 24 layers x (temporal embedding 8x1024 + 4 linears 1024x1024+1024 + LayerNorm)
    assert result["parts"]["video_tower.temporal"] == 24 * (8 * 1024 + 4 * (1024 * 1024 + 1024) + 2 * 1024)
    # Vicuna-7B with 3 added token rows: 6,738,415,616 + 2 * 3 * 4096
    assert result["parts"]["language_model"] == 6_738_415_616 + 2 * 3 * 4096
    assert result["parts"]["image_tower"] == result["parts"]["video_tower"] == 303_179_776
    assert result["trainable"] == 319_815_680 + 20_979_712
    print(f"vidlora info videollava-7b: {elapsed:.2f} s")  # reported, not asserted (-s to see it)


def test_counts_work_on_loaded_meta_models() -> None:
    counts = info.count_parameters(build_preset("videollava-7b", device="meta")[0])
    assert counts.base_total == 7_466_786_816
    assert isinstance(next(iter(counts.parts.values())), int)
    assert torch.device("meta") == next(build_preset("videollava-7b", device="meta")[0].parameters()).device
