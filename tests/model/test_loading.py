"""Loading every checkpoint layout: round trips by value, every source tensor accounted for, strictness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from vidlora.model import keymaps
from vidlora.model.loading import load_pretrained
from vidlora.model.presets import build_preset
from vidlora.model.report import CheckpointLoadError

VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


# ---------------------------------------------------------------------------------------------
# Checkpoint writers (true key names; the names themselves are pinned in test_keymaps.py)
# ---------------------------------------------------------------------------------------------


def _save_sharded(state: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    """Write `state` as `shards` safetensors files plus model.safetensors.index.json."""
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _vision_fields(config) -> dict:
    return {k: getattr(config, k) for k in VISION_FIELDS}


def write_languagebind_tower(directory: Path, model, tower: str, seed: int) -> Path:
    """A LanguageBind checkpoint: `vision_model.*` plus the CLIP text side and a position_ids buffer."""
    directory.mkdir(parents=True)
    config = model.config.video_config if tower == "video_tower" else model.config.image_config
    state = keymaps.convert_from_ours(model.state_dict(), "languagebind", tower=tower)
    gen = torch.Generator().manual_seed(seed)
    width = config.hidden_size
    state |= {
        "text_model.embeddings.token_embedding.weight": torch.randn(50, width, generator=gen),
        "text_model.embeddings.position_ids": torch.arange(7).unsqueeze(0),
        "vision_model.embeddings.position_ids": torch.arange(17).unsqueeze(0),  # 16 patches + CLS
        "visual_projection.weight": torch.randn(32, width, generator=gen),
        "text_projection.weight": torch.randn(32, width, generator=gen),
        "logit_scale": torch.tensor(2.6592),
    }
    save_file(state, str(directory / "model.safetensors"))
    vision = _vision_fields(config)
    if tower == "video_tower":
        vision |= {"num_frames": config.num_frames, "add_time_attn": config.add_time_attn}
    kind = "LanguageBindVideo" if tower == "video_tower" else "LanguageBindImage"
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": kind,
                "architectures": ["CLIPModel"],
                "projection_dim": 32,
                "vision_config": vision,
                "text_config": {"hidden_size": width},
            }
        )
    )
    return directory


def _llama_fields(model) -> dict:
    text = model.config.text_config.to_dict()
    return {k: v for k, v in text.items() if k not in ("architectures", "transformers_version", "model_type")}


def write_original(
    directory: Path, model, tokenizer, *, video_dir: Path, image_dir: Path, embed_towers: bool = True
) -> Path:
    """Video-LLaVA's own layout: LlavaLlamaForCausalLM config + LLM/projector/embedded-tower weights."""
    directory.mkdir(parents=True)
    state = keymaps.convert_from_ours(model.state_dict(), "original")
    if not embed_towers:
        state = {k: v for k, v in state.items() if "_tower." not in k}
    # transformers 4.31 (the original's pin) saved LLaMA's rotary buffers too.
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    for i in range(model.config.text_config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    if embed_towers:  # LanguageBind registers CLIP's position_ids as a persistent buffer
        for part in ("image_tower", "video_tower"):
            state[f"model.{part}.{part}.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    _save_sharded(state, directory)
    config = _llama_fields(model) | {
        "model_type": "llava",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_hidden_size": model.config.mm_hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_image_tower": str(image_dir),
        "mm_video_tower": str(video_dir),
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
    }
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(directory)
    return directory


def hf_config(model, *, vision_model_prefix: bool = True) -> VideoLlavaConfig:
    """transformers' own VideoLlavaConfig for the tiny sizes (shared vision config, no temporal attention)."""
    vision = model.config.image_config
    n = (vision.image_size // vision.patch_size) ** 2
    return VideoLlavaConfig(
        text_config=LlamaConfig(**_llama_fields(model)),
        vision_config=CLIPVisionConfig(**_vision_fields(vision)),
        image_token_index=model.config.image_token_id,
        video_token_index=model.config.video_token_id,
        image_seq_length=n,
        video_seq_length=model.config.num_frames * (n + 1),
        pad_token_id=model.config.pad_token_id,
    )


def write_hf(directory: Path, model, tokenizer) -> Path:
    """The transformers -hf layout as the converter writes it (`language_model.model.*`, `vision_model.`)."""
    directory.mkdir(parents=True)
    state = keymaps.convert_from_ours(model.state_dict(), "hf")
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    hf_config(model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_llm(directory: Path, model, tokenizer) -> Path:
    """A plain LLaMA checkpoint, written by transformers itself."""
    model.language_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_adapter(path: Path, model) -> Path:
    """`--pretrain_mm_mlp_adapter` file with the original's names (`model.mm_projector.*`)."""
    state = keymaps.convert_from_ours(model.state_dict(), "mm_adapter")
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source():
    """The tiny model whose weights every checkpoint below holds (seed 3, so not the preset's seed 0)."""
    model, tokenizer = build_preset("tiny", seed=3)
    return model, tokenizer


@pytest.fixture(scope="module")
def source_no_time():
    """Tiny model without temporal attention: what a -hf checkpoint can hold."""
    model, tokenizer = build_preset("tiny", seed=4, video_config={"add_time_attn": False})
    return model, tokenizer


@pytest.fixture(scope="module")
def towers(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("towers")
    model, _ = source
    return (
        write_languagebind_tower(root / "LanguageBind_Video_merge", model, "video_tower", seed=1),
        write_languagebind_tower(root / "LanguageBind_Image", model, "image_tower", seed=2),
    )


def assert_same_weights(loaded, reference: dict[str, torch.Tensor]) -> None:
    got = loaded.state_dict()
    assert sorted(got) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key


def assert_every_tensor_used(report, allowed_ignored: set[str]) -> None:
    assert report.ok, report.format()
    for src in report.sources:
        assert src.unexpected == [], src
        assert src.loaded + len(src.ignored) == src.tensors, src
        assert set(src.ignored.values()) <= allowed_ignored, src.ignored


CLIP_TEXT_SIDE = {
    "CLIP text tower (unused by Video-LLaVA)",
    "CLIP contrastive projection (unused)",
    "CLIP logit scale (unused)",
    "position_ids buffer (recomputed)",
}


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_original_layout_round_trip_with_embedded_towers(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    ckpt = write_original(
        tmp_path / "Video-LLaVA-7B", model, tokenizer, video_dir=video_dir, image_dir=image_dir
    )
    assert "model.video_tower.video_tower.encoder.layers.1.temporal_attn.v_proj.weight" in load_file(
        str(ckpt / "model-00001-of-00002.safetensors")
    ) | load_file(str(ckpt / "model-00002-of-00002.safetensors"))

    loaded = load_pretrained(str(ckpt))

    assert loaded.report.layout == "original"
    assert_same_weights(loaded.model, model.state_dict())
    # Towers came from the checkpoint itself; the tower directories gave their configs only.
    assert [Path(s.path).parent for s in loaded.report.sources] == [ckpt, ckpt]
    assert_every_tensor_used(
        loaded.report,
        allowed_ignored={"rotary inv_freq buffer (recomputed)", "position_ids buffer (recomputed)"},
    )
    assert "ignored (4): 2 x position_ids buffer (recomputed); 2 x rotary inv_freq buffer (recomputed)" in (
        loaded.report.format()
    )
    assert loaded.report.temporal_attention is True
    assert loaded.model.config.video_config.num_frames == 8
    assert loaded.model.config.video_config.hidden_act == "gelu"
    assert loaded.model.config.mm_projector_type == "mlp2x_gelu"
    assert loaded.model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def _logits(model, video: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    ids = (
        [1, 40, 41]
        + [cfg.video_token_id] * cfg.video_seq_length
        + [42]
        + [cfg.image_token_id] * cfg.image_seq_length
        + [43]
    )
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values_videos=video, pixel_values_images=image)
    return out.logits


def test_original_layout_loaded_model_computes_what_the_source_computes(tmp_path, source, towers) -> None:
    # Same weights is not the whole story: buffers (rotary, positions) are rebuilt, not loaded.
    model, tokenizer = source
    video_dir, image_dir = towers
    ckpt = write_original(tmp_path / "ckpt", model, tokenizer, video_dir=video_dir, image_dir=image_dir)
    loaded = load_pretrained(str(ckpt))
    gen = torch.Generator().manual_seed(0)
    video, image = torch.randn(1, 8, 3, 64, 64, generator=gen), torch.randn(1, 3, 64, 64, generator=gen)
    expected = _logits(model, video, image)
    assert expected.shape == (1, 3 + 8 * 17 + 1 + 16 + 1, len(tokenizer))
    assert torch.equal(_logits(loaded.model, video, image), expected)


def test_original_layout_with_explicit_towers_replaces_embedded_ones(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    ckpt = write_original(
        tmp_path / "ckpt", model, tokenizer, video_dir=tmp_path / "gone", image_dir=tmp_path / "gone"
    )

    loaded = load_pretrained(str(ckpt), video_tower=str(video_dir), image_tower=str(image_dir))

    assert_same_weights(loaded.model, model.state_dict())
    assert_every_tensor_used(
        loaded.report,
        allowed_ignored=CLIP_TEXT_SIDE
        | {"replaced by the tower checkpoint", "rotary inv_freq buffer (recomputed)"},
    )
    replaced = [k for k, r in loaded.report.ignored.items() if r == "replaced by the tower checkpoint"]
    n_tower = sum(1 for k in model.state_dict() if k.startswith(("image_tower.", "video_tower.")))
    assert len(replaced) == n_tower


def test_original_layout_without_embedded_towers_reads_tower_weights(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    ckpt = write_original(
        tmp_path / "ckpt", model, tokenizer, video_dir=video_dir, image_dir=image_dir, embed_towers=False
    )

    loaded = load_pretrained(str(ckpt))

    assert_same_weights(loaded.model, model.state_dict())
    assert_every_tensor_used(
        loaded.report, allowed_ignored=CLIP_TEXT_SIDE | {"rotary inv_freq buffer (recomputed)"}
    )
    text_side = [k for src in loaded.report.sources for k, r in src.ignored.items() if "buffer" not in r]
    assert len(text_side) == 2 * 4  # per tower: token embedding, two projections, logit scale


def test_original_layout_needs_the_tower_config(tmp_path, source) -> None:
    model, tokenizer = source
    ckpt = write_original(
        tmp_path / "ckpt", model, tokenizer, video_dir=tmp_path / "nowhere", image_dir=tmp_path / "nowhere"
    )
    with pytest.raises(FileNotFoundError, match=r"Pass --image_tower DIR"):
        load_pretrained(str(ckpt))


def test_hf_layout_round_trip_states_temporal_attention_absent(tmp_path, source_no_time) -> None:
    model, tokenizer = source_no_time
    ckpt = write_hf(tmp_path / "Video-LLaVA-7B-hf", model, tokenizer)
    assert "image_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in load_file(
        str(ckpt / "model.safetensors")
    )

    loaded = load_pretrained(str(ckpt))

    assert loaded.report.layout == "hf"
    assert_same_weights(loaded.model, model.state_dict())
    assert_every_tensor_used(loaded.report, allowed_ignored=set())
    assert loaded.report.temporal_attention is False
    assert loaded.model.config.video_config.add_time_attn is False
    text = loaded.report.format()
    assert "temporal attention in the video tower: ABSENT" in text
    assert "NO temporal attention" in text


def test_hf_layout_as_transformers_writes_it(tmp_path, source_no_time) -> None:
    """transformers' own VideoLlavaForConditionalGeneration, saved by transformers, loads value for value."""
    model, tokenizer = source_no_time
    torch.manual_seed(11)
    hf_model = VideoLlavaForConditionalGeneration(hf_config(model))
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    loaded = load_pretrained(str(tmp_path / "hf"))

    assert_every_tensor_used(loaded.report, allowed_ignored=set())
    reference = {keymaps.to_ours(k, "hf"): v for k, v in hf_model.state_dict().items()}
    assert_same_weights(loaded.model, reference)


def test_hf_layout_with_temporal_keys_is_unexpected(tmp_path, source) -> None:
    # A -hf checkpoint holding temporal weights (say, converted by hand) must not lose them silently.
    model, tokenizer = source
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    state = keymaps.convert_from_ours(model.state_dict(), "hf", skip_unrepresentable=True)
    # Temporal keys under the names transformers' converter gives them (test_keymaps pins those).
    for key, value in model.state_dict().items():
        if ".temporal_" in key:
            state[key.replace("video_tower.", "video_tower.vision_model.", 1)] = value
    save_file(state, str(ckpt / "model.safetensors"))
    hf_config(model).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    with pytest.raises(
        CheckpointLoadError, match=r"unexpected \(22\):\n    video_tower\.temporal: 22 "
    ) as err:
        load_pretrained(str(ckpt))
    assert "temporal_attn" in str(err.value)


@pytest.mark.parametrize("adapter_name", ["mm_projector.safetensors", "mm_projector.bin"])
def test_llm_plus_towers_plus_adapter_round_trip(tmp_path, source, towers, adapter_name) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    llm = write_llm(tmp_path / "vicuna", model, tokenizer)
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(str(llm / "model.safetensors"))
    adapter = write_adapter(tmp_path / adapter_name, model)

    loaded = load_pretrained(
        str(llm), video_tower=str(video_dir), image_tower=str(image_dir), pretrain_mm_mlp_adapter=str(adapter)
    )

    assert loaded.report.layout == "llm"
    assert_same_weights(loaded.model, model.state_dict())
    assert_every_tensor_used(loaded.report, allowed_ignored=CLIP_TEXT_SIDE)
    assert [Path(s.path).name for s in loaded.report.sources] == [
        "model.safetensors",
        "model.safetensors",
        "model.safetensors",
        adapter_name,
    ]


def test_tied_llm_loads_tied(tmp_path, towers) -> None:
    # transformers writes a tied LLM without lm_head.weight; it is not missing, and the tie holds.
    model, tokenizer = build_preset("tiny", seed=7, text_config={"tie_word_embeddings": True})
    llm = write_llm(tmp_path / "tied", model, tokenizer)
    assert "lm_head.weight" not in load_file(str(llm / "model.safetensors"))
    video_dir, image_dir = towers
    adapter = write_adapter(tmp_path / "mm_projector.safetensors", model)

    loaded = load_pretrained(
        str(llm), video_tower=str(video_dir), image_tower=str(image_dir), pretrain_mm_mlp_adapter=str(adapter)
    )

    assert loaded.report.ok, loaded.report.format()
    lm = loaded.model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert torch.equal(lm.lm_head.weight, model.language_model.model.embed_tokens.weight)


def test_llm_without_adapter_initialises_the_projector_from_the_seed(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    llm = write_llm(tmp_path / "vicuna", model, tokenizer)

    first = load_pretrained(str(llm), video_tower=str(video_dir), image_tower=str(image_dir), seed=5)
    second = load_pretrained(str(llm), video_tower=str(video_dir), image_tower=str(image_dir), seed=5)

    assert first.report.ok
    assert first.report.initialised == [
        "mm_projector.0.weight",
        "mm_projector.0.bias",
        "mm_projector.2.weight",
        "mm_projector.2.bias",
    ]
    w0 = first.model.mm_projector[0].weight
    assert torch.equal(w0, second.model.mm_projector[0].weight)
    assert not torch.equal(w0, model.mm_projector[0].weight)
    # nn.Linear's own initialisation: |w| < 1/sqrt(fan_in) = 1/8.
    assert w0.abs().max().item() < 1 / 8 and w0.std().item() > 0.02


def test_projector_type_for_a_plain_llm_and_conflicts(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    llm = write_llm(tmp_path / "vicuna", model, tokenizer)
    loaded = load_pretrained(
        str(llm), video_tower=str(video_dir), image_tower=str(image_dir), mm_projector_type="linear"
    )
    assert isinstance(loaded.model.mm_projector, torch.nn.Linear)
    assert loaded.report.initialised == ["mm_projector.weight", "mm_projector.bias"]

    ckpt = write_original(tmp_path / "ckpt", model, tokenizer, video_dir=video_dir, image_dir=image_dir)
    with pytest.raises(ValueError, match=r"--mm_projector_type linear: .* holds a 'mlp2x_gelu' projector"):
        load_pretrained(str(ckpt), mm_projector_type="linear")


def test_llm_needs_towers(tmp_path, source) -> None:
    model, tokenizer = source
    llm = write_llm(tmp_path / "vicuna", model, tokenizer)
    with pytest.raises(ValueError, match="--video_tower"):
        load_pretrained(str(llm))


def test_adapter_bin_is_read_weights_only(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    llm = write_llm(tmp_path / "vicuna", model, tokenizer)
    evil = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(1), "note": object()}, evil)
    with pytest.raises(CheckpointLoadError, match="weights-only"):
        load_pretrained(
            str(llm),
            video_tower=str(video_dir),
            image_tower=str(image_dir),
            pretrain_mm_mlp_adapter=str(evil),
        )


def _wordlevel_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with no media tokens (as Vicuna's): 3 specials + 20 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": 3 + i for i in range(20)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_tokens_added_and_embeddings_resized_to_the_mean(tmp_path, towers) -> None:
    model, _ = build_preset("tiny", seed=6, text_config={"vocab_size": 23})
    llm = write_llm(tmp_path / "vicuna", model, _wordlevel_tokenizer())
    video_dir, image_dir = towers

    loaded = load_pretrained(str(llm), video_tower=str(video_dir), image_tower=str(image_dir), strict=False)

    tok = loaded.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [23, 24, 25]
    assert tok.pad_token == "<pad>"
    assert tok.tokenize("w1 <image> w2") == ["w1", "<image>", "w2"]  # a real special token, never split
    emb = loaded.model.language_model.get_input_embeddings().weight
    head = loaded.model.language_model.get_output_embeddings().weight
    assert emb.shape == (26, 128) and head.shape == (26, 128)
    src_emb = model.language_model.get_input_embeddings().weight
    assert torch.equal(emb[:23], src_emb)
    assert torch.allclose(emb[23:], src_emb.mean(0).expand(3, -1))
    assert torch.allclose(head[23:], model.language_model.lm_head.weight.mean(0).expand(3, -1))
    assert loaded.model.config.text_config.vocab_size == 26
    assert (
        loaded.model.config.image_token_id,
        loaded.model.config.video_token_id,
        loaded.model.config.pad_token_id,
    ) == (23, 24, 25)
    text = loaded.report.format()
    assert "added special tokens <image>, <video>, <pad> (23 -> 26)" in text
    assert "embeddings resized 23 -> 26" in text


def test_our_layout_round_trip_and_dtype(tmp_path, source) -> None:
    model, tokenizer = source
    model.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    loaded = load_pretrained(str(tmp_path / "merged"))
    assert loaded.report.layout == "ours"
    assert_same_weights(loaded.model, model.state_dict())
    assert_every_tensor_used(loaded.report, allowed_ignored=set())
    assert loaded.report.notes == []  # nothing added, nothing resized, nothing defaulted

    half = load_pretrained(str(tmp_path / "merged"), torch_dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    reference = model.state_dict()["video_tower.encoder.layers.1.temporal_attn.q_proj.weight"].to(
        torch.bfloat16
    )
    assert torch.equal(
        half.model.state_dict()["video_tower.encoder.layers.1.temporal_attn.q_proj.weight"], reference
    )


def test_meta_device_reads_structure_only(tmp_path, source, towers) -> None:
    model, tokenizer = source
    video_dir, image_dir = towers
    ckpt = write_original(tmp_path / "ckpt", model, tokenizer, video_dir=video_dir, image_dir=image_dir)
    for shard in ckpt.glob("*.safetensors"):
        shard.unlink()  # not needed on the meta device

    loaded = load_pretrained(str(ckpt), device="meta")

    assert all(p.is_meta for p in loaded.model.parameters())
    assert loaded.report.sources == []
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_info_on_a_checkpoint_directory_reads_no_weights(tmp_path, source, towers, capsys) -> None:
    from vidlora import info as info_command
    from vidlora.model import info

    model, tokenizer = source
    video_dir, image_dir = towers
    ckpt = write_original(tmp_path / "ckpt", model, tokenizer, video_dir=video_dir, image_dir=image_dir)
    for shard in ckpt.glob("*.safetensors"):
        shard.unlink()

    assert (
        info_command.main(
            ["--model_name_or_path", str(ckpt), "--lora_enable", "True", "--lora_r", "8", "--json"]
        )
        == 0
    )

    result = json.loads(capsys.readouterr().out)
    assert result["parts"] == info.count_parameters(model).parts
    assert result["lora"] == 34_816


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def llm_dirs(tmp_path, source, towers):
    model, tokenizer = source
    llm = write_llm(tmp_path / "vicuna", model, tokenizer)
    adapter = write_adapter(tmp_path / "mm_projector.safetensors", model)
    video_dir, image_dir = towers
    return llm, {
        "video_tower": str(video_dir),
        "image_tower": str(image_dir),
        "pretrain_mm_mlp_adapter": str(adapter),
    }


def _edit_llm(llm: Path, edit) -> None:
    state = load_file(str(llm / "model.safetensors"))
    edit(state)
    save_file(state, str(llm / "model.safetensors"))


def test_missing_key_raises_and_names_it(llm_dirs) -> None:
    llm, kwargs = llm_dirs
    _edit_llm(llm, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointLoadError,
        match=r"missing \(1\):\n    language_model: 1 \(language_model\.model\.layers\.1\.mlp\.up_proj\.weight\)",
    ):
        load_pretrained(str(llm), **kwargs)


def test_shape_mismatch_raises_naming_key_and_both_shapes(llm_dirs) -> None:
    llm, kwargs = llm_dirs
    _edit_llm(llm, lambda s: s.update({"model.norm.weight": torch.ones(96)}))
    with pytest.raises(
        CheckpointLoadError, match=r"language_model\.model\.norm\.weight: checkpoint \[96\] vs model \[128\]"
    ):
        load_pretrained(str(llm), **kwargs)


def test_unknown_extra_weight_raises(llm_dirs) -> None:
    llm, kwargs = llm_dirs
    _edit_llm(llm, lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(128)}))
    with pytest.raises(
        CheckpointLoadError, match=r"(?s)unexpected \(1\).*model\.layers\.0\.self_attn\.q_norm\.weight"
    ):
        load_pretrained(str(llm), **kwargs)


def test_non_strict_loads_and_reports(llm_dirs, source) -> None:
    llm, kwargs = llm_dirs

    def edit(state):
        state.pop("model.layers.1.mlp.up_proj.weight")
        state["model.norm.weight"] = torch.ones(96)
        state["extra.weight"] = torch.ones(2)

    _edit_llm(llm, edit)
    loaded = load_pretrained(str(llm), strict=False, **kwargs)

    report = loaded.report
    assert report.missing == ["language_model.model.layers.1.mlp.up_proj.weight"]
    assert report.mismatched[0][:3] == ("language_model.model.norm.weight", (96,), (128,))
    assert [u[:2] for u in report.unexpected] == [("extra.weight", "language_model.extra.weight")]
    assert "2 missing weight(s) initialised at random (non-strict load)" in report.format()
    # Everything else is the source's.
    model, _ = source
    got = loaded.model.state_dict()
    assert torch.equal(
        got["language_model.model.layers.0.mlp.up_proj.weight"],
        model.state_dict()["language_model.model.layers.0.mlp.up_proj.weight"],
    )
    assert not got["language_model.model.norm.weight"].is_meta


def test_report_format_groups_by_part(llm_dirs) -> None:
    llm, kwargs = llm_dirs
    _edit_llm(llm, lambda s: [s.pop(k) for k in [k for k in s if k.startswith("model.layers.1.")]])
    with pytest.raises(CheckpointLoadError) as err:
        load_pretrained(str(llm), **kwargs)
    message = str(err.value)
    assert "missing (9):" in message
    assert "language_model: 9 (language_model.model.layers.1." in message
    assert ", ... (+4)" in message


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError,
        match=r"LanguageBind/Video-LLaVA-7B: not a local directory, and the Hugging Face Hub could not provide it",
    ):
        load_pretrained("LanguageBind/Video-LLaVA-7B", cache_dir=str(tmp_path))


def test_not_a_directory_nor_hub_id(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_pretrained(str(tmp_path / "a" / "b" / "c"))


def test_presets() -> None:
    big = load_pretrained("videollava-7b", device="meta")
    assert big.report.layout == "preset" and big.report.temporal_attention is True
    assert next(big.model.parameters()).is_meta
    with pytest.raises(ValueError, match="shape-only"):
        load_pretrained("videollava-7b")
    tiny = load_pretrained("tiny", seed=3, torch_dtype="bfloat16")
    assert tiny.report.layout == "preset" and "randomly initialised (seed 3)" in tiny.report.format()
    reference, _ = build_preset("tiny", seed=3)
    key = "video_tower.encoder.layers.0.temporal_attn.q_proj.weight"
    assert torch.equal(tiny.model.state_dict()[key], reference.state_dict()[key].to(torch.bfloat16))


def test_sharded_index_lists_its_shards_and_a_broken_index_names_the_file(tmp_path) -> None:
    from vidlora.errors import NotFoundError, UsageError
    from vidlora.model.hub import keys_of, weight_files

    state = {f"w{i}": torch.full((2,), float(i)) for i in range(5)}
    _save_sharded(state, tmp_path, shards=2)
    files = weight_files(tmp_path)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(keys_of(files)) == sorted(state)

    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {"w0": "model-00001-of-')
    with pytest.raises(UsageError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        weight_files(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(UsageError, match=r'model\.safetensors\.index\.json: no "weight_map" object'):
        weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"w0": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(NotFoundError, match=r"shard\(s\) listed but not present: .*model-00009-of-00009"):
        weight_files(tmp_path)
