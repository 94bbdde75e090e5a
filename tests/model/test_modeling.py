"""VideoLlavaForCausalLM on a small model built from an explicit config: feature scattering, mixed
batches == rows alone, count errors, generate with/without cache, run_all_towers, checkpointing,
embeddings, save/load; plus the projector builder and the config round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

from vidlora.model.configuration import LanguageBindVideoConfig, VideoLlavaConfig
from vidlora.model.modeling import VideoLlavaForCausalLM, register_auto_classes
from vidlora.model.projector import build_projector

VOCAB, IMG, VID, PAD = 120, 100, 101, 102
SIZE, PATCH, FRAMES = 32, 16, 4
N_IMAGE = (SIZE // PATCH) ** 2  # 4 tokens per image (CLS dropped)
N_VIDEO = FRAMES * (N_IMAGE + 1)  # 20 tokens per video (CLS kept per frame)


def _config(**overrides) -> VideoLlavaConfig:
    tower = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=PATCH,
        hidden_act="gelu",
    )
    fields = dict(
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_config=CLIPVisionConfig(**tower),
        video_config=LanguageBindVideoConfig(**tower, num_frames=FRAMES),
        image_token_id=IMG,
        video_token_id=VID,
        pad_token_id=PAD,
    )
    fields.update(overrides)
    return VideoLlavaConfig(**fields)


def _model(**overrides) -> VideoLlavaForCausalLM:
    torch.manual_seed(0)
    return VideoLlavaForCausalLM(_config(**overrides)).eval()


@pytest.fixture(scope="module")
def model() -> VideoLlavaForCausalLM:
    return _model()


def _pixels(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Four rows: video only, image only, video + 2 images, text only (media in text order).
ROWS = [
    [1, 10, 11, *[VID] * N_VIDEO, 12, 13, 2],
    [1, 14, *[IMG] * N_IMAGE, 15, 16],
    [1, *[VID] * N_VIDEO, 17, *[IMG] * N_IMAGE, 18, *[IMG] * N_IMAGE, 19, 20, 2],
    [1, 21, 22, 23, 24],
]
VIDEOS = {0: [0], 2: [1]}  # row -> indices into the stacked videos
IMAGES = {1: [0], 2: [1, 2]}  # row -> indices into the stacked images


def _labels(ids: list[int]) -> list[int]:
    # As the tokenizer step does: no loss on media positions or the first token.
    return [-100 if (i == 0 or t in (IMG, VID)) else t for i, t in enumerate(ids)]


def _batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch (the collator's layout)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(_labels(r))
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _inputs(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """`_batch` without labels: the model then returns logits at every position."""
    batch = _batch(rows)
    del batch["labels"]
    return batch


@pytest.fixture(scope="module")
def media() -> tuple[torch.Tensor, torch.Tensor]:
    return _pixels(2, FRAMES, 3, SIZE, SIZE, seed=10), _pixels(3, 3, SIZE, SIZE, seed=11)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (0 where ignored), [B, L-1]."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none"
    )


def test_feature_shapes(model, media):
    videos, images = media
    with torch.no_grad():
        assert model.get_image_features(images).shape == (3, N_IMAGE, 64)
        assert model.get_video_features(videos).shape == (2, N_VIDEO, 64)


def test_video_features_are_selected_layer_per_frame_with_cls(model, media):
    videos, _ = media
    with torch.no_grad():
        hidden = model.video_tower(videos)[-2]  # [2, T, 5, 32]
        expected = model.mm_projector(hidden.reshape(2, FRAMES * (N_IMAGE + 1), 32))
        image_hidden = model.image_tower(media[1])[-2]
        expected_images = model.mm_projector(image_hidden[:, 1:])
        torch.testing.assert_close(model.get_video_features(videos), expected, atol=0, rtol=0)
        torch.testing.assert_close(model.get_image_features(media[1]), expected_images, atol=0, rtol=0)


def test_forward_matches_hand_scattered_embeddings(model, media):
    videos, images = media
    batch = _inputs(ROWS)
    with torch.no_grad():
        out = model(**batch, pixel_values_images=images, pixel_values_videos=videos)
        # Independent scatter: walk every row, fill each placeholder run with the next media's tokens.
        embeds = model.get_input_embeddings()(batch["input_ids"]).clone()
        image_feats = model.get_image_features(images)
        video_feats = model.get_video_features(videos)
        next_image = next_video = 0
        for b, row in enumerate(ROWS):
            pos = 0
            while pos < len(row):
                if row[pos] == IMG:
                    embeds[b, pos : pos + N_IMAGE] = image_feats[next_image]
                    next_image, pos = next_image + 1, pos + N_IMAGE
                elif row[pos] == VID:
                    embeds[b, pos : pos + N_VIDEO] = video_feats[next_video]
                    next_video, pos = next_video + 1, pos + N_VIDEO
                else:
                    pos += 1
        ref = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)


def test_mixed_batch_equals_rows_alone(model, media):
    videos, images = media
    batch = _batch(ROWS)
    with torch.no_grad():
        out = model(**batch, pixel_values_images=images, pixel_values_videos=videos)
        logits = model(**_inputs(ROWS), pixel_values_images=images, pixel_values_videos=videos).logits
        batch_terms = _token_losses(logits, batch["labels"])
        total, count = 0.0, 0
        for i, row in enumerate(ROWS):
            alone = _batch([row])
            kwargs = {}
            if i in VIDEOS:
                kwargs["pixel_values_videos"] = videos[VIDEOS[i]]
            if i in IMAGES:
                kwargs["pixel_values_images"] = images[IMAGES[i]]
            row_out = model(**alone, **kwargs)
            row_logits = model(**_inputs([row]), **kwargs).logits
            n = len(row)
            # float32, same weights, only padding differs: atol 1e-5 on logits and loss terms.
            torch.testing.assert_close(logits[i, :n], row_logits[0], atol=1e-5, rtol=0)
            row_terms = _token_losses(row_logits, alone["labels"])[0]
            torch.testing.assert_close(batch_terms[i, : n - 1], row_terms, atol=1e-5, rtol=0)
            valid = int((alone["labels"][0, 1:] != -100).sum())
            total += float(row_out.loss) * valid
            count += valid
    # The batch loss is the mean over all trained tokens of all rows.
    assert count == 5 + 3 + 5 + 4
    assert abs(float(out.loss) - total / count) < 1e-5


def test_media_change_only_affects_later_positions(model, media):
    videos, images = media
    batch = _inputs([ROWS[2]])
    first_video = 1  # position of the first <video> token in row 2
    with torch.no_grad():
        a = model(**batch, pixel_values_videos=videos[1:], pixel_values_images=images[1:]).logits
        b = model(**batch, pixel_values_videos=videos[1:] + 0.5, pixel_values_images=images[1:]).logits
    torch.testing.assert_close(a[0, :first_video], b[0, :first_video], atol=0, rtol=0)
    assert (a[0, first_video:] - b[0, first_video:]).abs().max() > 1e-3


def test_count_mismatch_names_modality_and_counts(model, media):
    videos, images = media
    one_image_row = _batch([[1, 14, *[IMG] * (N_IMAGE + 1), 15]])
    with pytest.raises(
        ValueError, match=r"image: input_ids hold 5 <image> token positions .* give 4 feature tokens"
    ):
        model(**one_image_row, pixel_values_images=images[:1])
    short_video_row = _batch([[1, *[VID] * (N_VIDEO - 1), 15]])
    with pytest.raises(
        ValueError, match=r"video: input_ids hold 19 <video> token positions .* give 20 feature tokens"
    ):
        model(**short_video_row, pixel_values_videos=videos[:1])
    # Two videos' pixels for one video's placeholders.
    with pytest.raises(
        ValueError, match=r"video: input_ids hold 20 .* give 40 feature tokens \(2 videos x 20"
    ):
        model(**_batch([ROWS[0]]), pixel_values_videos=videos)
    # Placeholders but no pixels at all.
    with pytest.raises(
        ValueError, match=r"image: input_ids hold 4 <image> token positions .* \(0 feature tokens\)"
    ):
        model(**_batch([ROWS[1]]))


def test_media_without_tower_or_ids_is_an_error(media):
    videos, _ = media
    no_video = _model(video_config=None)
    assert no_video.video_tower is None
    with pytest.raises(ValueError, match="no video tower"):
        no_video(**_batch([ROWS[0]]), pixel_values_videos=videos[:1])
    with torch.no_grad():
        embeds = no_video.get_input_embeddings()(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="media pixels need input_ids"):
        no_video(inputs_embeds=embeds, pixel_values_images=media[1][:1])


def test_generate_with_cache_equals_without_cache(model, media):
    videos, _ = media
    prompt = torch.tensor([[1, 10, *[VID] * N_VIDEO, 11, 12]])
    common = dict(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        pixel_values_videos=videos[:1],
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=PAD,
        # A random model may pick a media id; without a cache that would be a 21st <video> slot.
        suppress_tokens=[IMG, VID, PAD],
    )
    with torch.no_grad():
        cached = model.generate(**common, use_cache=True)
        uncached = model.generate(**common, use_cache=False)
    assert cached.shape == (1, prompt.shape[1] + 8)
    assert torch.equal(cached, uncached)
    # Greedy decoding by hand, full recompute each step: the same tokens.
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=ids, pixel_values_videos=videos[:1]).logits[:, -1]
            logits[:, [IMG, VID, PAD]] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)
    # The video is actually used.
    with torch.no_grad():
        la = model(input_ids=prompt, pixel_values_videos=videos[:1]).logits[0, -1]
        lb = model(input_ids=prompt, pixel_values_videos=videos[1:]).logits[0, -1]
    assert (la - lb).abs().max() > 1e-3


def test_placeholder_id_in_a_decoding_step_is_an_ordinary_token(model, media):
    video = media[0][:1]
    prompt = torch.tensor([[1, 10, *[VID] * N_VIDEO, 11]])
    with torch.no_grad():
        prefill = model(input_ids=prompt, pixel_values_videos=video, use_cache=True)
        # A generated <image> id with a filled cache and no pixels: no error, plain embedding.
        step = model(input_ids=torch.tensor([[IMG]]), cache=prefill.cache, use_cache=True)
        embeds = model.get_input_embeddings()(torch.cat([prompt, torch.tensor([[IMG]])], dim=1)).clone()
        embeds[0, 2 : 2 + N_VIDEO] = model.get_video_features(video)[0]
        ref = model.language_model(inputs_embeds=embeds).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], ref, atol=1e-5, rtol=0)


def test_run_all_towers_adds_exact_zero_and_uses_the_same_parameters_as_a_media_batch(media):
    videos, images = media
    text_only = _batch([ROWS[3]])
    plain, synced = _model(), _model()
    seen: list[str] = []
    synced.image_tower.register_forward_hook(lambda *_: seen.append("image"))
    synced.video_tower.register_forward_hook(lambda *_: seen.append("video"))

    out_plain = plain(**text_only)
    out_synced = synced(**text_only, run_all_towers=True)
    assert seen == ["image", "video"]
    torch.testing.assert_close(out_synced.logits, out_plain.logits, atol=0, rtol=0)
    out_plain.loss.backward()
    out_synced.loss.backward()
    assert all(p.grad is None for p in plain.mm_projector.parameters())
    text_used = {n for n, p in synced.named_parameters() if p.grad is not None}
    for name, p in synced.named_parameters():
        if p.grad is not None and not name.startswith("language_model."):
            assert torch.count_nonzero(p.grad) == 0, name  # exactly zero gradient for media weights

    # A batch with both media touches exactly the same parameters (ZeRO-3 ranks stay in step).
    media_model = _model()
    media_model(
        **_batch(ROWS), pixel_values_images=images, pixel_values_videos=videos, run_all_towers=True
    ).loss.backward()
    media_used = {n for n, p in media_model.named_parameters() if p.grad is not None}
    assert text_used == media_used
    # Everything but what the features never reach: towers' last layer (select layer -2), post_layernorm.
    unused = {n for n, _ in synced.named_parameters()} - text_used
    assert unused and all(
        n.split(".")[1] == "post_layernorm" or n.split(".")[1:4] == ["encoder", "layers", "2"] for n in unused
    )

    # Image-only batch: only the video tower runs on a dummy.
    seen.clear()
    with torch.no_grad():
        synced(**_batch([ROWS[1]]), pixel_values_images=images[:1], run_all_towers=True)
    assert seen == ["image", "video"]
    # Video-only batch: the image tower's dummy still runs *first*, so a rank holding a video and
    # a rank holding an image call the towers in the same order (ZeRO-3 gathers in call order).
    seen.clear()
    with torch.no_grad():
        synced(**_batch([ROWS[0]]), pixel_values_videos=videos[:1], run_all_towers=True)
    assert seen == ["image", "video"]


def test_frozen_towers_run_without_autograd(model, media):
    m = _model()
    for p in [*m.image_tower.parameters(), *m.video_tower.parameters()]:
        p.requires_grad_(False)
    feats = m.get_video_features(media[0][:1])
    assert feats.requires_grad  # through the trainable projector
    hidden = m._select_hidden(m.video_tower, media[0][:1])
    assert hidden.grad_fn is None


def test_gradient_checkpointing_is_llm_only_and_exact(media):
    videos, images = media
    batch = _batch(ROWS)
    ref, ckpt = _model(), _model()
    ckpt.activation_checkpointing_enable()
    llm_layers = list(ckpt.language_model.model.layers)
    tower_layers = [*ckpt.image_tower.encoder.layers, *ckpt.video_tower.encoder.layers]
    assert all(layer.gradient_checkpointing for layer in llm_layers)
    assert not any(layer.gradient_checkpointing for layer in tower_layers)
    losses = []
    for m in (ref, ckpt):
        m.train()
        loss = m(**batch, pixel_values_images=images, pixel_values_videos=videos).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)


def test_input_require_grads_hooks_the_llm_embedding():
    m = _model()
    m.enable_input_require_grads()
    m.requires_grad_(False)
    embeds = m.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert embeds.requires_grad


def test_embeddings_delegate_to_the_llm_and_resize(model):
    m = _model()
    assert m.get_input_embeddings() is m.language_model.model.embed_tokens
    assert m.get_output_embeddings() is m.language_model.lm_head
    m.resize_token_embeddings(130)
    assert m.config.text_config.vocab_size == 130
    assert m.get_input_embeddings().weight.shape == (130, 64)
    assert m(input_ids=torch.tensor([[1, 129]])).logits.shape == (1, 2, 130)


def test_tied_llm_embeddings_are_tied_through_the_wrapper():
    text = _config().text_config
    text.tie_word_embeddings = True
    m = _model(text_config=text)
    assert m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight
    assert "language_model.lm_head.weight" in m.all_tied_weights_keys


def test_no_split_modules_cover_llm_and_tower_layers(model):
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer", "LanguageBindEncoderLayer"} <= set(
        model._no_split_modules
    )


def test_save_and_load_round_trip(tmp_path, model, media):
    videos, images = media
    batch = _batch(ROWS)
    model.save_pretrained(tmp_path)
    loaded = VideoLlavaForCausalLM.from_pretrained(tmp_path).eval()
    register_auto_classes()
    register_auto_classes()  # idempotent
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is VideoLlavaForCausalLM
    assert type(AutoConfig.from_pretrained(tmp_path)) is VideoLlavaConfig
    with torch.no_grad():
        expected = model(**batch, pixel_values_images=images, pixel_values_videos=videos).logits
        for m in (loaded, auto):
            got = m(**batch, pixel_values_images=images, pixel_values_videos=videos).logits
            torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ---- config ---------------------------------------------------------------------------------------


def test_config_derived_lengths_and_round_trip(tmp_path):
    config = _config()
    assert (config.image_seq_length, config.frame_seq_length, config.num_frames) == (4, 5, 4)
    assert (config.video_seq_length, config.mm_hidden_size) == (20, 32)
    assert (config.mm_projector_type, config.mm_vision_select_layer, config.ignore_index) == (
        "mlp2x_gelu",
        -2,
        -100,
    )
    assert config.prompt_tokenization == "split_at_media"
    config.save_pretrained(tmp_path)
    loaded = VideoLlavaConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.video_config, LanguageBindVideoConfig)
    assert isinstance(loaded.image_config, CLIPVisionConfig)
    assert (loaded.video_config.num_frames, loaded.video_config.add_time_attn) == (4, True)


def test_config_accepts_plain_clip_config_for_video_and_absent_towers():
    plain = CLIPVisionConfig(hidden_size=32, num_attention_heads=4, num_frames=3, add_time_attn=False)
    config = _config(video_config=plain, image_config=None)
    assert isinstance(config.video_config, LanguageBindVideoConfig)
    assert (config.video_config.num_frames, config.video_config.add_time_attn) == (3, False)
    assert config.image_config is None
    with pytest.raises(ValueError, match="no image tower"):
        _ = config.image_seq_length


def test_config_rejects_bad_values():
    wide = LanguageBindVideoConfig(hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"same hidden size .* got image 32 and video 64"):
        _config(video_config=wide)
    with pytest.raises(
        ValueError, match=r"mm_vision_select_layer -5 is out of range .* 3 layers \(4 hidden states\)"
    ):
        _config(mm_vision_select_layer=-5)
    assert _config(mm_vision_select_layer=-4).mm_vision_select_layer == -4
    with pytest.raises(ValueError, match="ignore_index must be -100"):
        _config(ignore_index=-1)
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        LanguageBindVideoConfig(num_frames=0)


# ---- projector ------------------------------------------------------------------------------------


def test_projector_mlp2x_gelu_keys_and_shapes():
    proj = build_projector("mlp2x_gelu", 1024, 4096)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {
        "0.weight": (4096, 1024),
        "0.bias": (4096,),
        "2.weight": (4096, 4096),
        "2.bias": (4096,),
    }
    assert sum(p.numel() for p in proj.parameters()) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    assert isinstance(proj[1], torch.nn.GELU) and proj[1].approximate == "none"


def test_projector_kinds_compute_what_they_say():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    lin = build_projector("linear", 8, 6)
    assert set(lin.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    mlp3 = build_projector("mlp3x_gelu", 8, 6)
    assert set(mlp3.state_dict()) == {f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    h = F.gelu(x @ mlp3[0].weight.T + mlp3[0].bias)
    h = F.gelu(h @ mlp3[2].weight.T + mlp3[2].bias)
    torch.testing.assert_close(mlp3(x), h @ mlp3[4].weight.T + mlp3[4].bias)
    assert build_projector("mlp1x_gelu", 8, 6)(x).shape == (2, 5, 6)
    ident = build_projector("identity", 8, 8)
    assert torch.equal(ident(x), x) and not list(ident.parameters())


@pytest.mark.parametrize("kind", ["mlp", "mlp2x_relu", "conv", "mlp0x_gelu", "MLP2x_gelu"])
def test_projector_unknown_kinds_name_the_accepted_forms(kind):
    with pytest.raises(ValueError, match=r"'linear', 'mlp\{N\}x_gelu' .* or 'identity'"):
        build_projector(kind, 8, 8)


def test_projector_identity_needs_equal_widths():
    with pytest.raises(ValueError, match="in_dim=8, out_dim=6"):
        build_projector("identity", 8, 6)


# ---- loss at the labelled positions only ----------------------------------------------------------


def _lora_model() -> torch.nn.Module:
    """The training recipe (towers frozen, projector full, LoRA on the LLM) with nonzero LoRA B, so
    every trainable matrix gets a gradient."""
    from vidlora.model.lora import apply_recipe, build_lora_config

    base = _model()
    trained = apply_recipe(base, build_lora_config(base, r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in (p for p in trained.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return trained


def _loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 40])
def test_labelled_positions_loss_equals_the_full_logits_loss(media, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    videos, images = media
    model = _lora_model()
    batch = _batch(ROWS)  # right-padded; row 3 is text only
    pixels = {"pixel_values_images": images, "pixel_values_videos": videos}
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    def compact() -> torch.Tensor:
        out = model(**batch, **pixels, **extra)
        # Logits at the 5 + 3 + 5 + 4 positions whose next label is trained (hand count), nowhere else.
        assert out.logits.shape == (17, VOCAB)
        return out.loss

    def full() -> torch.Tensor:
        # transformers' own causal-LM loss over the full [B, L, V] logits.
        logits = model(**_inputs(ROWS), **pixels).logits
        assert logits.shape == (4, batch["input_ids"].shape[1], VOCAB)
        return ForCausalLMLoss(logits, batch["labels"], VOCAB, **extra)

    loss, grads = _loss_and_grads(model, compact)
    ref_loss, ref_grads = _loss_and_grads(model, full)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    if num_items is not None:  # sum / 40, not the mean over the 17 terms
        with torch.no_grad():
            mean_loss = model(**batch, **pixels).loss
        assert float(loss) == pytest.approx(float(mean_loss) * 17 / 40, rel=1e-6)
    names = set(ref_grads)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("mm_projector" in n for n in names)
    for name, ref in ref_grads.items():
        assert float(ref.norm()) > 0, name
        relative = float((grads[name] - ref).norm() / ref.norm())
        assert relative <= 1e-6, (name, relative)


def test_labelled_loss_without_any_trained_token_is_nan_like_transformers(model):
    batch = _batch([[1, 21, 22]])
    batch["labels"][:] = -100
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (0, VOCAB)
    assert torch.isnan(out.loss)  # the mean over no terms, as ForCausalLMLoss gives
    with torch.no_grad():
        summed = model(**batch, num_items_in_batch=torch.tensor(3)).loss
    assert float(summed) == 0.0


def test_logits_to_keep_with_labels_is_refused(model):
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**_batch([[1, 21, 22]]), logits_to_keep=1)


def test_placeholder_count_check_reads_the_count_on_the_cpu_only():
    from host_reads import HostReads
    from vidlora.model.modeling import _check_count

    mask = torch.tensor([[True, True, False]])
    with HostReads() as reads:
        _check_count("image", IMG, mask, 2, "2 feature tokens")
    assert reads.count == 1  # on the CPU the count is read, to name it in the error
    with pytest.raises(ValueError, match=r"image: input_ids hold 2 <image> token positions \(id 100\) but 3"):
        _check_count("image", IMG, mask, 3, "3 feature tokens")
    # Off the CPU (meta stands in for an accelerator: a host read there would fail) the comparison
    # is queued on the device, without reading anything back.
    with HostReads() as reads:
        _check_count("image", IMG, mask.to("meta"), 3, "3 feature tokens")
    assert reads.count == 0
