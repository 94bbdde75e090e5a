"""`vidlora check` and `vidlora train` read data under the same rules: same flags, same problems, same ids.

Planted faults, each refused by one rule: a missing video, a placeholder count that does not
match the media, an answer cut by ``--model_max_length``, and — under ``--X Video`` — every
sample that carries an image. Training's refusal (before any step runs) and check's report
must name exactly the same samples with the same categories, in both directions.
"""

from __future__ import annotations

import json
import shutil

import pytest

from vidlora.data.synthetic import generate_dataset


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty")
    generate_dataset(root, 10, 0, seed=4, size=32, num_frames=8, multi_turn=0.0)
    records = json.loads((root / "train.json").read_text())
    videos = [r for r in records if "video" in r and "image" not in r]
    videos[0]["video"] = "videos/missing.mp4"
    videos[1]["conversations"][0]["value"] += " <image>"
    long_text = " ".join(["word"] * 400)
    text = next(r for r in records if "video" not in r and "image" not in r)
    text["conversations"][0]["value"] = long_text
    (root / "train.json").write_text(json.dumps(records))
    shutil.copy(root / "train.json", root / "copy.json")
    return root


def _data_flags(root) -> list[str]:
    return [
        "--data_path",
        str(root / "train.json"),
        "--video_folder",
        str(root),
        "--image_folder",
        str(root),
        "--model_max_length",
        "300",
    ]


def check_problems(root, *flags: str) -> set[tuple[str, str]]:
    from vidlora.cli import main

    report = root / "report.json"
    code = main(["check", *_data_flags(root), *flags, "--no_progress", "--report", str(report)])
    found = {(p["id"], p["kind"]) for p in json.loads(report.read_text())["problems"]}
    assert code == (1 if found else 0)
    return found


def train_problems(root, tmp_path, *flags: str) -> set[tuple[str, str]]:
    """The problems training refuses the data with (it stops before loading pixels or training)."""
    from vidlora.args import parse_train_args
    from vidlora.data.dataset import BadSamplesError
    from vidlora.training.recipe import load_model_and_data

    argv = [*_data_flags(root), *flags, "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--tf32", "False", "--lora_enable", "True"]  # fmt: skip
    try:
        load_model_and_data(*parse_train_args(argv))
    except BadSamplesError as err:
        return {(p.sample_id, p.kind.value) for p in err.problems}
    return set()


@pytest.mark.parametrize(
    "flags", [(), ("--X", "Video"), ("--X", "Image"), ("--image_aspect_ratio", "square")]
)
def test_check_reports_exactly_what_training_refuses(faulty, tmp_path, flags):
    from_check = check_problems(faulty, *flags)
    from_train = train_problems(faulty, tmp_path, *flags)
    assert from_check == from_train
    kinds = {kind for _, kind in from_check}
    if "Image" not in flags:  # under --X Image the faulty video samples are refused as disabled first
        assert {"missing_file", "placeholder_mismatch", "tokenization"} <= kinds
    if flags == ("--X", "Video"):
        records = json.loads((faulty / "train.json").read_text())
        with_image = {r["id"] for r in records if "image" in r}
        assert {i for i, kind in from_check if kind == "disabled_modality"} == with_image


def test_evaluation_data_is_checked_as_training_reads_it(faulty, tmp_path):
    records = json.loads((faulty / "train.json").read_text())
    clean = [r for r in records if "video" not in r and "image" not in r and len(str(r)) < 2000][:2]
    bad = {"id": "eval-missing", "video": "videos/gone.mp4",
           "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "red"}]}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(clean))
    (tmp_path / "eval.json").write_text(json.dumps([bad]))
    shutil.copytree(faulty / "videos", tmp_path / "videos")
    flags = ("--eval_data_path", str(tmp_path / "eval.json"))
    expected = {("eval-missing", "missing_file")}
    assert check_problems(tmp_path, *flags) == expected
    assert train_problems(tmp_path, tmp_path, *flags) == expected
