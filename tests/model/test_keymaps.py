"""Key maps between checkpoint layouts, pinned against names written out by hand from the public code."""

from __future__ import annotations

import pytest

from vidlora.model import keymaps

# Our names for one weight of every kind (layer 0 stands for every layer).
OURS = [
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.mlp.down_proj.weight",
    "language_model.model.layers.0.input_layernorm.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
    "mm_projector.0.weight",
    "mm_projector.0.bias",
    "mm_projector.2.weight",
    "image_tower.embeddings.class_embedding",
    "image_tower.embeddings.patch_embedding.weight",
    "image_tower.embeddings.position_embedding.weight",
    "image_tower.pre_layrnorm.weight",
    "image_tower.encoder.layers.0.self_attn.q_proj.bias",
    "image_tower.encoder.layers.0.mlp.fc1.weight",
    "image_tower.post_layernorm.bias",
    "video_tower.embeddings.class_embedding",
    "video_tower.encoder.layers.0.layer_norm2.weight",
    "video_tower.encoder.layers.0.temporal_embedding",
    "video_tower.encoder.layers.0.temporal_attn.out_proj.weight",
    "video_tower.encoder.layers.0.temporal_layer_norm1.bias",
    "video_tower.post_layernorm.weight",
]

# The same weights in the original Video-LLaVA checkpoint (LlavaLlamaForCausalLM + embedded towers).
ORIGINAL = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.mm_projector.0.weight",
    "model.mm_projector.0.bias",
    "model.mm_projector.2.weight",
    "model.image_tower.image_tower.embeddings.class_embedding",
    "model.image_tower.image_tower.embeddings.patch_embedding.weight",
    "model.image_tower.image_tower.embeddings.position_embedding.weight",
    "model.image_tower.image_tower.pre_layrnorm.weight",
    "model.image_tower.image_tower.encoder.layers.0.self_attn.q_proj.bias",
    "model.image_tower.image_tower.encoder.layers.0.mlp.fc1.weight",
    "model.image_tower.image_tower.post_layernorm.bias",
    "model.video_tower.video_tower.embeddings.class_embedding",
    "model.video_tower.video_tower.encoder.layers.0.layer_norm2.weight",
    "model.video_tower.video_tower.encoder.layers.0.temporal_embedding",
    "model.video_tower.video_tower.encoder.layers.0.temporal_attn.out_proj.weight",
    "model.video_tower.video_tower.encoder.layers.0.temporal_layer_norm1.bias",
    "model.video_tower.video_tower.post_layernorm.weight",
]

# -hf on disk (hub / converter names); None where the -hf model has no such weight (temporal).
HF_DISK = [
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.mlp.down_proj.weight",
    "language_model.model.layers.0.input_layernorm.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_1.bias",
    "multi_modal_projector.linear_2.weight",
    "image_tower.vision_model.embeddings.class_embedding",
    "image_tower.vision_model.embeddings.patch_embedding.weight",
    "image_tower.vision_model.embeddings.position_embedding.weight",
    "image_tower.vision_model.pre_layrnorm.weight",
    "image_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias",
    "image_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    "image_tower.vision_model.post_layernorm.bias",
    "video_tower.vision_model.embeddings.class_embedding",
    "video_tower.vision_model.encoder.layers.0.layer_norm2.weight",
    None,
    None,
    None,
    "video_tower.vision_model.post_layernorm.weight",
]

# -hf in memory (transformers >= 4.52 VideoLlavaForConditionalGeneration.state_dict()).
HF_MEMORY = [
    "model.language_model.embed_tokens.weight",
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.language_model.layers.0.mlp.down_proj.weight",
    "model.language_model.layers.0.input_layernorm.weight",
    "model.language_model.norm.weight",
    "lm_head.weight",
    "model.multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_1.bias",
    "model.multi_modal_projector.linear_2.weight",
    "model.image_tower.vision_model.embeddings.class_embedding",
    "model.image_tower.vision_model.embeddings.patch_embedding.weight",
    "model.image_tower.vision_model.embeddings.position_embedding.weight",
    "model.image_tower.vision_model.pre_layrnorm.weight",
    "model.image_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias",
    "model.image_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    "model.image_tower.vision_model.post_layernorm.bias",
    "model.video_tower.vision_model.embeddings.class_embedding",
    "model.video_tower.vision_model.encoder.layers.0.layer_norm2.weight",
    None,
    None,
    None,
    "model.video_tower.vision_model.post_layernorm.weight",
]

# transformers' convert_video_llava_weights_to_hf.py, KEYS_TO_MODIFY_MAPPING: ordered substring replaces.
CONVERTER_RULES = [
    ("model.video_tower.video_tower", "video_tower"),
    ("model.image_tower.image_tower", "image_tower"),
    ("model.mm_projector", "multi_modal_projector"),
    ("model", "language_model.model"),
    ("lm_head", "language_model.lm_head"),
    ("video_tower", "video_tower.vision_model"),
    ("image_tower", "image_tower.vision_model"),
    ("multi_modal_projector.0", "multi_modal_projector.linear_1"),
    ("multi_modal_projector.2", "multi_modal_projector.linear_2"),
]


def _converter(key: str) -> str:
    for old, new in CONVERTER_RULES:
        if old in key:
            key = key.replace(old, new)
    return key


@pytest.mark.parametrize(("ours", "original"), list(zip(OURS, ORIGINAL, strict=True)))
def test_original_layout_both_ways(ours: str, original: str) -> None:
    assert keymaps.to_ours(original, "original") == ours
    assert keymaps.from_ours(ours, "original") == original


@pytest.mark.parametrize(("ours", "disk", "memory"), list(zip(OURS, HF_DISK, HF_MEMORY, strict=True)))
def test_hf_layout_both_ways(ours: str, disk: str | None, memory: str | None) -> None:
    # Written as the hub's -hf repos hold it; read in every spelling transformers uses.
    assert keymaps.from_ours(ours, "hf") == disk
    if disk is not None:
        assert keymaps.to_ours(disk, "hf") == ours
        assert keymaps.to_ours(memory, "hf") == ours
        # transformers 5 saves and holds tower keys without the `vision_model.` level.
        for name in (disk, memory):
            flat = name.replace("vision_model.", "")
            assert keymaps.to_ours(flat, "hf") == ours


@pytest.mark.parametrize("original", [k for k, hf in zip(ORIGINAL, HF_DISK, strict=True) if hf is not None])
def test_hf_names_equal_what_the_transformers_converter_writes(original: str) -> None:
    assert keymaps.to_ours(_converter(original), "hf") == keymaps.to_ours(original, "original")


def test_converter_names_temporal_keys_that_the_hf_model_then_drops() -> None:
    # The converter renames temporal keys too; VideoLlavaForConditionalGeneration has no such
    # parameter, so load_state_dict(strict=False) drops them. We map them (they are real weights)
    # and the loader reports them as unexpected for a model built without temporal attention.
    converted = _converter("model.video_tower.video_tower.encoder.layers.3.temporal_attn.q_proj.weight")
    assert converted == "video_tower.vision_model.encoder.layers.3.temporal_attn.q_proj.weight"
    assert keymaps.to_ours(converted, "hf") == "video_tower.encoder.layers.3.temporal_attn.q_proj.weight"


def test_languagebind_tower_checkpoint() -> None:
    lb = "vision_model.encoder.layers.5.temporal_attn.k_proj.bias"
    assert (
        keymaps.to_ours(lb, "languagebind", tower="video_tower")
        == "video_tower.encoder.layers.5.temporal_attn.k_proj.bias"
    )
    assert keymaps.to_ours("vision_model.post_layernorm.weight", "languagebind", tower="image_tower") == (
        "image_tower.post_layernorm.weight"
    )
    assert keymaps.from_ours(
        "video_tower.embeddings.class_embedding", "languagebind", tower="video_tower"
    ) == ("vision_model.embeddings.class_embedding")
    # The other tower is not in this file.
    assert (
        keymaps.from_ours("image_tower.embeddings.class_embedding", "languagebind", tower="video_tower")
        is None
    )
    with pytest.raises(ValueError, match="tower="):
        keymaps.to_ours(lb, "languagebind")


def test_languagebind_ignores_clip_text_side_and_buffers_knowingly() -> None:
    keys = [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_ids",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.embeddings.position_ids",
        "visual_projection.weight",
        "text_projection.weight",
        "logit_scale",
        "vision_model.head.weight",
    ]
    result = keymaps.map_keys(keys, "languagebind", tower="image_tower")
    assert result.mapped == {
        "vision_model.embeddings.patch_embedding.weight": "image_tower.embeddings.patch_embedding.weight"
    }
    assert result.ignored == {
        "vision_model.embeddings.position_ids": "position_ids buffer (recomputed)",
        "text_model.encoder.layers.0.mlp.fc1.weight": "CLIP text tower (unused by Video-LLaVA)",
        "text_model.embeddings.position_ids": "position_ids buffer (recomputed)",
        "visual_projection.weight": "CLIP contrastive projection (unused)",
        "text_projection.weight": "CLIP contrastive projection (unused)",
        "logit_scale": "CLIP logit scale (unused)",
    }
    assert result.unknown == ["vision_model.head.weight"]


def test_text_tower_keys_are_not_ignored_outside_a_languagebind_file() -> None:
    # In an LLM checkpoint a `text_model.*` weight is something we do not know: it must not vanish.
    result = keymaps.map_keys(["logit_scale", "model.layers.0.self_attn.rotary_emb.inv_freq"], "original")
    assert result.ignored == {
        "model.layers.0.self_attn.rotary_emb.inv_freq": "rotary inv_freq buffer (recomputed)"
    }
    assert result.unknown == ["logit_scale"]


def test_llm_layout_is_the_language_model_prefix() -> None:
    assert (
        keymaps.to_ours("model.layers.31.mlp.gate_proj.weight", "llm")
        == "language_model.model.layers.31.mlp.gate_proj.weight"
    )
    assert keymaps.to_ours("lm_head.weight", "llm") == "language_model.lm_head.weight"
    assert keymaps.from_ours("language_model.lm_head.weight", "llm") == "lm_head.weight"
    assert keymaps.from_ours("mm_projector.0.weight", "llm") is None
    assert keymaps.from_ours("video_tower.post_layernorm.bias", "llm") is None


@pytest.mark.parametrize(
    ("source", "ours"),
    [
        ("model.mm_projector.0.weight", "mm_projector.0.weight"),  # the original's pretrain adapter
        ("model.mm_projector.2.bias", "mm_projector.2.bias"),
        ("base_model.model.model.mm_projector.0.weight", "mm_projector.0.weight"),  # non_lora_trainables.bin
        ("mm_projector.2.weight", "mm_projector.2.weight"),  # ours
        ("mm_projector.weight", "mm_projector.weight"),  # a `linear` projector
        ("multi_modal_projector.linear_2.weight", "mm_projector.2.weight"),
    ],
)
def test_mm_adapter_names(source: str, ours: str) -> None:
    assert keymaps.to_ours(source, "mm_adapter") == ours


def test_mm_adapter_rejects_other_weights() -> None:
    assert keymaps.map_keys(["model.layers.0.mlp.up_proj.weight"], "mm_adapter").unknown == [
        "model.layers.0.mlp.up_proj.weight"
    ]
    assert keymaps.from_ours("mm_projector.0.weight", "mm_adapter") == "model.mm_projector.0.weight"
    assert keymaps.from_ours("language_model.lm_head.weight", "mm_adapter") is None


def test_convert_from_ours_to_hf_refuses_to_drop_temporal_weights_silently() -> None:
    state = {key: i for i, key in enumerate(OURS)}
    with pytest.raises(ValueError, match=r"cannot hold 3 of these weights .*temporal_embedding"):
        keymaps.convert_from_ours(state, "hf")
    converted = keymaps.convert_from_ours(state, "hf", skip_unrepresentable=True)
    assert converted == {hf: i for i, hf in enumerate(HF_DISK) if hf is not None}


def test_convert_from_ours_to_hf_refuses_deeper_projectors() -> None:
    with pytest.raises(ValueError, match=r"mm_projector\.4\.weight"):
        keymaps.convert_from_ours({"mm_projector.4.weight": 0}, "hf")


def test_convert_from_ours_keeps_scope_of_each_layout() -> None:
    state = {key: i for i, key in enumerate(OURS)}
    assert keymaps.convert_from_ours(state, "original") == dict(zip(ORIGINAL, range(len(OURS)), strict=True))
    llm = keymaps.convert_from_ours(state, "llm")
    assert sorted(llm) == sorted(k[len("language_model.") :] for k in OURS if k.startswith("language_model."))
    video = keymaps.convert_from_ours(state, "languagebind", tower="video_tower")
    assert len(video) == 6 and all(k.startswith("vision_model.") for k in video)
    adapter = keymaps.convert_from_ours(state, "mm_adapter")
    assert adapter == {
        "model.mm_projector.0.weight": 6,
        "model.mm_projector.0.bias": 7,
        "model.mm_projector.2.weight": 8,
    }


@pytest.mark.parametrize(
    ("key", "part"),
    [
        ("video_tower.encoder.layers.7.temporal_attn.q_proj.weight", "video_tower.temporal"),
        ("video_tower.encoder.layers.7.temporal_embedding", "video_tower.temporal"),
        ("video_tower.encoder.layers.7.self_attn.q_proj.weight", "video_tower"),
        ("image_tower.pre_layrnorm.bias", "image_tower"),
        ("mm_projector.0.weight", "mm_projector"),
        ("language_model.lm_head.weight", "language_model"),
        ("something_else", "other"),
    ],
)
def test_part_of(key: str, part: str) -> None:
    assert keymaps.part_of(key) == part


def test_unknown_layout_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown checkpoint layout 'llava'"):
        keymaps.to_ours("lm_head.weight", "llava")  # type: ignore[arg-type]
