"""CLIP image tower and LanguageBind video tower: key names, layer order (numpy reference), and the
temporal branch (zeroed -> per-frame image tower; live -> frames mix within a video only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidlora.model.configuration import LanguageBindVideoConfig
from vidlora.model.towers import ClipVisionTower, LanguageBindEncoderLayer, LanguageBindVideoTower

HIDDEN, HEADS, LAYERS, FRAMES, SIZE, PATCH = 32, 4, 2, 4, 32, 16
TOKENS = (SIZE // PATCH) ** 2 + 1  # 4 patches + CLS


def _video_config(attn: str = "eager", **overrides) -> LanguageBindVideoConfig:
    fields = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
        hidden_act="gelu",
        num_frames=FRAMES,
        add_time_attn=True,
    )
    fields.update(overrides)
    config = LanguageBindVideoConfig(**fields)
    config._attn_implementation = attn
    return config


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from N(0, 0.2) (norm weights around 1) so that no path is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1.0 if ("norm" in name and name.endswith("weight")) else noise)


def _zero_temporal(tower: LanguageBindVideoTower) -> None:
    with torch.no_grad():
        for layer in tower.encoder.layers:
            layer.temporal_embedding.zero_()
            layer.temporal_attn.out_proj.weight.zero_()
            layer.temporal_attn.out_proj.bias.zero_()


@pytest.fixture
def video_tower() -> LanguageBindVideoTower:
    tower = LanguageBindVideoTower(_video_config()).eval()
    _randomize(tower, seed=0)
    return tower


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_video_tower_key_names_are_languagebind_vision_model_keys():
    tower = LanguageBindVideoTower(_video_config())
    keys = set(tower.state_dict())
    layer0 = {k.removeprefix("encoder.layers.0.") for k in keys if k.startswith("encoder.layers.0.")}
    attn = {f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}
    attn = {a.replace("o_proj", "out_proj") for a in attn}
    assert layer0 == (
        {f"self_attn.{a}" for a in attn}
        | {f"temporal_attn.{a}" for a in attn}
        | {
            f"{n}.{w}"
            for n in ("layer_norm1", "layer_norm2", "temporal_layer_norm1")
            for w in ("weight", "bias")
        }
        | {f"mlp.{fc}.{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")}
        | {"temporal_embedding"}
    )
    top = {k for k in keys if not k.startswith("encoder.layers.")}
    assert top == {
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "pre_layrnorm.bias",
        "post_layernorm.weight",
        "post_layernorm.bias",
    }
    assert tower.encoder.layers[0].temporal_embedding.shape == (1, FRAMES, HIDDEN)
    # 2 layers x 27 per-layer tensors + 7 top-level ones.
    assert len(keys) == LAYERS * 27 + 7


def test_image_tower_has_no_temporal_keys_and_same_spatial_keys():
    video = LanguageBindVideoTower(_video_config())
    image = ClipVisionTower(_video_config())
    temporal = {k for k in video.state_dict() if ".temporal_" in k}
    assert set(image.state_dict()) == set(video.state_dict()) - temporal
    assert len(temporal) == LAYERS * 11  # embedding + 4 projections x 2 + layer norm x 2


def test_zeroed_temporal_branch_equals_image_tower_on_each_frame(video_tower, pixels):
    _zero_temporal(video_tower)
    image_tower = ClipVisionTower(_video_config()).eval()
    shared = {k: v for k, v in video_tower.state_dict().items() if ".temporal_" not in k}
    image_tower.load_state_dict(shared, strict=True)

    with torch.no_grad():
        video_states = video_tower(pixels)
        # Each frame separately through the image tower.
        frame_states = [image_tower(pixels[:, t]) for t in range(FRAMES)]

    assert len(video_states) == LAYERS + 1
    for k, hidden in enumerate(video_states):
        assert hidden.shape == (2, FRAMES, TOKENS, HIDDEN)
        for t in range(FRAMES):
            # Exactly zero is added by the temporal step; the rest is the same arithmetic, on a batch
            # of B*T frames instead of B. With one thread the two are bit-identical (measured 0.0);
            # with two, BLAS splits the larger batch differently: max 2.9e-6 measured on values up
            # to 8.9 (a few float32 ulps, propagated through the layer norms), hence atol 5e-6.
            torch.testing.assert_close(hidden[:, t], frame_states[t][k], atol=5e-6, rtol=0)


def test_live_temporal_branch_mixes_frames_within_a_video_only(video_tower, pixels):
    changed = pixels.clone()
    changed[0, 3] += 1.0  # video 0, frame 3
    with torch.no_grad():
        before = video_tower(pixels)
        after = video_tower(changed)
    # Entry 0 is per-frame (embeddings + pre_layrnorm): frame 0 cannot see frame 3 yet.
    torch.testing.assert_close(before[0][0, 0], after[0][0, 0], atol=0, rtol=0)
    for k in range(1, LAYERS + 1):
        # Frame 0 of video 0 changes through the temporal attention ...
        assert (before[k][0, 0] - after[k][0, 0]).abs().max() > 1e-2
        # ... but video 1 is untouched: attention never crosses videos.
        torch.testing.assert_close(before[k][1], after[k][1], atol=0, rtol=0)


def test_live_temporal_branch_changes_the_output(video_tower, pixels):
    with torch.no_grad():
        live = video_tower(pixels)[-1]
        _zero_temporal(video_tower)
        zeroed = video_tower(pixels)[-1]
    assert (live - zeroed).abs().max() > 1e-1


def _np_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_attention(x: np.ndarray, p: dict[str, np.ndarray], prefix: str, heads: int) -> np.ndarray:
    """Bidirectional multi-head attention of x [B, S, D], CLIPAttention's weights `prefix.{q,k,v,out}_proj`."""
    b, s, d = x.shape
    hd = d // heads

    def proj(name: str, inp: np.ndarray) -> np.ndarray:
        return inp @ p[f"{prefix}.{name}.weight"].T + p[f"{prefix}.{name}.bias"]

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(b, s, heads, hd).transpose(0, 2, 1, 3)

    q, k, v = (split(proj(n, x)) for n in ("q_proj", "k_proj", "v_proj"))
    scores = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    att = scores / scores.sum(-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
    return proj("out_proj", out)


def _np_languagebind_layer(
    x: np.ndarray, p: dict[str, np.ndarray], t: int, heads: int, eps: float
) -> np.ndarray:
    """One LanguageBind video encoder layer, written from LanguageBind's modeling_video.py (PKU-YuanGroup/LanguageBind)."""
    bt, n, d = x.shape
    b = bt // t
    erf = np.vectorize(math.erf)
    v = x.reshape(b, t, n, d)
    v = v + p["temporal_embedding"][0, :t][None, :, None, :]  # per frame, every token
    y = v.transpose(0, 2, 1, 3).reshape(b * n, t, d)  # (b t) n d -> (b n) t d
    y = _np_attention(
        _np_layer_norm(y, p["temporal_layer_norm1.weight"], p["temporal_layer_norm1.bias"], eps),
        p,
        "temporal_attn",
        heads,
    )
    v = v + y.reshape(b, n, t, d).transpose(0, 2, 1, 3)
    x = v.reshape(bt, n, d)
    x = x + _np_attention(
        _np_layer_norm(x, p["layer_norm1.weight"], p["layer_norm1.bias"], eps), p, "self_attn", heads
    )
    h = _np_layer_norm(x, p["layer_norm2.weight"], p["layer_norm2.bias"], eps)
    h = h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # exact GELU ("gelu")
    h = h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x + h


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_languagebind_layer_matches_numpy_reference(attn):
    config = _video_config(attn=attn)
    layer = LanguageBindEncoderLayer(config).eval()
    _randomize(layer, seed=2)
    x = torch.randn(3 * FRAMES, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = layer(x).numpy()
    params = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    ref = _np_languagebind_layer(x.double().numpy(), params, FRAMES, HEADS, config.layer_norm_eps)
    # float32 layer vs float64 reference on O(1) activations: atol 2e-5.
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    # The reference is not trivially close to the input (the layer does something).
    assert np.abs(ref - x.double().numpy()).max() > 0.5


def test_video_tower_rejects_wrong_frame_count_and_rank(video_tower):
    with pytest.raises(ValueError, match="built for 4 frames per video, got 3"):
        video_tower(torch.zeros(1, 3, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"video tower expects pixels \[B, T, 3, H, W\]"):
        video_tower(torch.zeros(2, 3, SIZE, SIZE))
    image = ClipVisionTower(_video_config())
    with pytest.raises(ValueError, match=r"image tower expects pixels \[B, 3, H, W\]"):
        image(torch.zeros(1, 2, 3, SIZE, SIZE))


def test_single_frame_tower_skips_temporal_embedding_but_keeps_temporal_attention():
    # LanguageBind adds the temporal embedding only when num_frames != 1; temporal attention over one
    # frame is out_proj(v_proj(LN(x))) for every token.
    config = _video_config(num_frames=1)
    layer = LanguageBindEncoderLayer(config).eval()
    _randomize(layer, seed=4)
    x = torch.randn(2, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = layer(x)
        y = layer.temporal_attn.out_proj(layer.temporal_attn.v_proj(layer.temporal_layer_norm1(x)))
        expected = super(LanguageBindEncoderLayer, layer).forward(x + y, None)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
