"""`vidlora synth`: a small synthetic video/image QA dataset with real encoded media.

Every video shows a plain background and one to four identical coloured shapes that move in one
direction. Questions have one-word closed answers (the allowed words are listed in the question),
so predictions can be scored by exact match. The ``motion`` questions need several frames: every
shape's position in frame 0 is drawn from the same box whatever the direction, so the first frame
alone says nothing about the answer.

The pipeline is plan → render → write: planning is the only step that draws random numbers (one
generator per split, seeded from ``(seed, split index)``), rendering is a pure function of a plan,
and writing encodes the pixels (h264 via PyAV, PNG/JPEG via PIL) and the Video-LLaVA JSON
(the format of README.md's Data section). The same seed gives byte-identical JSON and identical decoded pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from vidlora.errors import AlreadyExistsError, UsageError

# --- vocabulary (closed answer sets) -------------------------------------------------------------

COLORS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
}
BACKGROUND: tuple[int, int, int] = (32, 32, 32)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
YES_NO: tuple[str, ...] = ("yes", "no")

# Unit step (dx, dy) in image coordinates (y grows downwards).
DIRECTION_VECTORS: Mapping[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
OPPOSITE: Mapping[str, str] = {"left": "right", "right": "left", "up": "down", "down": "up"}

MODALITIES: tuple[str, ...] = ("video", "image", "text", "video+image")
DEFAULT_MIX: Mapping[str, float] = {"video": 0.60, "image": 0.25, "text": 0.10, "video+image": 0.05}
# Question types per modality and their share; motion is weighted up because it is the one
# question that cannot be answered without the temporal dimension.
VIDEO_TYPES: Mapping[str, float] = {"motion": 0.4, "color": 0.2, "shape": 0.2, "count": 0.2}
IMAGE_TYPES: Mapping[str, float] = {"color": 1 / 3, "shape": 1 / 3, "count": 1 / 3}

ANSWERS: Mapping[str, tuple[str, ...]] = {
    "motion": DIRECTIONS,
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "compare": YES_NO,
    "text": tuple(sorted({*DIRECTIONS, *COLORS, *SHAPES, *COUNT_WORDS})),
}

SPLITS: tuple[str, ...] = ("train", "eval")

# Geometry as fractions of the frame size, so --size scales everything.
# One shape uses the whole frame; two to four shapes each get one cell of a 2x2 grid.
# Shapes are as large as those boxes allow: at 64 px the tiny preset's towers cut a frame into
# 16 px patches, and a shape much smaller than a patch leaves its outline in one or two patch
# features. With a random frozen tower a ridge probe on frame 0 reads the shape of one shape at
# 0.47 accuracy with radius 0.10, 0.77 with 0.13 and 0.997 with 0.16 (docs/demo.md).
_SINGLE_RADIUS, _SINGLE_TRAVEL = 0.18, 0.25
_MULTI_RADIUS, _MULTI_TRAVEL = 0.10, 0.10  # 0.10 keeps 32 px frames possible
_SQUARE_HALF = 0.85  # square half-side / radius: about the circle's area
_TRIANGLE_HALF = 1.15  # triangle bounding-box half-size / radius: area comparable to the others


# --- plans ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """What one video (or still image) shows.

    ``starts`` holds each shape's centre (x, y) in pixels at frame 0; every shape moves by
    ``travel`` pixels in ``direction`` between the first and the last frame. A still image is the
    scene at frame 0.
    """

    shape: str
    color: str
    count: int
    direction: str
    starts: tuple[tuple[float, float], ...]
    radius: float
    travel: float

    def attributes(self, *, still: bool) -> dict[str, str | int]:
        """The discrete ground truth written to the JSON (``meta``)."""
        attrs: dict[str, str | int] = {"shape": self.shape, "color": self.color, "count": self.count}
        if not still:
            attrs["direction"] = self.direction
        return attrs


@dataclass(frozen=True)
class Turn:
    """One question/answer pair and its question type."""

    type: str
    question: str
    answer: str


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to write one sample: its id, modality, media scenes and turns."""

    id: str
    modality: str
    turns: tuple[Turn, ...]
    video: Scene | None = None
    image: Scene | None = None
    image_format: str = "png"


@dataclass(frozen=True)
class SplitSummary:
    """Counts for one written split."""

    name: str
    json_path: Path
    num_samples: int
    by_modality: dict[str, int]
    by_type: dict[str, int]
    answers: dict[str, dict[str, int]]  # first-turn answer counts per question type
    num_turns: int


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_dataset` wrote."""

    out_dir: Path
    splits: dict[str, SplitSummary]
    num_videos: int
    num_images: int
    encoder: str
    size: int
    num_frames: int
    fps: int
    seed: int

    def format(self) -> str:
        """A human-readable multi-line report."""
        lines = [
            f"wrote {self.out_dir}: {self.num_videos} videos ({self.encoder}, {self.size}x{self.size}, "
            f"{self.num_frames} frames at {self.fps} fps), {self.num_images} images, seed {self.seed}"
        ]
        for split in self.splits.values():
            lines.append(
                f"  {split.name}: {split.num_samples} samples, {split.num_turns} turns -> {split.json_path}"
            )
            lines.append("    modality: " + ", ".join(f"{k} {v}" for k, v in split.by_modality.items()))
            for qtype, answers in split.answers.items():
                shown = ", ".join(f"{k} {v}" for k, v in answers.items())
                lines.append(f"    {qtype} ({split.by_type.get(qtype, 0)}): {shown}")
        return "\n".join(lines)


def _allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder)."""
    weight_sum = sum(weights.values())
    exact = {k: total * w / weight_sum for k, w in weights.items()}
    counts = {k: int(np.floor(v)) for k, v in exact.items()}
    # Ties break by the key order of ``weights`` so the result does not depend on float noise.
    order = sorted(exact, key=lambda k: -(exact[k] - counts[k]))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _balanced(rng: np.random.Generator, classes: Sequence[str], n: int) -> list[str]:
    """``n`` answers cycling through ``classes`` (counts differ by at most one), shuffled."""
    offset = int(rng.integers(len(classes)))  # which classes get the extra one varies with the seed
    values = [classes[(i + offset) % len(classes)] for i in range(n)]
    return [values[i] for i in rng.permutation(n)]


def _make_scene(
    rng: np.random.Generator,
    size: int,
    *,
    shape: str | None = None,
    color: str | None = None,
    count: int = 1,
    direction: str | None = None,
) -> Scene:
    """Draw a scene; unspecified attributes are uniform.

    Start positions come from the box that keeps the shape inside the frame (or its grid cell) for
    *every* direction, so the frame-0 position distribution is the same for all directions.
    """
    shape = shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))]
    color = color if color is not None else tuple(COLORS)[int(rng.integers(len(COLORS)))]
    direction = direction if direction is not None else DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    if count == 1:
        radius, travel = _SINGLE_RADIUS * size, _SINGLE_TRAVEL * size
        cells = [(0.0, 0.0, float(size))]
    else:
        radius, travel = _MULTI_RADIUS * size, _MULTI_TRAVEL * size
        half = size / 2
        grid = [(0.0, 0.0), (half, 0.0), (0.0, half), (half, half)]
        chosen = sorted(int(i) for i in rng.choice(4, size=count, replace=False))
        cells = [(grid[i][0], grid[i][1], half) for i in chosen]
    # The triangle's bounding box is the largest footprint; one pixel more keeps edges off the border.
    margin = _TRIANGLE_HALF * radius + 1.0
    starts = []
    for x0, y0, extent in cells:
        lo, hi = margin + travel, extent - margin - travel
        if hi < lo:
            raise UsageError(f"frame size {size} is too small for {count} moving shapes")
        x, y = rng.uniform(lo, hi, size=2)
        starts.append((round(float(x0 + x), 3), round(float(y0 + y), 3)))
    return Scene(shape, color, count, direction, tuple(starts), radius, travel)


def _subject(scene: Scene) -> tuple[str, str]:
    """("the shape", "is") or ("the shapes", "are"): questions agree with the shape count."""
    return ("the shape", "is") if scene.count == 1 else ("the shapes", "are")


def _options(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1]


def _question(qtype: str, scene: Scene) -> str:
    """The question text for ``qtype`` about ``scene``, with the answer-format instruction."""
    subject, verb = _subject(scene)
    if qtype == "motion":
        text = f"Which direction {verb} {subject} moving?"
    elif qtype == "color":
        text = f"What color {verb} {subject}?"
    elif qtype == "shape":
        text = "What shape is the object?" if scene.count == 1 else "What shape are the objects?"
    elif qtype == "count":
        text = "How many shapes are there?"
    else:
        raise ValueError(f"no scene question of type {qtype!r}")
    return f"{text} Answer with one word: {_options(ANSWERS[qtype])}."


def _answer(qtype: str, scene: Scene) -> str:
    if qtype == "motion":
        return scene.direction
    if qtype == "color":
        return scene.color
    if qtype == "shape":
        return scene.shape
    if qtype == "count":
        return COUNT_WORDS[scene.count - 1]
    raise ValueError(f"no scene question of type {qtype!r}")


def _scene_for(rng: np.random.Generator, size: int, qtype: str, answer: str) -> Scene:
    """A scene whose answer to ``qtype`` is ``answer``; other questions use one shape."""
    if qtype == "motion":
        return _make_scene(rng, size, direction=answer)
    if qtype == "color":
        return _make_scene(rng, size, color=answer)
    if qtype == "shape":
        return _make_scene(rng, size, shape=answer)
    if qtype == "count":
        return _make_scene(rng, size, count=COUNT_WORDS.index(answer) + 1)
    raise ValueError(f"no scene question of type {qtype!r}")


def _scene_turns(
    rng: np.random.Generator, scene: Scene, first: str, types: Sequence[str], multi_turn: bool
) -> tuple[Turn, ...]:
    turns = [Turn(first, _question(first, scene), _answer(first, scene))]
    if multi_turn:
        # A second question about the same media; counting one shape would always answer "one".
        others = [t for t in types if t != first and not (t == "count" and scene.count == 1)]
        second = others[int(rng.integers(len(others)))]
        turns.append(Turn(second, _question(second, scene), _answer(second, scene)))
    return tuple(turns)


def _text_turn(rng: np.random.Generator) -> Turn:
    """A closed question answerable from its own text (no media)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    count = int(rng.integers(1, 5))
    plural = "" if count == 1 else "s"
    story = f"{COUNT_WORDS[count - 1].capitalize()} {color} {shape}{plural} {'moves' if count == 1 else 'move'} {direction}."
    pronoun, moves = ("is it", "does it move") if count == 1 else ("are they", "do they move")
    kind = int(rng.integers(5))
    if kind == 0:
        question, answer, words = f"{story} What color {pronoun}?", color, tuple(COLORS)
    elif kind == 1:
        question, answer, words = f"{story} Which direction {moves}?", direction, DIRECTIONS
    elif kind == 2:
        question, answer, words = f"{story} What shape {pronoun}?", shape, SHAPES
    elif kind == 3:
        question, answer, words = f"{story} How many shapes are there?", COUNT_WORDS[count - 1], COUNT_WORDS
    else:
        question, answer, words = f"What is the opposite of {direction}?", OPPOSITE[direction], DIRECTIONS
    return Turn("text", f"{question} Answer with one word: {_options(words)}.", answer)


def plan_split(
    split: str,
    num_samples: int,
    seed: int,
    *,
    size: int = 64,
    mix: Mapping[str, float] | None = None,
    multi_turn: float = 0.2,
    image_format: str = "mixed",
) -> list[SampleSpec]:
    """Draw the samples of one split (no pixels, no files).

    Modalities follow ``mix`` and question types their fixed shares, both by largest-remainder
    rounding; within each (modality, type) the first-turn answers are balanced to within one.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; expected one of {SPLITS}")
    mix = _check_mix(mix if mix is not None else DEFAULT_MIX)
    if image_format not in ("png", "jpeg", "mixed"):
        raise UsageError(f"image_format must be png, jpeg or mixed, got {image_format!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    per_modality = _allocate(num_samples, mix)

    def pick_format() -> str:
        if image_format != "mixed":
            return image_format
        return "png" if rng.random() < 0.5 else "jpeg"

    # Ids are given after the final shuffle, so modalities and types interleave in the file.
    drafts: list[SampleSpec] = []
    for modality, types in (("video", VIDEO_TYPES), ("image", IMAGE_TYPES)):
        for qtype, n in _allocate(per_modality[modality], types).items():
            for answer in _balanced(rng, ANSWERS[qtype], n):
                scene = _scene_for(rng, size, qtype, answer)
                turns = _scene_turns(rng, scene, qtype, list(types), bool(rng.random() < multi_turn))
                if modality == "video":
                    drafts.append(SampleSpec("", modality, turns, video=scene))
                else:
                    drafts.append(SampleSpec("", modality, turns, image=scene, image_format=pick_format()))
    for _ in range(per_modality["text"]):
        drafts.append(SampleSpec("", "text", (_text_turn(rng),)))
    for answer in _balanced(rng, YES_NO, per_modality["video+image"]):
        video = _make_scene(rng, size)
        if answer == "yes":
            color = video.color
        else:
            others = [c for c in COLORS if c != video.color]
            color = others[int(rng.integers(len(others)))]
        image = _make_scene(rng, size, color=color)
        question = (
            "Is the shape in the image the same color as the shape in the video? "
            f"Answer with one word: {_options(YES_NO)}."
        )
        turn = Turn("compare", question, answer)
        drafts.append(
            SampleSpec("", "video+image", (turn,), video=video, image=image, image_format=pick_format())
        )
    order = rng.permutation(len(drafts))
    return [replace(drafts[j], id=f"{split}_{i:05d}") for i, j in enumerate(order)]


def _check_mix(mix: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(MODALITIES))
    if unknown:
        raise UsageError(f"unknown modalities in mix: {unknown}; expected a subset of {MODALITIES}")
    negative = sorted(k for k, v in mix.items() if v < 0)
    if negative or sum(mix.values()) <= 0:
        raise UsageError(f"mix weights must be >= 0 and not all zero, got {dict(mix)}")
    return {m: float(mix.get(m, 0.0)) for m in MODALITIES}


# --- rendering -----------------------------------------------------------------------------------


def _shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of one shape, tested at pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = _SQUARE_HALF * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Apex up, base at the bottom of its bounding box: inside when below both slanted edges.
        half = _TRIANGLE_HALF * radius
        depth = dy + half  # 0 at the apex, 2*half at the base
        return (depth >= 0) & (depth <= 2 * half) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_frame(scene: Scene, size: int, t: float) -> np.ndarray:
    """RGB uint8 [size, size, 3] of ``scene`` at progress ``t`` in [0, 1] along its motion."""
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    vx, vy = DIRECTION_VECTORS[scene.direction]
    for x, y in scene.starts:
        mask = _shape_mask(
            scene.shape, x + vx * scene.travel * t, y + vy * scene.travel * t, scene.radius, size
        )
        frame[mask] = COLORS[scene.color]
    return frame


def render_video(scene: Scene, size: int, num_frames: int) -> np.ndarray:
    """RGB uint8 [num_frames, size, size, 3]; the shapes move ``travel`` px from first to last frame."""
    return np.stack([render_frame(scene, size, i / (num_frames - 1)) for i in range(num_frames)])


# --- writing -------------------------------------------------------------------------------------


def pick_h264_encoder() -> str:
    """The h264 encoder PyAV's FFmpeg offers: libx264 when bundled (it is in PyAV's wheels)."""
    for name in ("libx264", "h264", "libopenh264"):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises several error types for unknown codecs; we only probe.
            continue
        return name
    raise RuntimeError("this PyAV build has no h264 encoder (tried libx264, h264, libopenh264)")


def write_video(frames: np.ndarray, path: Path, fps: int, encoder: str = "libx264") -> None:
    """Encode RGB frames [T, H, W, 3] as an h264/yuv420p mp4.

    CRF 18 keeps the flat colours within a few levels of their RGB values. With libx264 the
    output is byte-reproducible only with one thread *and* macroblock-tree rate control off:
    with ``mbtree`` on, about 1 in 15 of these tiny clips encoded differently from run to run
    (measured with PyAV 18.1 / x264 core 165, same process and same input).
    """
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: yuv420p needs even frame sizes, got {width}x{height}")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if encoder == "libx264":
            stream.options = {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        time_base = Fraction(1, fps)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts, frame.time_base = i, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


# --- real-resolution clips (benchmarks) -------------------------------------------------------------


def texture_yuv(index: int, height: int, width: int) -> np.ndarray:
    """Frame ``index`` of a deterministic moving texture as yuv420p (``[H·3/2, W]`` uint8).

    Scrolling ramps and a checkerboard keep h264 busy (a flat scene would compress to nothing and
    decode unrealistically fast); the frame index is written in 2×8 black/white luma blocks at the
    top (:func:`read_frame_index`), so a reader can be checked to return the frames it claims.
    Written in YUV directly so encoding a 60 s 720p clip is not dominated by colour conversion.
    """
    yy, xx = np.ogrid[0:height, 0:width]
    luma = ((xx + 3 * index) % 256 // 2 + ((xx // 16 + yy // 16 + index // 5) % 2) * 100).astype(np.uint8)
    block_h, block_w = height // 8, width // 8
    for bit in range(16):
        row, col = divmod(bit, 8)
        value = 255 if (index >> bit) & 1 else 0
        luma[row * block_h : (row + 1) * block_h, col * block_w : (col + 1) * block_w] = value
    cy, cx = np.ogrid[0 : height // 2, 0 : width // 2]
    u = ((cy + 2 * index) % 128 + 64).astype(np.uint8) * np.ones((1, width // 2), np.uint8)
    v = ((cx + index) % 128 + 64).astype(np.uint8) * np.ones((height // 2, 1), np.uint8)
    # Neutral chroma under the index blocks keeps them pure black/white in RGB.
    u[:block_h, :] = 128
    v[:block_h, :] = 128
    return np.concatenate([luma, u.reshape(height // 4, width), v.reshape(height // 4, width)])


def read_frame_index(frame: np.ndarray) -> int:
    """The frame index :func:`texture_yuv` wrote into an RGB frame ``[H, W, 3]``."""
    height, width = frame.shape[:2]
    block_h, block_w = height // 8, width // 8
    value = 0
    for bit in range(16):
        row, col = divmod(bit, 8)
        block = frame[
            row * block_h + block_h // 4 : (row + 1) * block_h - block_h // 4,
            col * block_w + block_w // 4 : (col + 1) * block_w - block_w // 4,
        ]
        value |= int(block.mean() > 127) << bit
    return value


def write_texture_clip(
    path: Path, seconds: float, width: int, height: int, *, fps: int = 25, gop: int | None = None
) -> None:
    """Encode :func:`texture_yuv` frames as h264 mp4, like a camera or download would be.

    libx264 preset veryfast keeps B-frames (3, pyramid) like typical files and encodes ~2× faster
    than medium; ``gop`` None leaves libx264's default keyframe interval (250 frames, plus scene cuts).
    """
    options = {"preset": "veryfast"} | ({"g": str(gop)} if gop else {})
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(texture_yuv(index, height, width), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def texture_image(seed: int, height: int, width: int) -> np.ndarray:
    """A deterministic textured RGB still ``[H, W, 3]`` uint8 (noise over gradients: photo-like JPEG sizes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_image(frame: np.ndarray, path: Path, image_format: str) -> None:
    """Save an RGB uint8 frame as PNG, or as JPEG (quality 95, no chroma subsampling)."""
    image = Image.fromarray(frame, mode="RGB")
    if image_format == "png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=95, subsampling=0)


def _sample_json(spec: SampleSpec, video_path: str | None, image_path: str | None) -> dict[str, object]:
    placeholders = ("<video>\n" if video_path else "") + ("<image>\n" if image_path else "")
    conversations: list[dict[str, str]] = []
    for k, turn in enumerate(spec.turns):
        prefix = placeholders if k == 0 else ""
        conversations.append({"from": "human", "value": prefix + turn.question})
        conversations.append({"from": "gpt", "value": turn.answer})
    record: dict[str, object] = {"id": spec.id}
    if video_path:
        record["video"] = video_path
    if image_path:
        record["image"] = image_path
    record["conversations"] = conversations
    record["type"] = spec.turns[0].type
    record["types"] = [t.type for t in spec.turns]
    record["modality"] = spec.modality
    meta: dict[str, object] = {}
    if spec.video is not None:
        meta["video"] = spec.video.attributes(still=False)
    if spec.image is not None:
        meta["image"] = spec.image.attributes(still=True)
    if meta:
        record["meta"] = meta
    return record


def _summarise_split(name: str, json_path: Path, specs: Sequence[SampleSpec]) -> SplitSummary:
    # First turns only: those are the balanced ones (second turns ask about random attributes).
    answers: dict[str, Counter[str]] = {}
    for spec in specs:
        answers.setdefault(spec.turns[0].type, Counter())[spec.turns[0].answer] += 1
    return SplitSummary(
        name=name,
        json_path=json_path,
        num_samples=len(specs),
        by_modality=dict(sorted(Counter(s.modality for s in specs).items())),
        by_type=dict(sorted(Counter(s.turns[0].type for s in specs).items())),
        answers={t: dict(sorted(c.items())) for t, c in sorted(answers.items())},
        num_turns=sum(len(s.turns) for s in specs),
    )


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_eval: int,
    seed: int,
    *,
    size: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    mix: Mapping[str, float] | None = None,
    multi_turn: float = 0.2,
    image_format: str = "mixed",
    overwrite: bool = False,
    progress: bool = False,
) -> SynthSummary:
    """Write ``out_dir/{train,eval}.json`` plus ``videos/*.mp4`` and ``images/*.{png,jpg}``.

    Media paths in the JSON are relative to ``out_dir`` (use it as both ``--video_folder`` and
    ``--image_folder``). Raises ``FileExistsError`` rather than mixing with an earlier dataset in
    the same folder unless ``overwrite`` is set.
    """
    out = Path(out_dir)
    if n_train < 0 or n_eval < 0:
        raise UsageError(f"sample counts must be >= 0, got train={n_train} eval={n_eval}")
    if size < 32 or size % 2:
        raise UsageError(f"size must be even and >= 32 (yuv420p needs even sizes), got {size}")
    if num_frames < 2:
        raise UsageError(f"num_frames must be >= 2 for motion to be visible, got {num_frames}")
    if fps < 1:
        raise UsageError(f"fps must be >= 1, got {fps}")
    if not 0.0 <= multi_turn <= 1.0:
        raise UsageError(f"multi_turn must be a fraction in [0, 1], got {multi_turn}")
    existing = [
        p.name for p in (out / "train.json", out / "eval.json", out / "videos", out / "images") if p.exists()
    ]
    if existing and not overwrite:
        raise AlreadyExistsError(f"{out} already holds {existing}; choose another --out or pass --overwrite")
    encoder = pick_h264_encoder()
    plans = {
        name: plan_split(name, n, seed, size=size, mix=mix, multi_turn=multi_turn, image_format=image_format)
        for name, n in (("train", n_train), ("eval", n_eval))
    }
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    total = n_train + n_eval
    num_videos = num_images = 0
    splits: dict[str, SplitSummary] = {}
    with tqdm(total=total, desc="synth", unit="sample", disable=not progress, file=sys.stderr) as bar:
        for name, specs in plans.items():
            records = []
            for spec in specs:
                video_path = image_path = None
                if spec.video is not None:
                    video_path = f"videos/{spec.id}.mp4"
                    write_video(render_video(spec.video, size, num_frames), out / video_path, fps, encoder)
                    num_videos += 1
                if spec.image is not None:
                    suffix = "png" if spec.image_format == "png" else "jpg"
                    image_path = f"images/{spec.id}.{suffix}"
                    write_image(render_frame(spec.image, size, 0.0), out / image_path, spec.image_format)
                    num_images += 1
                records.append(_sample_json(spec, video_path, image_path))
                bar.update(1)
            json_path = out / f"{name}.json"
            json_path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            splits[name] = _summarise_split(name, json_path, specs)
    return SynthSummary(out, splits, num_videos, num_images, encoder, size, num_frames, fps, seed)


# --- CLI -----------------------------------------------------------------------------------------


def _parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--mix wants modality=weight pairs, got {part!r}")
        try:
            mix[key.strip()] = float(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--mix weight for {key!r} is not a number: {value!r}") from err
    return mix


def build_parser() -> argparse.ArgumentParser:
    """The `vidlora synth` argument parser."""
    parser = argparse.ArgumentParser(
        prog="vidlora synth",
        description="Write a synthetic video/image QA dataset (h264 mp4 + PNG/JPEG + Video-LLaVA JSON).",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (train.json, eval.json, videos/, images/)"
    )
    parser.add_argument("--train", type=int, default=200, help="number of training samples")
    parser.add_argument("--eval", type=int, default=50, help="number of evaluation samples")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same dataset"
    )
    parser.add_argument(
        "--size", type=int, default=64, help="frame/image width and height in pixels (even, at least 30)"
    )
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--fps", type=int, default=8, help="video frame rate")
    parser.add_argument(
        "--mix",
        type=_parse_mix,
        default=None,
        help="modality weights, e.g. video=0.6,image=0.25,text=0.1,video+image=0.05 (the default)",
    )
    parser.add_argument(
        "--multi-turn", type=float, default=0.2, help="fraction of media samples with two questions"
    )
    parser.add_argument(
        "--image-format", choices=("png", "jpeg", "mixed"), default="mixed", help="still image format"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that already holds a dataset"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`vidlora synth`: write the dataset and print a summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    summary = generate_dataset(
        args.out,
        args.train,
        args.eval,
        args.seed,
        size=args.size,
        num_frames=args.frames,
        fps=args.fps,
        mix=args.mix,
        multi_turn=args.multi_turn,
        image_format=args.image_format,
        overwrite=args.overwrite,
        progress=True,
    )
    print(summary.format())
    return 0
