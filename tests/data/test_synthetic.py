"""`vidlora synth`: format, determinism, pixels that match the answers, balance, no one-frame shortcut.

Expected colours, geometry and answer sets are written out here by hand rather than imported, so
a change in the generator shows up as a failing number.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vidlora.cli import main as vidlora
from vidlora.data.synthetic import generate_dataset, plan_split, render_frame

SIZE, FRAMES = 64, 16
BACKGROUND = np.array([32, 32, 32])
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
}
CLOSED = {
    "motion": {"left", "right", "up", "down"},
    "color": set(PALETTE),
    "shape": {"circle", "square", "triangle"},
    "count": {"one", "two", "three", "four"},
    "compare": {"yes", "no"},
}
CLOSED["text"] = CLOSED["motion"] | CLOSED["color"] | CLOSED["shape"] | CLOSED["count"]
# Total travel from the first to the last frame: 0.25 * size for one shape, 0.1 * size for 2-4.
TRAVEL = {1: 16.0, 2: 6.4, 3: 6.4, 4: 6.4}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
AXIS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}  # (axis: 0=x 1=y, sign)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "seed0"
    generate_dataset(out, 40, 12, seed=0)
    return out


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _shape_mask(frame: np.ndarray) -> np.ndarray:
    return np.abs(frame.astype(np.int64) - BACKGROUND).max(axis=-1) > 60


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _components(mask: np.ndarray, min_area: int = 8) -> list[np.ndarray]:
    """4-connected components (a plain flood fill, independent of the generator)."""
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(pixels) >= min_area:
            component = np.zeros_like(mask)
            component[tuple(np.array(pixels).T)] = True
            found.append(component)
    return found


def _interior_color(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean RGB of shape pixels whose 4 neighbours are shape too (chroma bleeds at the edges)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return frame[inner].astype(np.float64).mean(axis=0)


def _box_centre(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min() + xs.max(), ys.min() + ys.max()]) / 2


def _nearer_palette(frame: np.ndarray, color: str) -> np.ndarray:
    """Pixels nearer the recorded colour than the background: compression blurs the edges of a
    plain threshold mask (a blue edge can gain a whole column), this stays on the drawn outline."""
    pixels = frame.astype(np.float64)
    return np.linalg.norm(pixels - PALETTE[color], axis=-1) < np.linalg.norm(pixels - BACKGROUND, axis=-1)


def _fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def _check_still(frame: np.ndarray, meta: dict, where: str) -> None:
    """Colour, count and shape of a still frame agree with its recorded attributes."""
    color = _interior_color(frame, _shape_mask(frame))
    assert np.abs(color - PALETTE[meta["color"]]).max() < 25, (where, color)
    parts = _components(_nearer_palette(frame, meta["color"]))
    assert len(parts) == meta["count"], where
    # Fill ratio of the bounding box: square 1, circle ~pi/4, triangle ~1/2. Measured over 500
    # decoded samples (seed 3): triangle 0.50-0.65, circle 0.72-0.88, square 0.977-1.
    ratios = [_fill_ratio(p) for p in parts]
    expected = {"triangle": (0.40, 0.69), "circle": (0.69, 0.94), "square": (0.94, 1.01)}[meta["shape"]]
    assert all(expected[0] <= r < expected[1] for r in ratios), (where, meta["shape"], ratios)


def test_same_seed_gives_identical_files_and_pixels(tmp_path: Path, dataset: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, 40, 12, seed=0)
    for name in ("train.json", "eval.json"):
        assert (again / name).read_bytes() == (dataset / name).read_bytes()
    media = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.suffix in (".mp4", ".png", ".jpg"))
    assert media == sorted(
        p.relative_to(again) for p in again.rglob("*") if p.suffix in (".mp4", ".png", ".jpg")
    )
    assert len(media) == 34 + 16  # videos: video + video+image samples; images: image + video+image
    for rel in media:
        # Holds with libx264 run single-threaded and with mbtree off (see write_video).
        assert (again / rel).read_bytes() == (dataset / rel).read_bytes(), rel
    first_video = next(rel for rel in media if rel.suffix == ".mp4")
    assert np.array_equal(_decode(again / first_video), _decode(dataset / first_video))


def test_different_seed_gives_different_dataset(tmp_path: Path, dataset: Path) -> None:
    other = tmp_path / "seed1"
    generate_dataset(other, 40, 12, seed=1)
    assert (other / "train.json").read_bytes() != (dataset / "train.json").read_bytes()
    assert (other / "eval.json").read_bytes() != (dataset / "eval.json").read_bytes()


def test_json_is_videollava_format(dataset: Path) -> None:
    modalities: Counter[str] = Counter()
    texts = 0
    for split, expected_n in (("train", 40), ("eval", 12)):
        samples = _load(dataset / f"{split}.json")
        assert len(samples) == expected_n
        assert [s["id"] for s in samples] == [f"{split}_{i:05d}" for i in range(expected_n)]
        for s in samples:
            media = ("video" in s, "image" in s)
            expected_modality = {
                (True, False): "video",
                (False, True): "image",
                (False, False): "text",
                (True, True): "video+image",
            }[media]
            assert s["modality"] == expected_modality, s["id"]
            modalities[s["modality"]] += 1
            for key, suffixes in (("video", {".mp4"}), ("image", {".png", ".jpg"})):
                if key in s:
                    rel = Path(s[key])
                    assert not rel.is_absolute() and ".." not in rel.parts, s["id"]
                    assert rel.parts[0] == f"{key}s" and rel.suffix in suffixes, s["id"]
                    assert (dataset / rel).is_file(), s["id"]
            conv = s["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2), s["id"]
            assert len(s["types"]) == len(conv) // 2 and s["type"] == s["types"][0], s["id"]
            expected_prefix = ("<video>\n" if "video" in s else "") + ("<image>\n" if "image" in s else "")
            assert conv[0]["value"].startswith(expected_prefix), s["id"]
            for i, turn in enumerate(conv):
                text = turn["value"][len(expected_prefix) :] if i == 0 else turn["value"]
                assert "<video>" not in text and "<image>" not in text, s["id"]
            for qtype, (question, answer) in zip(
                s["types"], zip(conv[::2], conv[1::2], strict=True), strict=True
            ):
                word = answer["value"]
                assert re.fullmatch(r"[a-z]+", word), (s["id"], word)
                assert word in CLOSED[qtype], (s["id"], qtype, word)
                # The instruction lists the allowed words, and the answer is one of them.
                options = re.search(r"Answer with one word: (.*)\.$", question["value"])
                assert options is not None, s["id"]
                assert word in re.split(r", | or ", options.group(1)), s["id"]
                if qtype == "text":
                    # Answerable from the text alone: the word is in the story, or is an opposite.
                    story = question["value"][: options.start()].lower()
                    opposite = re.search(r"opposite of (\w+)", story)
                    if opposite:
                        assert OPPOSITE[opposite.group(1)] == word, s["id"]
                    else:
                        assert re.search(rf"\b{word}\b", story), (s["id"], story, word)
                    texts += 1
    assert modalities == {"video": 31, "image": 13, "text": 5, "video+image": 3}
    assert texts == 5


def test_videos_move_in_recorded_direction_with_recorded_colour(dataset: Path) -> None:
    checked = Counter()
    for split in ("train", "eval"):
        for s in _load(dataset / f"{split}.json"):
            if "video" not in s:
                continue
            meta = s["meta"]["video"]
            for qtype, answer in zip(s["types"], s["conversations"][1::2], strict=True):
                if qtype == "motion":
                    assert answer["value"] == meta["direction"], s["id"]
            frames = _decode(dataset / s["video"])
            assert frames.shape == (FRAMES, SIZE, SIZE, 3), s["id"]
            # Bounding-box centres: compression moves single edge pixels, which shifts a centroid by up
            # to ~1.1 px; box centres stayed within 0.6 px (along) and 0.5 px (across) on 300 samples.
            first, last = (_nearer_palette(frames[i], meta["color"]) for i in (0, -1))
            shift = _box_centre(last) - _box_centre(first)
            axis, sign = AXIS[meta["direction"]]
            travel = TRAVEL[meta["count"]]
            assert sign * shift[axis] == pytest.approx(travel, abs=1.0), (s["id"], shift)
            assert abs(shift[1 - axis]) < 0.75, (s["id"], shift)
            _check_still(frames[0], meta, s["id"])
            checked[meta["direction"]] += 1
    assert sum(checked.values()) == 34
    assert set(checked) == {"left", "right", "up", "down"}


def test_images_and_compare_answers_match_pixels(dataset: Path) -> None:
    formats = Counter()
    for split in ("train", "eval"):
        for s in _load(dataset / f"{split}.json"):
            if "image" not in s:
                continue
            image = Image.open(dataset / s["image"])
            formats[image.format] += 1
            assert image.size == (SIZE, SIZE) and image.mode == "RGB", s["id"]
            meta = s["meta"]["image"]
            _check_still(np.asarray(image), meta, s["id"])
            if s["type"] == "compare":
                same = meta["color"] == s["meta"]["video"]["color"]
                assert s["conversations"][1]["value"] == ("yes" if same else "no"), s["id"]
            else:
                for qtype, answer in zip(s["types"], s["conversations"][1::2], strict=True):
                    truth = {"color": meta["color"], "shape": meta["shape"]}.get(qtype)
                    if qtype == "count":
                        truth = ["one", "two", "three", "four"][meta["count"] - 1]
                    assert answer["value"] == truth, (s["id"], qtype)
    assert formats == {"PNG": 6, "JPEG": 10}


def test_class_balance_for_200_samples_seed0() -> None:
    specs = plan_split("train", 200, 0)
    assert Counter(s.modality for s in specs) == {"video": 120, "image": 50, "text": 20, "video+image": 10}
    first = Counter((s.modality, s.turns[0].type, s.turns[0].answer) for s in specs)
    motion = {d: first["video", "motion", d] for d in CLOSED["motion"]}
    assert motion == {"left": 12, "right": 12, "up": 12, "down": 12}
    assert all(0.15 <= n / sum(motion.values()) <= 0.35 for n in motion.values())
    # All turns, second questions included (those ask about random attributes).
    all_motion = Counter(t.answer for s in specs for t in s.turns if t.type == "motion")
    assert all_motion == {"left": 14, "right": 14, "up": 12, "down": 13}
    for modality, qtype in (("video", "color"), ("video", "shape"), ("video", "count"), ("image", "color")):
        counts = [first[modality, qtype, a] for a in CLOSED[qtype]]
        assert max(counts) - min(counts) <= 1, (modality, qtype, counts)
    assert Counter(s.turns[0].answer for s in specs if s.modality == "video+image") == {"yes": 5, "no": 5}
    assert sum(len(s.turns) == 2 for s in specs) == 35


def _best_threshold_accuracy(values_a: np.ndarray, values_b: np.ndarray) -> float:
    """Best accuracy of any rule "value < t means a" (or the reverse) on two samples."""
    values = np.concatenate([values_a, values_b])
    labels = np.concatenate([np.zeros(len(values_a)), np.ones(len(values_b))])
    best = 0.0
    for t in np.unique(values):
        acc = np.mean((values >= t) == labels)
        best = max(best, acc, 1 - acc)
    return float(best)


def test_first_frame_does_not_reveal_direction() -> None:
    # Rendered pixels of every single-shape motion video in a 1000-sample plan.
    specs = [s for s in plan_split("train", 1000, 0) if s.turns[0].type == "motion"]
    first: dict[str, list[np.ndarray]] = {d: [] for d in CLOSED["motion"]}
    boxes: dict[str, list[np.ndarray]] = {d: [] for d in CLOSED["motion"]}
    shift: dict[str, list[np.ndarray]] = {d: [] for d in CLOSED["motion"]}
    for s in specs:
        mask0 = _shape_mask(render_frame(s.video, SIZE, 0.0))
        c0 = _centroid(mask0)
        boxes[s.video.direction].append(_box_centre(mask0))
        c1 = _centroid(_shape_mask(render_frame(s.video, SIZE, 1.0)))
        first[s.video.direction].append(c0)
        shift[s.video.direction].append(c1 - c0)
    pos = {d: np.array(v) for d, v in first.items()}
    assert {d: len(v) for d, v in pos.items()} == {"left": 60, "right": 60, "up": 60, "down": 60}
    # One threshold on the frame-0 position barely beats chance (50%); the displacement is perfect.
    lr = _best_threshold_accuracy(pos["left"][:, 0], pos["right"][:, 0])
    ud = _best_threshold_accuracy(pos["up"][:, 1], pos["down"][:, 1])
    assert lr == pytest.approx(0.5583, abs=1e-3) and ud == pytest.approx(0.5833, abs=1e-3)
    move = {d: np.array(v) for d, v in shift.items()}
    assert _best_threshold_accuracy(move["left"][:, 0], move["right"][:, 0]) == 1.0
    assert _best_threshold_accuracy(move["up"][:, 1], move["down"][:, 1]) == 1.0
    # Every direction starts in the same box: the ranges of the frame-0 bounding-box centres
    # (the centroid depends on the shape) agree to within 1.5 px.
    lows = np.array([np.min(p, axis=0) for p in boxes.values()])
    highs = np.array([np.max(p, axis=0) for p in boxes.values()])
    assert np.ptp(lows, axis=0).max() < 1.5 and np.ptp(highs, axis=0).max() < 1.5
    # A nearest-mean classifier on the frame-0 centroid stays near chance (25%).
    means = {d: p.mean(axis=0) for d, p in pos.items()}
    hits = sum(min(means, key=lambda m: np.linalg.norm(c - means[m])) == d for d, p in pos.items() for c in p)
    assert hits / 240 == pytest.approx(0.30, abs=1e-3)


def test_main_writes_dataset_and_refuses_to_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert vidlora(["synth", "--out", str(out), "--train", "20", "--eval", "10", "--seed", "0"]) == 0
    assert len(_load(out / "train.json")) == 20 and len(_load(out / "eval.json")) == 10
    # train: 12 video + 1 video+image samples; eval: 6 video + 0 (largest-remainder rounding)
    assert len(list((out / "videos").glob("*.mp4"))) == 13 + 6
    printed = capsys.readouterr().out
    assert "train: 20 samples" in printed and "libx264" in printed
    assert vidlora(["synth", "--out", str(out), "--train", "2", "--eval", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 63}, "even"),
        ({"num_frames": 1}, "num_frames"),
        ({"mix": {"audio": 1.0}}, "audio"),
        ({"multi_turn": 1.5}, "multi_turn"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path / "bad", 2, 1, seed=0, **kwargs)
