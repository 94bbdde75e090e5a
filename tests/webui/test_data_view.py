"""The Data tab's pieces: token highlighting against hand-made labels, frames exactly as the tower gets them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidlora.data.media import read_video
from vidlora.data.synthetic import generate_dataset
from vidlora.data.tokenize import IGNORE_INDEX as X
from vidlora.data.tokenize import MediaTokenCounts
from vidlora.data.transforms import PixelSpec, preprocess_video
from vidlora.errors import NotFoundError
from vidlora.model.tokenizer import MediaTokenIds
from vidlora.webui.data_view import (
    MEDIA,
    TRAINED,
    check_argv,
    run_data_check,
    sample_view,
    token_segments,
    unnormalise,
)

V, I = 900, 901  # media token ids  # noqa: E741


def spelled(ids: list[int]) -> str:
    return "".join(f"[{i}]" for i in ids)


def test_segments_follow_the_labels_and_fold_each_placeholder_into_one_piece():
    ids = [1, 10, 11, V, V, V, 12, 20, 21, 2, 13, I, I, I, I, 14, 22, 2]
    labels = [X, X, X, X, X, X, X, 20, 21, 2, X, X, X, X, X, X, 22, 2]
    segments = token_segments(
        ids, labels, spelled, MediaTokenIds(image=I, video=V, pad=0), MediaTokenCounts(2, 3)
    )
    assert segments == [
        ("[1][10][11]", None), ("<video>", MEDIA), ("[12]", None), ("[20][21][2]", TRAINED), ("[13]", None),
        ("<image>", MEDIA), ("<image>", MEDIA),  # two images back to back: 4 positions, two placeholders
        ("[14]", None), ("[22][2]", TRAINED),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 6, 1, seed=1)
    return out


def _argv(synth) -> list[str]:
    return check_argv("tiny", str(synth / "train.json"), str(synth), str(synth))


def test_unnormalise_gives_back_the_decoded_pixels():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    pixels = preprocess_video(frames, PixelSpec(image_size=16))  # same size: no resampling, no crop
    spec = PixelSpec()
    np.testing.assert_array_equal(unnormalise(pixels, spec.mean, spec.std), frames)


def test_check_report_and_a_video_sample_as_training_reads_it(synth):
    text, ids, report = run_data_check(_argv(synth))
    records = json.loads((synth / "train.json").read_text())
    assert ids == [r["id"] for r in records] and report["ok"]
    assert text.startswith(f"vidlora check: {len(records)} valid record(s)")
    record = next(r for r in records if "video" in r)
    view = sample_view(_argv(synth), record["id"])
    # The synthetic clips are 64 px, the tiny towers' size: the tower input is the decoded frames.
    decoded, _ = read_video(synth / record["video"], 8)
    assert len(view.frames) == 8
    np.testing.assert_array_equal(np.stack(view.frames), decoded)
    assert view.problems == [] and view.images == []
    assert [text for text, label in view.segments if label == MEDIA] == ["<video>"]
    answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
    assert [text.strip() for text, label in view.segments if label == TRAINED] == [
        f"{a}</s>" for a in answers
    ]
    assert view.num_tokens > 8 * 17  # the expanded video (8 frames × (16 patches + CLS)) is counted


def test_an_unknown_sample_id_is_named(synth):
    with pytest.raises(NotFoundError, match="no valid sample with id 'nope'"):
        sample_view(_argv(synth), "nope")


def test_trained_token_count_matches_the_labels(synth):
    from vidlora.data.processor import Processor
    from vidlora.data.records import load_records
    from vidlora.model.loading import load_pretrained

    loaded = load_pretrained("tiny", device="meta")
    processor = Processor.for_model(loaded.model.config)
    sample = load_records(synth / "train.json")[0]
    tokenized = processor.tokenize(sample, loaded.tokenizer)
    view = sample_view(_argv(synth), sample.id)
    assert view.num_trained == sum(label != X for label in tokenized.labels)
    assert view.num_tokens == len(tokenized.input_ids)
    # Each run of consecutive trained positions, decoded on its own, is one highlighted piece.
    runs, previous = [], None
    for at, label in enumerate(tokenized.labels):
        if label != X:
            if previous != at - 1:
                runs.append([])
            runs[-1].append(tokenized.input_ids[at])
            previous = at
    assert runs
    decode = loaded.tokenizer.decode
    assert [text for text, label in view.segments if label == TRAINED] == [decode(run) for run in runs]
