"""--attn_implementation: the flag reaches the LLM and both towers, is recorded for inference, eager
and sdpa give the same loss, flash attention without its package is an argument problem; training
runs without a KV cache; --use_liger_kernel is refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vidlora.args import ArgumentProblems, base_model, load_options, parse_train_args
from vidlora.errors import UsageError
from vidlora.model.loading import load_pretrained
from vidlora.model.modeling import VideoLlavaForCausalLM

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _implementations(model: VideoLlavaForCausalLM) -> set[str]:
    """The attention kernel of every config the LLM and the towers' attention layers read."""
    configs = [model.config, model.config.text_config, model.language_model.config]
    configs += [model.config.image_config, model.config.video_config]
    configs += [m.config for m in model.modules() if type(m).__name__ in ("CLIPAttention", "LlamaAttention")]
    return {c._attn_implementation for c in configs}


def _media_batch(model: VideoLlavaForCausalLM) -> dict[str, torch.Tensor]:
    c = model.config
    ids = torch.tensor(
        [
            [
                1,
                50,
                51,
                *[c.video_token_id] * c.video_seq_length,
                52,
                *[c.image_token_id] * c.image_seq_length,
                53,
                54,
                2,
            ]
        ]
    )
    labels = ids.masked_fill((ids == c.image_token_id) | (ids == c.video_token_id), -100)
    labels[0, :3] = -100
    gen = torch.Generator().manual_seed(0)
    vc, ic = c.video_config, c.image_config
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values_videos": torch.randn(1, vc.num_frames, 3, vc.image_size, vc.image_size, generator=gen),
        "pixel_values_images": torch.randn(1, 3, ic.image_size, ic.image_size, generator=gen),
    }


def test_the_flag_reaches_the_llm_and_both_towers():
    default = load_pretrained("tiny").model
    eager = load_pretrained("tiny", attn_implementation="eager").model
    assert _implementations(default) == {"sdpa"}
    assert _implementations(eager) == {"eager"}


def test_eager_and_sdpa_give_the_same_loss():
    losses = {}
    for name in ("eager", "sdpa"):
        model = load_pretrained("tiny", attn_implementation=name).model
        with torch.no_grad():
            losses[name] = float(model(**_media_batch(model)).loss)
    # Same weights (seed 0), float32; only the attention kernel differs.
    assert losses["eager"] == pytest.approx(losses["sdpa"], abs=1e-5)
    assert losses["eager"] > 1.0  # an untrained model's loss, not a degenerate zero


def test_the_flag_is_parsed_and_recorded_for_inference(original_argv, tmp_path):
    model_args, _, _ = parse_train_args(original_argv(tmp_path / "a"), cuda_available=False)
    assert model_args.attn_implementation == "sdpa"
    argv = [*original_argv(tmp_path / "b"), "--attn_implementation", "eager"]
    model_args, _, _ = parse_train_args(argv, cuda_available=False)
    assert model_args.attn_implementation == "eager"
    # The run record's base model carries it, and inference loads the base with its load_kwargs.
    assert base_model(model_args).attn_implementation == "eager"
    assert base_model(model_args).load_kwargs()["attn_implementation"] == "eager"
    assert load_options(model_args)["attn_implementation"] == "eager"


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_an_argument_problem(original_argv, tmp_path):
    argv = [*original_argv(tmp_path / "out"), "--attn_implementation", "flash_attention_2"]
    with pytest.raises(ArgumentProblems, match=r"flash-attn package .*vidlora\[flash\]"):
        parse_train_args(argv, cuda_available=True, bf16_supported=True)
    with pytest.raises(UsageError, match=r"vidlora\[flash\]"):
        load_pretrained("tiny", attn_implementation="flash_attention_2")


def test_unknown_kernel_and_flash_attention_on_cpu_are_argument_problems(original_argv, tmp_path):
    argv = [*original_argv(tmp_path / "out"), "--attn_implementation", "flash"]
    with pytest.raises(ArgumentProblems, match="use one of sdpa, eager, flash_attention_2"):
        parse_train_args(argv, cuda_available=False)
    argv = [*original_argv(tmp_path / "out"), "--attn_implementation", "flash_attention_2"]
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_args(argv, cuda_available=False)
    text = str(caught.value)
    assert "needs a CUDA GPU" in text and "half precision only" in text


def test_liger_kernel_is_refused(original_argv, tmp_path):
    argv = [*original_argv(tmp_path / "out"), "--use_liger_kernel", "True"]
    with pytest.raises(ArgumentProblems, match="--use_liger_kernel True is not supported"):
        parse_train_args(argv, cuda_available=False)


def test_training_recipe_turns_the_llm_cache_off(original_argv, tmp_path):
    from vidlora.training.recipe import apply_training_recipe, load_model

    model_args, _, train_args = parse_train_args(original_argv(tmp_path / "out"), cuda_available=False)
    loaded = load_model(model_args, train_args)
    assert loaded.model.language_model.config.use_cache is True  # transformers' default
    apply_training_recipe(loaded.model, model_args, train_args)
    assert loaded.model.language_model.config.use_cache is False
