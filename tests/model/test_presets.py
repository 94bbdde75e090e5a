"""Presets: the tiny model (fast, seeded, golden forward) and the Video-LLaVA-7B architecture on the
meta device (parameter counts computed by hand from the architecture, config round trip)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from vidlora.model.configuration import VideoLlavaConfig
from vidlora.model.presets import PRESETS, build_config, build_preset, get_preset


def _llama_params(vocab: int, hidden: int, ffn: int, layers: int) -> int:
    """LLaMA with untied head, MHA (kv heads == heads), no biases: embed + head + layers + final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden  # q,k,v,o + gate,up,down + 2 RMSNorms
    return 2 * vocab * hidden + layers * per_layer + hidden


def _vit_params(
    hidden: int, inter: int, patch: int, size: int, layers: int, frames: int | None = None
) -> int:
    """CLIP vision transformer (+ LanguageBind temporal weights per layer when `frames` is given)."""
    positions = (size // patch) ** 2 + 1
    embeddings = hidden + 3 * patch * patch * hidden + positions * hidden  # class, conv (no bias), positions
    attn = 4 * (hidden * hidden + hidden)
    per_layer = attn + 2 * 2 * hidden + (hidden * inter + inter) + (inter * hidden + hidden)
    if frames is not None:
        per_layer += (
            frames * hidden + attn + 2 * hidden
        )  # temporal_embedding, temporal_attn, temporal_layer_norm1
    return embeddings + 2 * hidden + layers * per_layer + 2 * hidden  # + pre_layrnorm, post_layernorm


def _mlp2x_params(inp: int, out: int) -> int:
    return inp * out + out + out * out + out


def _counts(model: torch.nn.Module) -> dict[str, int]:
    return {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("language_model", "image_tower", "video_tower", "mm_projector")
    }


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


def test_presets_are_immutable_and_named():
    assert set(PRESETS) == {"tiny", "videollava-7b"}
    with pytest.raises(TypeError):
        PRESETS["other"] = PRESETS["tiny"]  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["tiny"].text["hidden_size"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        PRESETS["tiny"].name = "x"  # type: ignore[misc]
    with pytest.raises(
        ValueError, match=r"unknown model preset 'vicuna'; known presets: tiny, videollava-7b"
    ):
        get_preset("vicuna")
    with pytest.raises(RuntimeError, match="Expected one of"):
        build_preset("tiny", device="floppy")


def test_tiny_builds_fast_and_matches_its_tokenizer(tiny):
    model, tok = tiny
    start = time.perf_counter()
    build_preset("tiny")
    elapsed = time.perf_counter() - start
    # Measured ~0.05-0.1 s here (tokenizer included, after the first import); 1 s leaves room for load.
    assert elapsed < 1.0
    c = model.config
    assert c.text_config.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    ids = tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"])
    assert [c.image_token_id, c.video_token_id, c.pad_token_id] == ids
    assert (c.text_config.bos_token_id, c.text_config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert (c.image_seq_length, c.frame_seq_length, c.num_frames, c.video_seq_length) == (16, 17, 8, 136)
    assert c.mm_projector_type == "mlp2x_gelu" and c.mm_vision_select_layer == -2
    assert not model.training


def test_tiny_parameter_counts_by_hand(tiny):
    model, tok = tiny
    vocab = len(tok)
    assert _counts(model) == {
        "language_model": _llama_params(vocab, 128, 256, 2),
        "image_tower": _vit_params(64, 256, 16, 64, 2),
        "video_tower": _vit_params(64, 256, 16, 64, 2, frames=8),
        "mm_projector": _mlp2x_params(64, 128),
    }
    assert _counts(model)["image_tower"] == 150_528 and _counts(model)["video_tower"] == 185_088


def test_tiny_is_seeded_and_leaves_global_rng_alone(tiny):
    model, _ = tiny
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    same, _ = build_preset("tiny", seed=0)
    other, _ = build_preset("tiny", seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    weight = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])


def test_tiny_forward_golden_loss(tiny):
    model, _ = tiny
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
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(1, 8, 3, 64, 64, generator=gen)
    image = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, pixel_values_videos=video, pixel_values_images=image)
        logits = model(input_ids=ids, pixel_values_videos=video, pixel_values_images=image).logits
    assert logits.shape == (1, 3 + 136 + 1 + 16 + 3, c.text_config.vocab_size)
    # With labels, logits only at the positions that take a loss: every text position but the last.
    assert out.logits.shape == (3 + 1 + 3 - 1, c.text_config.vocab_size)
    # Golden values from seed 0 (torch 2.13 CPU, float32). They change whenever the tiny preset, its
    # initialisation or the tiny tokenizer's vocabulary changes; tolerance 1e-4.
    assert out.loss.item() == pytest.approx(7.777138, abs=1e-4)
    torch.testing.assert_close(logits[0, -1, :3], torch.tensor([0.7141, 0.3549, 0.4396]), atol=1e-4, rtol=0)


def test_7b_on_meta_is_fast_allocates_nothing_and_has_the_published_sizes():
    start = time.perf_counter()
    model, tokenizer = build_preset("videollava-7b", device="meta")
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0  # measured ~0.2 s here; no weights are materialised or initialised
    assert tokenizer is None  # Vicuna's tokenizer comes with the checkpoint
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])

    counts = _counts(model)
    assert counts == {
        "language_model": _llama_params(32003, 4096, 11008, 32),
        "image_tower": _vit_params(1024, 4096, 14, 224, 24),
        "video_tower": _vit_params(1024, 4096, 14, 224, 24, frames=8),
        "mm_projector": _mlp2x_params(1024, 4096),
    }
    # The same numbers written out: Vicuna-7B with 3 added rows in embed and head, CLIP ViT-L/14,
    # plus 24 x (8*1024 + 4*(1024*1024+1024) + 2*1024) temporal weights, and the projector.
    assert counts == {
        "language_model": 6_738_440_192,
        "image_tower": 303_179_776,
        "video_tower": 404_187_136,
        "mm_projector": 20_979_712,
    }
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters()) == 7_466_786_816


def test_7b_config_values_and_round_trip(tmp_path):
    config = build_config("videollava-7b")
    t = config.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        4096,
        32,
        32,
        11008,
    )
    assert (t.vocab_size, t.rms_norm_eps, t.max_position_embeddings) == (32003, 1e-5, 4096)
    assert (config.image_token_id, config.video_token_id, config.pad_token_id) == (32000, 32001, 32002)
    for tower in (config.image_config, config.video_config):
        assert (tower.hidden_size, tower.intermediate_size, tower.num_hidden_layers) == (1024, 4096, 24)
        assert (tower.num_attention_heads, tower.patch_size, tower.image_size) == (16, 14, 224)
        assert (tower.layer_norm_eps, tower.hidden_act) == (1e-5, "gelu")
    assert (config.video_config.num_frames, config.video_config.add_time_attn) == (8, True)
    assert (config.image_seq_length, config.frame_seq_length, config.video_seq_length) == (256, 257, 2056)

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "vidlora_video_llava"
    assert saved["video_config"]["model_type"] == "vidlora_languagebind_video"
    loaded = VideoLlavaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.video_seq_length == 2056


def test_build_config_overrides():
    config = build_config(
        "videollava-7b", mm_vision_select_layer=-1, text_config={"num_hidden_layers": 2}, image_config=None
    )
    assert config.mm_vision_select_layer == -1
    assert config.text_config.num_hidden_layers == 2 and config.text_config.hidden_size == 4096
    assert config.image_config is None and config.video_config is not None
    # The preset itself is unchanged.
    assert PRESETS["videollava-7b"].text["num_hidden_layers"] == 32
    with pytest.raises(ValueError, match="override video_config must be a dict of fields or None"):
        build_config("videollava-7b", video_config=8)


def test_random_build_on_a_device_matches_the_preset_structure_and_keeps_buffers_in_float32():
    import torch

    from vidlora.model.presets import build_preset, build_random

    model, tokenizer = build_random("tiny", device="cpu", dtype=torch.bfloat16, seed=1)
    reference, _ = build_preset("tiny")
    params = dict(model.named_parameters())
    assert params.keys() == dict(reference.named_parameters()).keys()
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert all(torch.isfinite(p).all() for p in params.values())
    # Initialised, not left as allocated memory: weights spread like the preset's own initialisation.
    for name in ("language_model.model.layers.0.self_attn.q_proj.weight", "mm_projector.0.weight"):
        std, ref_std = (
            params[name].float().std().item(),
            dict(reference.named_parameters())[name].std().item(),
        )
        assert abs(std - ref_std) < 0.2 * ref_std
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer)
    ids = tokenizer("USER: <video>\nhi ASSISTANT:").input_ids
    assert model.config.video_token_id in ids and len(tokenizer) == model.config.text_config.vocab_size


def test_the_7b_stand_in_tokenizer_puts_the_media_tokens_at_the_presets_ids():
    from vidlora.model.presets import build_config, standin_tokenizer

    tokenizer = standin_tokenizer("videollava-7b")
    config = build_config("videollava-7b")
    assert len(tokenizer) == config.text_config.vocab_size == 32003
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [32000, 32001, 32002]
    assert tokenizer.pad_token_id == config.pad_token_id
    # The filler pieces are never produced by text.
    ids = tokenizer("A chat between a curious user and an assistant. <video>\n What is 12 + 30?").input_ids
    assert max(i for i in ids if i != 32001) < 1000
