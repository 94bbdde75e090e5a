"""preprocess_video / preprocess_image against an independent numpy reference of the original pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vidlora.data.transforms import CLIP_MEAN, CLIP_STD, PixelSpec, preprocess_image, preprocess_video

MEAN = np.array(CLIP_MEAN, dtype=np.float64)
STD = np.array(CLIP_STD, dtype=np.float64)


# ---- numpy reference (written from PyTorch's documented conventions, not from our code) ----


def source_index(in_size: int, out_size: int) -> np.ndarray:
    """align_corners=False source coordinate src = (dst + 0.5)·in/out − 0.5.

    PyTorch's CPU kernels take the scale ``in/out`` in float32 for float32 input and form the
    coordinate with a fused multiply-add (one rounding to float32). With coordinates up to ~400
    that rounding moves a tap weight by ~1e-6, which shows at 1e-5 on noise, so the reference
    rounds the same way: the product is exact in float64, then rounded once. The interpolation
    itself is done in float64.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    return (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps: source coordinate clamped at 0, right tap clamped to the last pixel."""
    src = np.maximum(source_index(in_size, out_size), np.float32(0))
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - np.floor(src)).astype(np.float64)


def resize_bilinear(x: np.ndarray, out_h: int, out_h_w: int) -> np.ndarray:
    """x: [..., H, W] float64."""
    y0, y1, wy = linear_taps(x.shape[-2], out_h)
    x0, x1, wx = linear_taps(x.shape[-1], out_h_w)
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the taps at offsets −1, 0, 1, 2 (PyTorch uses a = −0.75)."""

    def near(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix: align_corners=False source index (not clamped), border taps clamped."""
    src = source_index(in_size, out_size)
    i0 = np.floor(src).astype(int)
    weights = cubic_weights((src - np.floor(src)).astype(np.float64))
    matrix = np.zeros((out_size, in_size))
    for k, offset in enumerate((-1, 0, 1, 2)):
        taps = np.clip(i0 + offset, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), taps), weights[:, k])
    return matrix


def resize_bicubic(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """x: [..., H, W] float64; separable, no clamp of the result."""
    my = cubic_matrix(x.shape[-2], out_h)
    mx = cubic_matrix(x.shape[-1], out_w)
    return my @ x @ mx.T


def crop_center(x: np.ndarray, size: int) -> np.ndarray:
    h, w = x.shape[-2:]
    top, left = round((h - size) / 2), round((w - size) / 2)
    return x[..., top : top + size, left : left + size]


def reference_video(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T,H,W,3] → [T,3,S,S]: /255, normalise, bilinear short side → S (long = floor), crop."""
    x = frames.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    x = (x - MEAN[:, None, None]) / STD[:, None, None]
    h, w = x.shape[-2:]
    if w < h:
        out_h, out_w = math.floor(h / w * size), size
    else:
        out_h, out_w = size, math.floor(w / h * size)
    return crop_center(resize_bilinear(x, out_h, out_w), size)


def reference_image(image: np.ndarray, size: int, pad: bool) -> np.ndarray:
    """uint8 [H,W,3] → [3,S,S]: pad to square (int(255·mean), centred), /255, bicubic, crop, normalise."""
    if pad:
        h, w = image.shape[:2]
        side = max(h, w)
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        canvas[:] = [int(m * 255) for m in CLIP_MEAN]
        canvas[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = image
        image = canvas
    x = image.astype(np.float64).transpose(2, 0, 1) / 255.0
    h, w = x.shape[-2:]
    if w <= h:
        out_h, out_w = int(size * h / w), size
    else:
        out_h, out_w = size, int(size * w / h)
    x = crop_center(resize_bicubic(x, out_h, out_w), size)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


# ---- tests ----


def random_frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("height", "width", "size"), [(97, 171, 32), (171, 97, 32), (97, 171, 224), (171, 97, 224), (50, 50, 31)]
)
def test_video_matches_numpy_reference(height: int, width: int, size: int) -> None:
    frames = random_frames(3, height, width, seed=height + width)
    spec = PixelSpec(image_size=size)
    out = preprocess_video(frames, spec)
    assert out.shape == (3, 3, size, size) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_video(frames, size), atol=1e-5, rtol=0)
    # Tensor input gives the same numbers.
    assert torch.equal(preprocess_video(torch.from_numpy(frames), spec), out)


@pytest.mark.parametrize(
    ("height", "width", "size"), [(97, 171, 32), (171, 97, 32), (97, 171, 224), (33, 20, 45)]
)
@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_image_matches_numpy_reference(height: int, width: int, size: int, aspect: str) -> None:
    image = random_frames(1, height, width, seed=height * width)[0]
    spec = PixelSpec(image_size=size)
    out = preprocess_image(Image.fromarray(image), spec, aspect=aspect)
    assert out.shape == (3, size, size)
    np.testing.assert_allclose(
        out.numpy(), reference_image(image, size, pad=aspect == "pad"), atol=1e-5, rtol=0
    )
    assert torch.equal(preprocess_image(image, spec, aspect=aspect), out)


@pytest.mark.parametrize(("width", "columns"), [(7, [2, 3, 4, 5]), (6, [1, 2, 3, 4]), (5, [0, 1, 2, 3])])
def test_video_crop_offset_by_hand(width: int, columns: list[int]) -> None:
    # Height 4 = S, so the resize is the identity and the crop offset is visible directly:
    # left = int(round((W − 4) / 2)) = round(1.5) = 2, round(1.0) = 1, round(0.5) = 0 (Python rounds half to even).
    frames = np.zeros((1, 4, width, 3), dtype=np.uint8)
    frames[0] = (np.arange(width) * 10)[None, :, None]
    out = preprocess_video(frames, PixelSpec(image_size=4)).numpy()[0]
    raw = (out * STD[:, None, None] + MEAN[:, None, None]) * 255
    np.testing.assert_allclose(raw[:, 0, :], np.array(columns)[None, :].repeat(3, 0) * 10, atol=1e-3)


def test_video_resize_shape_by_hand() -> None:
    # 97×171 (h×w): short side 97 → 224, long floor(171/97·224) = floor(394.89) = 394, then crop to 224.
    frames = np.zeros((1, 97, 171, 3), dtype=np.uint8)
    out = preprocess_video(frames, PixelSpec())
    assert out.shape == (1, 3, 224, 224)
    # An all-black frame normalises to −mean/std everywhere, whatever the resampling.
    np.testing.assert_allclose(out[0].mean(dim=(1, 2)).numpy(), -MEAN / STD, atol=1e-6)


def test_pad_fill_colour_by_hand() -> None:
    spec = PixelSpec(image_size=8)
    assert spec.pad_color == (122, 116, 104)
    # A white 2-high × 8-wide strip is padded to 8×8: rows 0-2 and 5-7 are pad colour, rows 3-4 white.
    image = np.full((2, 8, 3), 255, dtype=np.uint8)
    out = preprocess_image(image, spec, aspect="pad").numpy()
    # No resize happens at 8 → 8, so pixels are exact: un-normalise and compare with the fill.
    raw = out * STD[:, None, None] + MEAN[:, None, None]
    np.testing.assert_allclose(raw[:, 0, 0] * 255, [122, 116, 104], atol=1e-3)
    np.testing.assert_allclose(raw[:, 7, 7] * 255, [122, 116, 104], atol=1e-3)
    np.testing.assert_allclose(raw[:, 3:5, :] * 255, 255, atol=1e-3)
    np.testing.assert_allclose(raw[:, 2, :] * 255, np.array([122, 116, 104])[:, None].repeat(8, 1), atol=1e-3)
    # Portrait 8-high × 3-wide: offset (8 − 3) // 2 = 2 columns of pad on the left, 3 on the right.
    tall = np.full((8, 3, 3), 255, dtype=np.uint8)
    raw = preprocess_image(tall, spec, aspect="pad").numpy() * STD[:, None, None] + MEAN[:, None, None]
    white_columns = np.where(np.isclose(raw[0, 0] * 255, 255, atol=1e-3))[0].tolist()
    assert white_columns == [2, 3, 4]


def test_flip_only_when_asked() -> None:
    frames = random_frames(2, 40, 30, seed=1)
    spec = PixelSpec(image_size=16)
    plain = preprocess_video(frames, spec)
    assert torch.equal(preprocess_video(frames, spec), plain)  # deterministic: no hidden random flip
    assert torch.equal(preprocess_video(frames, spec, flip=True), plain.flip(-1))
    image = frames[0]
    assert torch.equal(preprocess_image(image, spec, flip=True), preprocess_image(image, spec).flip(-1))


def test_bad_inputs() -> None:
    spec = PixelSpec(image_size=8)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_video(np.zeros((1, 8, 8, 3), dtype=np.float32), spec)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        preprocess_video(np.zeros((8, 8, 3), dtype=np.uint8), spec)
    with pytest.raises(ValueError, match="aspect"):
        preprocess_image(np.zeros((8, 8, 3), dtype=np.uint8), spec, aspect="crop")
    with pytest.raises(ValueError, match="image_size"):
        PixelSpec(image_size=0)


# ---- the original's order (normalise at full resolution, then resize, then crop) ----


def original_order_video(frames: np.ndarray, size: int) -> torch.Tensor:
    """Video-LLaVA's decord transform as written there: /255, normalise, bilinear resize, crop (float32)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    out_h, out_w = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
    x = torch.nn.functional.interpolate(
        x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False
    )
    top, left = round((out_h - size) / 2), round((out_w - size) / 2)
    return x[..., top : top + size, left : left + size]


def rendered_frames(t: int, height: int, width: int, seed: int) -> np.ndarray:
    """Camera-like frames: smooth gradients, flat areas and hard-edged shapes, slightly noisy."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        base = np.stack(
            [
                128 + 100 * np.sin(xs / width * 3 + i),
                128 + 100 * np.cos(ys / height * 2 - i),
                255 * (xs + ys) / (width + height),
            ],
            axis=-1,
        )
        for _ in range(4):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(2, max(3.0, height / 3))
            base[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = rng.integers(0, 256, size=3)
        base += rng.normal(0, 3, size=base.shape)
        frames[i] = np.clip(base, 0, 255).astype(np.uint8)
    return frames


# Max |new − original order| measured with torch 2.13 CPU: 7.2e-7 (a few float32 ulps of values up
# to ~2.1; 1 or 2 threads alike); the tolerance leaves headroom for other kernels' rounding.
ORIGINAL_ORDER_ATOL = 2e-6


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(720, 1280, 224), (1080, 1920, 224), (1920, 1080, 224), (480, 360, 224), (97, 171, 32), (50, 50, 31)],
)
@pytest.mark.parametrize("kind", ["random", "rendered"])
def test_video_equals_the_original_order(height: int, width: int, size: int, kind: str) -> None:
    make = random_frames if kind == "random" else rendered_frames
    frames = make(2, height, width, seed=height * 7 + width)
    out = preprocess_video(frames, PixelSpec(image_size=size))
    expected = original_order_video(frames, size)
    assert out.shape == expected.shape == (2, 3, size, size)
    difference = float((out - expected).abs().max())
    assert difference < ORIGINAL_ORDER_ATOL, difference
    # Not trivially equal: the rendered content spans the normalised range the tolerance is relative to.
    assert float(expected.abs().max()) > 1.5
