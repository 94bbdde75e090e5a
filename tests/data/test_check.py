"""`vidlora check`: a clean synthetic data set passes (exit 0); a data set with planted faults is
rejected (exit 1) with exactly the planted sample ids flagged, each with its reason category."""

import json
import shutil
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import pytest

from vidlora.cli import main as vidlora
from vidlora.data.synthetic import generate_dataset

N_TRAIN = 6


def main(argv: list[str]) -> int:
    """`vidlora check ARGV` through the CLI (its error policy included)."""
    return vidlora(["check", *argv])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, N_TRAIN, 0, seed=0, size=32, num_frames=8)
    return root


def _args(root, *paths, report=None, extra=()):
    argv = [
        "--data_path",
        *map(str, paths),
        "--video_folder",
        str(root),
        "--image_folder",
        str(root),
        "--no_progress",
    ]
    if report is not None:
        argv += ["--report", str(report)]
    return argv + list(extra)


def _write_faststart_mp4(path, num_frames=16, size=32):
    """An mp4 with its index (moov) first, as web downloads have: cutting it keeps it openable."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = i, Fraction(1, 8)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _turns(question):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]


def test_clean_synthetic_dataset_passes(clean, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(_args(clean, clean / "train.json", report=report_path)) == 0
    report = json.loads(report_path.read_text())
    records = json.loads((clean / "train.json").read_text())
    assert report["ok"] is True and report["problems"] == [] and report["bad_ids"] == []
    assert report["counts"]["valid_records"] == N_TRAIN
    # Modalities counted independently from the synthetic records' own "modality" field.
    expected = dict(Counter(r["modality"] for r in records))
    assert report["modalities"] == expected
    n_videos = sum(1 for r in records if "video" in r)
    videos = report["media"]["videos"]
    assert videos["decoded"] == n_videos
    assert videos["codec"] == {"h264": n_videos}
    assert videos["resolution"] == {"32x32": n_videos}
    assert videos["fps"] == {"8.0": n_videos}
    assert videos["num_frames"]["min"] == videos["num_frames"]["max"] == 8
    assert videos["duration_s"]["min"] == pytest.approx(1.0)  # 8 frames at 8 fps
    assert report["media"]["images"]["decoded"] == sum(1 for r in records if "image" in r)
    assert report["tokens"]["truncated"] == 0 and report["tokens"]["rejected"] == 0
    assert sum(report["tokens"]["expanded"]["histogram"]["counts"]) == N_TRAIN
    # Tiny preset: 16 tokens per image, 8 x 17 per video, so expanded - text = 15 / 135 per medium.
    for info, r in zip(report["samples"], records, strict=True):
        extra = 135 * ("video" in r) + 15 * ("image" in r)
        assert info["expanded_tokens"] - info["text_tokens"] == extra
    assert "OK: every sample" in capsys.readouterr().out


def test_planted_faults_are_each_reported_by_id(clean, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    good = json.loads((root / "train.json").read_text())
    a_video = next(r["video"] for r in good if "video" in r)
    data = (root / a_video).read_bytes()
    (root / "videos/truncated.mp4").write_bytes(data[: len(data) // 2])  # index (at the end) lost
    _write_faststart_mp4(root / "videos/faststart.mp4")
    whole = (root / "videos/faststart.mp4").read_bytes()
    (root / "videos/cut.mp4").write_bytes(whole[: int(len(whole) * 0.7)])  # index kept, packets cut
    (root / "videos/empty.mp4").write_bytes(b"")
    (root / "videos/notes.mp4").write_text("these are my notes, not a video\n")
    (tmp_path / "escaped.mp4").write_bytes(data)  # a readable video, but outside the folder
    planted = [
        {"id": "f_missing", "video": "videos/does_not_exist.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "f_empty", "video": "videos/empty.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "f_truncated", "video": "videos/truncated.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "f_cut", "video": "videos/cut.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "f_text_mp4", "video": "videos/notes.mp4", "conversations": _turns("<video>\nWhat?")},
        {"id": "f_escape", "video": "../escaped.mp4", "conversations": _turns("<video>\nWhat?")},
        {
            "id": "f_malformed",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "?"}],
        },
        {"id": "f_mismatch", "image": "images/x.png", "conversations": _turns("<image>\n<image>\nWhat?")},
    ]
    # Planted faults interleaved with clean records, so "exactly these ids" is a real check.
    faststart_ok = {
        "id": "faststart_ok",
        "video": "videos/faststart.mp4",
        "conversations": _turns("<video>\nWhat?"),
    }
    mixed = [good[0], *planted[:4], good[1], *planted[4:], good[2], faststart_ok]
    (root / "mixed.json").write_text(json.dumps(mixed))
    report_path = tmp_path / "report.json"
    assert main(_args(root, root / "mixed.json", report=report_path)) == 1
    report = json.loads(report_path.read_text())
    assert report["ok"] is False
    expected = {
        "f_missing": ("missing_file", "videos/does_not_exist.mp4"),
        "f_empty": ("empty_file", "videos/empty.mp4"),
        "f_truncated": ("unreadable_media", "videos/truncated.mp4"),
        "f_cut": ("unreadable_media", "videos/cut.mp4"),
        "f_text_mp4": ("unreadable_media", "videos/notes.mp4"),
        "f_escape": ("bad_path", "../escaped.mp4"),
        "f_malformed": ("invalid_record", None),
        "f_mismatch": ("placeholder_mismatch", None),
    }
    assert report["bad_ids"] == [p["id"] for p in planted]  # in record order, nothing else
    assert len(report["problems"]) == len(planted)
    for problem in report["problems"]:
        kind, file = expected[problem["id"]]
        assert problem["kind"] == kind, problem
        assert problem["source"] == str(root / "mixed.json")
        assert problem["index"] == mixed.index(next(p for p in planted if p["id"] == problem["id"]))
        if file is not None:
            assert problem["file"].endswith(file), problem
        assert problem["reason"]
    assert report["counts"] == {
        "invalid_files": 0,
        "invalid_records": 2,
        "valid_records": len(mixed) - 2,
        "bad_samples": len(planted),
        "problems": len(planted),
    }
    out = capsys.readouterr().out
    for sample_id, (kind, _) in expected.items():
        line = next(line for line in out.splitlines() if f"'{sample_id}'" in line)
        assert f"[{kind}]" in line


def test_workers_give_the_same_report(clean, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(_args(clean, clean / "train.json", report=one)) == 0
    assert main(_args(clean, clean / "train.json", report=two, extra=["--workers", "2"])) == 0
    assert json.loads(one.read_text()) == json.loads(two.read_text())


def test_length_limits_count_truncated_and_rejected(clean, tmp_path):
    report_path = tmp_path / "r.json"
    assert main(_args(clean, clean / "train.json", report=report_path)) == 0
    text = [info["text_tokens"] for info in json.loads(report_path.read_text())["samples"]]
    longest = max(text)
    # One token less than the longest: those samples lose their final "</s>" but keep trained
    # tokens, so they are truncated, not rejected.
    extra = ["--model_max_length", str(longest - 1)]
    assert main(_args(clean, clean / "train.json", report=report_path, extra=extra)) == 0
    report = json.loads(report_path.read_text())
    assert report["tokens"]["truncated"] == text.count(longest) and report["tokens"]["rejected"] == 0
    assert [info["truncated"] for info in report["samples"]] == [n == longest for n in text]
    # Every synthetic text is longer than 40 tokens and its first answer starts later: all rejected.
    assert min(text) > 40
    extra = ["--model_max_length", "40"]
    assert main(_args(clean, clean / "train.json", report=report_path, extra=extra)) == 1
    report = json.loads(report_path.read_text())
    assert report["tokens"]["rejected"] == N_TRAIN and report["tokens"]["truncated"] == 0
    assert {p["kind"] for p in report["problems"]} == {"tokenization"}
    assert all("no trained tokens left" in p["reason"] for p in report["problems"])


def test_wrong_num_frames_is_a_usage_error(clean, capsys):
    assert main(_args(clean, clean / "train.json", extra=["--num_frames", "4"])) == 2
    assert "trained for 8 frames" in capsys.readouterr().err


def test_checkpoint_directory_gives_tokenizer_and_counts_without_weights(clean, tmp_path):
    from vidlora.model.presets import build_config
    from vidlora.model.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    small = {"image_size": 32}
    config = build_config(
        "tiny", tokenizer=tokenizer, image_config=small, video_config={**small, "num_frames": 4}
    )
    checkpoint = tmp_path / "ckpt"  # config + tokenizer only: check must not need weights
    config.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    report_path = tmp_path / "r.json"
    argv = _args(
        clean, clean / "train.json", report=report_path, extra=["--model_name_or_path", str(checkpoint)]
    )
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    # 32 px / patch 16 -> 4 tokens per image; 4 frames x (4 + 1) = 20 per video
    processor = report["settings"]["processor"]
    assert (processor["image_tokens"], processor["video_tokens"]) == (4, 20)
    assert processor["num_frames"] == 4 and processor["image_size"] == 32
    records = json.loads((clean / "train.json").read_text())
    for info, r in zip(report["samples"], records, strict=True):
        assert info["expanded_tokens"] - info["text_tokens"] == 19 * ("video" in r) + 3 * ("image" in r)
