"""QLoRA on the tiny preset: which layers are quantized, the quantized values against numpy
references (NF4 code book, LLM.int8() row-wise rounding), logits against the full-precision model,
LoRA on top of the bitsandbytes layers, a few training steps, and the errors."""

from __future__ import annotations

import copy
import itertools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidlora.model.lora import apply_recipe, build_lora_config
from vidlora.model.presets import build_preset
from vidlora.model.quantize import quantize_language_model

# The 16 NF4 levels (QLoRA paper, appendix E), written out here so the test does not read them
# from bitsandbytes.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
BLOCK = 64  # bitsandbytes' default 4-bit block size
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LAYERS = 2  # tiny preset


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip(
        "bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'vidlora[qlora]'"
    )


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    model, _ = build_preset("tiny", seed=0)
    return model


@pytest.fixture(scope="module")
def batch(tiny) -> dict[str, torch.Tensor]:
    """Two rows: 4 text tokens, one video's placeholders, 8 text tokens; loss on text after the video."""
    config = tiny.config
    gen = torch.Generator().manual_seed(0)
    size = config.video_config.image_size
    videos = torch.randn(2, config.num_frames, 3, size, size, generator=gen)
    text = torch.randint(3, 800, (2, 12), generator=gen)  # below the media/pad ids of the tiny vocab
    video = torch.full((2, config.video_seq_length), config.video_token_id)
    ids = torch.cat([text[:, :4], video, text[:, 4:]], dim=1)
    labels = ids.clone()
    labels[:, : 4 + config.video_seq_length] = -100
    return {"input_ids": ids, "labels": labels, "pixel_values_videos": videos}


def _llm_linear_names() -> list[str]:
    return [
        f"language_model.model.layers.{i}.{'self_attn' if leaf.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{leaf}"
        for i in range(N_LAYERS)
        for leaf in LLM_LINEARS
    ]


def _quantized(tiny: nn.Module, **kwargs) -> nn.Module:
    kwargs.setdefault("compute_dtype", torch.float32)
    return quantize_language_model(copy.deepcopy(tiny), **kwargs)


def _nf4_reference(weight: np.ndarray) -> np.ndarray:
    """Blockwise absmax + nearest NF4 level, dequantized (no double quantization)."""
    blocks = weight.reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    index = np.abs(blocks[..., None] / absmax[..., None] - NF4_LEVELS).argmin(axis=-1)
    return (NF4_LEVELS[index] * absmax).reshape(weight.shape)


def _dequantized_4bit(bnb, module: nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _with_weights(tiny: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A full-precision copy of `tiny` whose named linears hold `weights`."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, weight in weights.items():
            model.get_submodule(name).weight.copy_(weight)
    return model


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values_videos=batch["pixel_values_videos"]).logits


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 2, 3, 0])
def test_bits_other_than_4_or_8_are_refused(tiny, bits):
    with pytest.raises(ValueError, match=rf"bits must be 4 or 8.*got {bits}"):
        quantize_language_model(tiny, bits=bits)


def test_unknown_4bit_type_is_refused(tiny):
    with pytest.raises(ValueError, match=r"quant_type must be one of nf4, fp4, got 'int4'"):
        quantize_language_model(tiny, bits=4, quant_type="int4")


def test_missing_bitsandbytes_names_the_extra(tiny, monkeypatch):
    # A None entry in sys.modules makes `import bitsandbytes` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install 'vidlora\[qlora\]'"):
        quantize_language_model(tiny, bits=4)


def test_quantizing_twice_or_after_lora_is_refused(bnb, tiny):
    model = _quantized(tiny, bits=4)
    with pytest.raises(
        ValueError, match=r"language_model\.model\.layers\.0\.self_attn\.q_proj is already quantized"
    ):
        quantize_language_model(model, bits=4)
    with_lora = apply_recipe(copy.deepcopy(tiny), build_lora_config(tiny, 8, 16))
    with pytest.raises(ValueError, match=r"already carries LoRA; quantize before applying LoRA"):
        quantize_language_model(with_lora.base_model.model, bits=4)


# ---- 4 bits ----------------------------------------------------------------------------------


def test_4bit_quantizes_every_llm_linear_but_lm_head_and_nothing_else(bnb, tiny):
    model = _quantized(tiny, bits=4, compute_dtype=torch.bfloat16, quant_type="nf4", double_quant=True)
    quantized = sorted(
        n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    )
    assert quantized == sorted(_llm_linear_names())  # 2 layers x 7 = 14
    for name in quantized:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert layer.compute_dtype == torch.bfloat16
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    assert type(model.language_model.lm_head) is nn.Linear
    assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    # Towers and projector: same modules, bit-identical parameters.
    for part in ("image_tower", "video_tower", "mm_projector"):
        before, after = tiny.get_submodule(part), model.get_submodule(part)
        assert [type(m) for m in before.modules()] == [type(m) for m in after.modules()]
        for (name, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters(), strict=True):
            assert torch.equal(p0, p1), f"{part}.{name} changed"


def test_nf4_values_equal_a_numpy_reference(bnb, tiny):
    plain = _quantized(tiny, bits=4, double_quant=False)
    double = _quantized(tiny, bits=4, double_quant=True)
    for name in _llm_linear_names():
        weight = tiny.get_submodule(name).weight.detach().numpy()
        reference = _nf4_reference(weight)
        np.testing.assert_allclose(
            _dequantized_4bit(bnb, plain.get_submodule(name)).numpy(), reference, atol=1e-7, rtol=0
        )
        # Double quantization stores the block absmax in 8 bits: close to the reference, not equal.
        # The error scales with the weights (absmax per block): measured up to 3.1e-3 of the
        # largest weight on the tiny preset (initializer_range 0.1).
        diff = np.abs(_dequantized_4bit(bnb, double.get_submodule(name)).numpy() - reference).max()
        assert 0 < diff < 5e-3 * np.abs(weight).max(), (name, diff)


@pytest.mark.parametrize(("quant_type", "double_quant", "bound"), [("nf4", True, 0.25), ("fp4", False, 0.35)])
def test_4bit_logits_equal_the_dequantized_model_and_stay_near_full_precision(
    bnb, tiny, batch, quant_type, double_quant, bound
):
    model = _quantized(tiny, bits=4, quant_type=quant_type, double_quant=double_quant)
    # Read before any inference call: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight
    # into its CPU kernel's layout (which computes in bfloat16) in the first eval-mode forward.
    dequantized = _with_weights(
        tiny, {n: _dequantized_4bit(bnb, model.get_submodule(n)) for n in _llm_linear_names()}
    )
    # Training mode (the tiny model has no dropout) takes bitsandbytes' portable path on every
    # CPU: dequantize, then multiply in the compute dtype (float32 here): the same numbers.
    logits = _logits(model.train(), batch)
    torch.testing.assert_close(logits, _logits(dequantized, batch), atol=2e-5, rtol=1e-4)
    # Against the unquantized model the error is the quantization's own. Measured on this tiny
    # random model (weights ~N(0, 0.02), 16 levels per block): nf4+double 0.153, fp4 0.223 relative
    # L2 error of the logits.
    error = _rel_error(logits, _logits(tiny, batch))
    assert 0.05 < error < bound, error
    # Inference may take the bfloat16 CPU kernel: measured 0.0017 from the float32 path (nf4).
    assert _rel_error(_logits(model.eval(), batch), logits) < 0.01


def test_16bit_parts_of_a_bf16_model_after_quantization(bnb, tiny):
    model = quantize_language_model(
        copy.deepcopy(tiny).to(torch.bfloat16), bits=4, compute_dtype=torch.bfloat16
    )
    quantized = set(_llm_linear_names())
    for name, param in model.language_model.named_parameters():
        if name.rsplit(".", 1)[0] in {q.removeprefix("language_model.") for q in quantized}:
            assert param.dtype == torch.uint8, name
        else:  # norms, embeddings, lm_head: float32 as in peft's prepare_model_for_kbit_training
            assert param.dtype == torch.float32, name
        assert not param.requires_grad, name
    for part in ("image_tower", "video_tower", "mm_projector"):
        assert {p.dtype for p in model.get_submodule(part).parameters()} == {torch.bfloat16}, part


# ---- 8 bits ----------------------------------------------------------------------------------


def test_8bit_layers_hold_rowwise_int8_and_logits_stay_near_full_precision(bnb, tiny, batch):
    model = _quantized(tiny, bits=8).eval()
    quantized = sorted(
        n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    )
    assert quantized == sorted(_llm_linear_names())
    assert type(model.language_model.lm_head) is nn.Linear
    assert model.is_loaded_in_8bit and not model.is_loaded_in_4bit
    for name in quantized:
        layer, weight = model.get_submodule(name), tiny.get_submodule(name).weight.detach()
        assert isinstance(layer, bnb.nn.Linear8bitLt)
        assert layer.state.threshold == 6.0 and not layer.state.has_fp16_weights
        assert layer.weight.dtype == torch.int8
        # LLM.int8(): per output row, scale = absmax of the fp16 weight, value = round(w * 127 / scale).
        w16 = weight.half().float().numpy()
        scale = np.abs(w16).max(axis=1)
        np.testing.assert_array_equal(layer.weight.SCB.numpy(), scale)
        exact = w16 * (127 / scale[:, None])
        assert np.abs(layer.weight.data.numpy() - exact).max() <= 0.5 + 1e-4, name
    # Measured: 0.0103 relative L2 error of the logits (weights and activations in int8).
    error = _rel_error(_logits(model, batch), _logits(tiny, batch))
    assert 1e-3 < error < 0.03, error


# ---- LoRA on top, training -------------------------------------------------------------------


def _train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("bits", "lora_layer"), [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_lora_on_the_quantized_llm_trains_only_adapters_and_projector(bnb, tiny, batch, bits, lora_layer):
    from peft.tuners.lora import bnb as lora_bnb

    quantized = _quantized(tiny, bits=bits)
    # LoRA B starts at zero: the first loss is the quantized model's own, computed here by hand.
    logits = _logits(quantized, batch)
    expected_first = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    packed = {n: quantized.get_submodule(n).weight.data.clone() for n in _llm_linear_names()}
    projector = {n: p.detach().clone() for n, p in quantized.mm_projector.named_parameters()}

    torch.manual_seed(0)  # LoRA A's initialisation and LoRA dropout
    model = apply_recipe(quantized, build_lora_config(quantized, 8, 16))
    wrapped = {n: type(model.base_model.model.get_submodule(n)) for n in _llm_linear_names()}
    assert set(wrapped.values()) == {getattr(lora_bnb, lora_layer)}, wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".mm_projector." in n for n in trainable)
    assert sum(".lora_" in n for n in trainable) == 2 * len(_llm_linear_names())
    assert sum(".mm_projector." in n for n in trainable) == 4  # mlp2x_gelu: 2 x (weight, bias)

    losses = _train(model, batch, steps=5)
    # Measured (both bit widths): 6.78 -> 6.22 in 5 AdamW steps at lr 1e-3.
    assert losses[0] == pytest.approx(expected_first.item(), abs=1e-4)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.4, losses
    base = model.base_model.model
    for name, data in packed.items():
        assert torch.equal(base.get_submodule(name).base_layer.weight.data, data), (
            f"{name} base weight changed"
        )
    assert all(not torch.equal(p, projector[n]) for n, p in base.mm_projector.named_parameters())


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_gradient_checkpointing_flag_makes_the_embedding_output_require_grad(
    bnb, tiny, batch, gradient_checkpointing
):
    model = _quantized(tiny, bits=4, gradient_checkpointing=gradient_checkpointing)
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, i, out: seen.append(out.requires_grad)
    )
    model.train()(input_ids=batch["input_ids"][:, -8:])
    handle.remove()
    # Everything is frozen: only the hook makes re-entrant checkpointing keep a graph to the adapters.
    assert seen == [gradient_checkpointing]


def test_checkpointed_qlora_step_reaches_the_adapters(bnb, tiny, batch):
    text_only = {"input_ids": batch["input_ids"][:, -8:], "labels": batch["input_ids"][:, -8:]}
    torch.manual_seed(0)
    quantized = _quantized(tiny, bits=4, gradient_checkpointing=True)
    model = apply_recipe(quantized, build_lora_config(quantized, 8, 16))
    model.base_model.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": True}
    )
    model.train()
    model(**text_only).loss.backward()
    for name in _llm_linear_names():
        grad = model.base_model.model.get_submodule(name).lora_B["default"].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_parameter_counts_are_unchanged_by_4bit_packing(bnb, tiny):
    from vidlora.model.info import count_parameters

    before = count_parameters(tiny).parts
    after = count_parameters(_quantized(tiny, bits=4)).parts
    assert after == before
    assert before["language_model"] == 554_880  # the tiny LLM (hand count in tests/model/test_info.py)
