"""SupervisedDataset: item shapes/dtypes per modality, signed expanded lengths, decode errors that
name the sample (raised, or marked for the trainer), counted skips, and a deterministic disjoint eval
split."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from misbehaving_decoders import CRASH, STUCK, bounded, mark, read_video_or_misbehave
from vidlora.data.collate import BAD_SAMPLE_KEY
from vidlora.data.dataset import (
    BadSamplesError,
    MediaFolders,
    ProblemKind,
    SampleError,
    SupervisedDataset,
    split_indices,
    train_eval_split,
)
from vidlora.data.media import read_image, read_video
from vidlora.data.processor import Processor
from vidlora.data.records import load_records
from vidlora.data.synthetic import pick_h264_encoder, write_video
from vidlora.data.templates import get_template
from vidlora.data.tokenize import MediaTokenCounts
from vidlora.data.transforms import PixelSpec, preprocess_image, preprocess_video
from vidlora.data.watchdog import DecodeWatchdog
from vidlora.model.tokenizer import build_tiny_tokenizer

COUNTS = MediaTokenCounts(image=4, video=12)  # 4 frames x 3 tokens: tiny, and not equal to T
SPEC = PixelSpec(image_size=16)
T = 4


def _processor(**changes) -> Processor:
    """Sizes no tower has (so they are not confused with a preset's), the tiny tokenizer's convention."""
    fields = dict(
        template="v1",
        prompt_tokenization="whole_prompt",
        image_size=SPEC.image_size,
        image_tokens=COUNTS.image,
        video_tokens=COUNTS.video,
        num_frames=T,
        mm_vision_select_layer=-2,
        model_max_length=None,
    )
    return Processor(**{**fields, **changes})


def _turns(question, answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


CLEAN = [
    {"id": "v", "video": "videos/a.mp4", "conversations": _turns("<video>\nWhat color is the circle?")},
    {
        "id": "i",
        "image": "images/p.png",
        "conversations": _turns("<image>\nWhat shape is in the image?", "circle"),
    },
    {
        "id": "vi",
        "video": "videos/b.mp4",
        "image": ["images/q.jpg", "images/p.png"],
        "conversations": _turns("<video>\n<image>\n<image>\nHow many circles are in the video?", "two")
        + _turns("What color is the square?", "green"),
    },
    {"id": "t", "conversations": _turns("What is the man doing?", "He is juggling.")},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    (root / "videos").mkdir()
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    encoder = pick_h264_encoder()
    # 6 frames of 24x32 (non-square: exercises the short-side resize) and 3 of 32x32.
    write_video(rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8), root / "videos/a.mp4", 8, encoder)
    write_video(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), root / "videos/b.mp4", 8, encoder)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "images/p.png")
    Image.fromarray(np.full((20, 20, 3), 200, dtype=np.uint8)).save(root / "images/q.jpg")
    (root / "videos/text.mp4").write_text("this is not a video\n")
    (root / "train.json").write_text(json.dumps(CLEAN))
    return root


def _dataset(samples, tokenizer, root, modalities=None, **kwargs):
    processor = _processor() if modalities is None else _processor(modalities=modalities)
    return SupervisedDataset(
        samples, processor=processor, tokenizer=tokenizer, folders=MediaFolders(root, root), **kwargs
    )


def _write(root, name, recs):
    path = root / name
    path.write_text(json.dumps(recs))
    return path


def test_item_shapes_and_dtypes_per_modality(tokenizer, data_dir):
    ds = _dataset(load_records(data_dir / "train.json"), tokenizer, data_dir)
    assert len(ds) == 4 and ds.skipped == []
    items = {ds[k]["id"]: ds[k] for k in range(4)}
    v, i, vi, t = items["v"], items["i"], items["vi"], items["t"]
    assert v["pixel_values_videos"].shape == (1, T, 3, 16, 16) and "pixel_values_images" not in v
    assert i["pixel_values_images"].shape == (1, 3, 16, 16) and "pixel_values_videos" not in i
    assert vi["pixel_values_videos"].shape == (1, T, 3, 16, 16)
    assert vi["pixel_values_images"].shape == (2, 3, 16, 16)
    assert "pixel_values_videos" not in t and "pixel_values_images" not in t
    for item in items.values():
        assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
        assert item["input_ids"].shape == item["labels"].shape and item["input_ids"].ndim == 1
        for key in ("pixel_values_videos", "pixel_values_images"):
            if key in item:
                assert item[key].dtype == torch.float32
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert (vi["input_ids"] == image_id).sum() == 2 * COUNTS.image
    assert (vi["input_ids"] == video_id).sum() == COUNTS.video
    # Media tokens are never trained.
    media = (vi["input_ids"] == image_id) | (vi["input_ids"] == video_id)
    assert (vi["labels"][media] == -100).all()


def test_pixels_are_the_decoded_media_in_text_order(tokenizer, data_dir):
    ds = _dataset(load_records(data_dir / "train.json"), tokenizer, data_dir)
    vi = ds[2]
    frames, indices = read_video(data_dir / "videos/b.mp4", T)
    assert indices.tolist() == [0, 0, 1, 2]  # linspace(0, 2, 4) truncated: 3 frames repeat
    torch.testing.assert_close(vi["pixel_values_videos"][0], preprocess_video(frames, SPEC), rtol=0, atol=0)
    # record order q.jpg then p.png, which is the text order of the two <image> placeholders
    q = preprocess_image(read_image(data_dir / "images/q.jpg"), SPEC, aspect="pad")
    p = preprocess_image(read_image(data_dir / "images/p.png"), SPEC, aspect="pad")
    torch.testing.assert_close(vi["pixel_values_images"][0], q, rtol=0, atol=0)
    torch.testing.assert_close(vi["pixel_values_images"][1], p, rtol=0, atol=0)
    assert not torch.equal(q, p)


def test_modality_lengths_are_signed_expanded_lengths(tokenizer, data_dir):
    samples = load_records(data_dir / "train.json")
    ds = _dataset(samples, tokenizer, data_dir)
    template = get_template("v1")
    expected = []
    for s in samples:
        # Independent count: whole-prompt tokenisation (placeholders are one special token each),
        # then each placeholder widened to its media token count.
        prompt = template.render_prompt(s.conversations, add_generation_prompt=False)
        n_text = len(tokenizer(prompt)["input_ids"])
        n_video, n_image = prompt.count("<video>"), prompt.count("<image>")
        n = n_text + n_video * (COUNTS.video - 1) + n_image * (COUNTS.image - 1)
        expected.append(n if s.has_media else -n)
    assert ds.modality_lengths == expected
    assert ds.modality_lengths == [48, 41, 71, -35]  # pinned: v, i, vi (2 turns), t
    assert ds.lengths == [48, 41, 71, 35]
    assert [len(ds[k]["input_ids"]) for k in range(4)] == ds.lengths


def test_decode_failure_names_sample_index_and_file(tokenizer, data_dir):
    bad = {"id": "notavideo", "video": "videos/text.mp4", "conversations": _turns("<video>\nWhat?")}
    path = _write(data_dir, "bad.json", [CLEAN[3], bad])
    for skip in (False, True):  # decode failures raise even with skip_bad_samples (documented)
        ds = _dataset(load_records(path), tokenizer, data_dir, skip_bad_samples=skip)
        assert len(ds) == 2
        assert ds[0]["id"] == "t"
        with pytest.raises(SampleError) as info:
            ds[1]
        message = str(info.value)
        assert "'notavideo'" in message and "bad.json #1" in message
        assert str(data_dir / "videos/text.mp4") in message and "vidlora check" in message
        assert info.value.problem.kind is ProblemKind.UNREADABLE_MEDIA
        assert info.value.problem.sample_id == "notavideo" and info.value.problem.index == 1


def _own_copy(data_dir, tmp_path):
    """A private copy of the module's media (these tests damage files) and its records."""
    root = tmp_path / "media"
    shutil.copytree(data_dir / "videos", root / "videos")
    shutil.copytree(data_dir / "images", root / "images")
    return root, load_records(_write(root, "train.json", CLEAN))


def test_a_file_damaged_after_construction_is_marked_not_substituted(tokenizer, data_dir, tmp_path):
    root, records = _own_copy(data_dir, tmp_path)
    marking = _dataset(records, tokenizer, root, mark_failed_items=True)
    raising = _dataset(records, tokenizer, root)
    clean = {k: marking[k] for k in range(4)}
    video = root / "videos/a.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])  # truncated after the check
    item = marking[0]
    assert sorted(item) == ["bad_sample", "id"] and item["id"] == "v"  # no pixels, no stand-in sample
    problem = item[BAD_SAMPLE_KEY]
    assert (problem.sample_id, problem.index, problem.source, problem.file) == (
        "v",
        0,
        str(root / "train.json"),
        str(video),
    )
    # (mp4 keeps its index at the end: cut in half, FFmpeg cannot open it at all)
    assert problem.kind is ProblemKind.UNREADABLE_MEDIA and problem.reason.startswith("not a readable video")
    with pytest.raises(SampleError) as info:
        raising[0]
    assert info.value.problem == problem
    # The other samples read as before, at the same positions.
    for k in (1, 2, 3):
        for key, value in clean[k].items():
            assert torch.equal(marking[k][key], value) if torch.is_tensor(value) else marking[k][key] == value
    # A file replaced by a FIFO (whose read would block FFmpeg forever) is refused before it is opened.
    os.remove(video)
    os.mkfifo(video)
    with bounded(30, "reading a FIFO"):
        problem = marking[0][BAD_SAMPLE_KEY]
    assert problem.kind is ProblemKind.NOT_A_FILE and problem.reason == "not a regular file"


def test_stuck_and_crashed_decoders_cost_their_sample_only(tokenizer, data_dir, tmp_path):
    root, records = _own_copy(data_dir, tmp_path)
    in_process = _dataset(records, tokenizer, root)
    watched = _dataset(
        records,
        tokenizer,
        root,
        video_reader=DecodeWatchdog(read_video_or_misbehave),
        decode_timeout=1.0,
        mark_failed_items=True,
    )
    try:
        for k in range(4):  # the same pixels as decoding in this process
            for key, value in in_process[k].items():
                assert (
                    torch.equal(watched[k][key], value)
                    if torch.is_tensor(value)
                    else watched[k][key] == value
                )
        mark(root / "videos/a.mp4", STUCK)
        mark(root / "videos/b.mp4", CRASH)
        with bounded(60, "two misbehaving decodes"):
            stuck, crashed = watched[0][BAD_SAMPLE_KEY], watched[2][BAD_SAMPLE_KEY]
        assert (stuck.sample_id, stuck.kind, stuck.file) == (
            "v",
            ProblemKind.DECODE_TIMEOUT,
            str(root / "videos/a.mp4"),
        )
        assert "timeout_s=1.0" in stuck.reason
        assert (crashed.sample_id, crashed.kind) == ("vi", ProblemKind.DECODER_CRASHED)
        assert "SIGSEGV" in crashed.reason
        assert torch.equal(watched[1]["pixel_values_images"], in_process[1]["pixel_values_images"])
        assert watched.video_reader.replaced == 2
    finally:
        watched.video_reader.close()


def test_skip_bad_samples_counts_and_lists_them(tokenizer, data_dir, tmp_path):
    (data_dir.parent / "outside.mp4").write_bytes(b"x")
    long_question = " ".join(["What color is the circle?"] * 20)
    recs = [
        CLEAN[0],
        {"id": "missing", "video": "videos/nope.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "escape", "video": "../outside.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "malformed", "conversations": [{"from": "bot", "value": "hi"}]},
        {"id": "mismatch", "image": "images/p.png", "conversations": _turns("<image> <image> What?")},
        {"id": "toolong", "conversations": _turns(long_question)},
        CLEAN[3],
    ]
    path = _write(tmp_path, "mixed.json", recs)
    kwargs = dict(
        processor=_processor(model_max_length=80),
        tokenizer=tokenizer,
        folders=MediaFolders(data_dir, data_dir),
    )
    with pytest.raises(BadSamplesError) as info:
        SupervisedDataset.from_paths(path, **kwargs)
    assert len(info.value.problems) == 5
    for sample_id in ("missing", "escape", "malformed", "mismatch", "toolong"):
        assert f"'{sample_id}'" in str(info.value)
    ds = SupervisedDataset.from_paths(path, skip_bad_samples=True, **kwargs)
    assert [s.id for s in ds.samples] == ["v", "t"]
    assert {p.sample_id: p.kind for p in ds.skipped} == {
        "missing": ProblemKind.MISSING_FILE,
        "escape": ProblemKind.BAD_PATH,
        "malformed": ProblemKind.INVALID_RECORD,
        "mismatch": ProblemKind.PLACEHOLDER_MISMATCH,
        "toolong": ProblemKind.TOKENIZATION,
    }
    missing = next(p for p in ds.skipped if p.sample_id == "missing")
    assert missing.file == str(data_dir / "videos/nope.mp4") and missing.index == 1
    assert missing.source == str(path)
    assert ds.modality_lengths[0] > 0 and ds.modality_lengths[1] < 0


def test_samples_of_a_modality_left_out_by_X_are_refused_by_id(tokenizer, data_dir):
    records = load_records(data_dir / "train.json")  # v (video), i (image), vi (both), t (text)
    with pytest.raises(BadSamplesError) as info:
        _dataset(records, tokenizer, data_dir, modalities=("image",))
    assert [(p.sample_id, p.kind) for p in info.value.problems] == [
        ("v", ProblemKind.DISABLED_MODALITY),
        ("vi", ProblemKind.DISABLED_MODALITY),
    ]
    assert "carries video videos/a.mp4 but --X enables Image" in str(info.value)
    kept = _dataset(records, tokenizer, data_dir, modalities=("video",), skip_bad_samples=True)
    assert [s.id for s in kept.samples] == ["v", "t"]
    assert {p.sample_id: p.reason for p in kept.skipped} == {
        "i": "carries image images/p.png but --X enables Video",
        "vi": "carries image images/q.jpg, images/p.png but --X enables Video",
    }
    assert len(_dataset(records, tokenizer, data_dir, modalities=("video", "image"))) == 4
    with pytest.raises(ValueError, match="unknown modalities"):
        _processor(modalities=("Video",))


def test_eval_split_is_deterministic_and_disjoint(tokenizer, data_dir):
    train, held = split_indices(10, 0.2, seed=0)
    assert (train, held) == split_indices(10, 0.2, seed=0)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == list(range(10))
    assert held == sorted(np.random.default_rng(0).permutation(10)[:2].tolist())
    assert any(split_indices(10, 0.2, seed=s)[1] != held for s in range(1, 5))
    assert len(split_indices(10, 0.01, seed=0)[1]) == 1  # at least one sample held out
    with pytest.raises(ValueError, match="keep any for training"):
        split_indices(1, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_indices(10, 0.0, seed=0)

    samples = load_records(data_dir / "train.json")
    ds = _dataset(samples, tokenizer, data_dir)
    tr, ev = train_eval_split(ds, 0.25, seed=3)
    tr2, ev2 = train_eval_split(ds, 0.25, seed=3)
    assert [s.id for s in tr.samples] == [s.id for s in tr2.samples]
    assert [s.id for s in ev.samples] == [s.id for s in ev2.samples]
    assert len(ev) == 1 and len(tr) == 3
    assert {s.id for s in tr.samples} | {s.id for s in ev.samples} == {"v", "i", "vi", "t"}
    full = dict(zip([s.id for s in samples], ds.modality_lengths, strict=True))
    assert tr.modality_lengths == [full[s.id] for s in tr.samples]
    assert ev[0]["id"] == ev.samples[0].id
    rec_tr, rec_ev = train_eval_split(samples, 0.25, seed=3)
    assert [s.id for s in rec_tr] == [s.id for s in tr.samples]
    assert [s.id for s in rec_ev] == [s.id for s in ev.samples]


def test_unreadable_record_file_or_nothing_left_is_fatal_even_when_skipping(tokenizer, data_dir, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": []')  # cut-off JSON
    kwargs = dict(
        processor=_processor(),
        tokenizer=tokenizer,
        folders=MediaFolders(data_dir, data_dir),
        skip_bad_samples=True,
    )
    with pytest.raises(BadSamplesError, match=r"broken\.json") as info:
        SupervisedDataset.from_paths([data_dir / "train.json", broken], **kwargs)
    assert [p.kind for p in info.value.problems] == [ProblemKind.INVALID_FILE]
    only_bad = _write(
        tmp_path,
        "only_bad.json",
        [{"id": "m", "video": "videos/nope.mp4", "conversations": _turns("<video>\nWhat?")}],
    )
    with pytest.raises(BadSamplesError, match="nothing is left to train on"):
        SupervisedDataset.from_paths(only_bad, **kwargs)


def test_from_args_uses_the_model_config(tokenizer, data_dir):
    from vidlora.args import DataArguments, ModelArguments, media_folders, processor_options
    from vidlora.model.presets import build_config

    config = build_config("tiny", tokenizer=tokenizer)
    data_args = DataArguments(
        data_path=[str(data_dir / "train.json")], video_folder=str(data_dir), image_folder=str(data_dir)
    )
    processor = Processor.for_model(config, **processor_options(ModelArguments(), data_args))
    ds = SupervisedDataset.from_paths(
        data_args.data_path, processor=processor, tokenizer=tokenizer, folders=media_folders(data_args)
    )
    # tiny preset: 64 px, patch 16 -> 16 tokens per image, 8 x 17 per video
    assert processor.counts == MediaTokenCounts(image=16, video=136) and processor.num_frames == 8
    assert processor.pixel_spec.image_size == 64
    item = ds[2]
    assert item["pixel_values_videos"].shape == (1, 8, 3, 64, 64)
    assert item["pixel_values_images"].shape == (2, 3, 64, 64)
    # Same texts as with COUNTS, widened by the tiny preset's counts instead (v, i, vi, t).
    small = [48, 41, 71, -35]
    widen = [(136 - 12), (16 - 4), (136 - 12) + 2 * (16 - 4), 0]
    assert ds.modality_lengths == [n + w if n > 0 else n for n, w in zip(small, widen, strict=True)]
    # --X Image: the video samples are named, not trained on.
    image_only = Processor.for_model(config, **processor_options(ModelArguments(X=["Image"]), data_args))
    with pytest.raises(BadSamplesError, match=r"'v'.*--X enables Image"):
        SupervisedDataset.from_paths(
            data_args.data_path, processor=image_only, tokenizer=tokenizer, folders=media_folders(data_args)
        )


def test_dataloader_worker_processes_give_the_same_batches(tokenizer, data_dir):
    from torch.utils.data import DataLoader

    from vidlora.data.collate import MultimodalCollator

    ds = _dataset(load_records(data_dir / "train.json"), tokenizer, data_dir)
    ds[0]  # decode in the parent first: workers must not inherit a broken thread pool
    collate = MultimodalCollator(pad_token_id=tokenizer.pad_token_id)
    serial = list(DataLoader(ds, batch_size=2, collate_fn=collate))
    parallel = list(DataLoader(ds, batch_size=2, collate_fn=collate, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert serial[1]["pixel_values_videos"].shape == (1, T, 3, 16, 16)  # vi's video; t has none
    assert serial[1]["pixel_values_images"].shape == (2, 3, 16, 16)
