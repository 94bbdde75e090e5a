"""vidlora's prompt ids against the original Video-LLaVA's, for LLaMA SentencePiece tokenizers.

The reference is ``original_videollava``: the original's ``tokenizer_image_token`` +
``preprocess_v1`` written out independently, run with transformers 4.31's slow tokenizer
(re-stated on ``sentencepiece``) — the stack the released model was trained on — and with the
tokenizer vidlora loaded. Cases: ``legacy`` true / false / absent in ``tokenizer_config.json``
x template (v1, vicuna_v1, llava_v1) x modality (image, video, video+image, text) x 1 or 2
turns. ``docs/tokenization.md`` holds the resulting table; a test keeps it true.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import original_videollava as original
from hub_repos import write_sp_tokenizer

LEGACY = {"absent": None, "true": True, "false": False}
TEMPLATES = ("v1", "vicuna_v1", "llava_v1")
QUESTIONS = {
    "image": ("<image>\nWhat color is the circle?", {"image": "a.png"}),
    "video": ("<video>\nWhat is the man doing?", {"video": "a.mp4"}),
    "video+image": ("<video>\n<image>\nCompare them.", {"video": "a.mp4", "image": "a.png"}),
    "text": ("What is the capital?", {}),
}
ANSWERS = ("It is red.", "Blue.")
FOLLOW_UP = "And now?"


def conversation(modality: str, turns: int) -> list[tuple[str, str]]:
    question = QUESTIONS[modality][0]
    out = [("human", question), ("gpt", ANSWERS[0])]
    if turns == 2:
        out += [("human", FOLLOW_UP), ("gpt", ANSWERS[1])]
    return out


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp")
    return {name: write_sp_tokenizer(root / name, legacy=value) for name, value in LEGACY.items()}


def vidlora_tokenizer(directory: Path):
    from vidlora.model.tokenizer import load_tokenizer

    return load_tokenizer(directory)


def vidlora_ids(
    tokenizer, turns, media, template: str, *, num_frames: int = 8
) -> tuple[list[int], list[int]]:
    """vidlora's ids and labels with each media run collapsed to the original's -200 per frame/image."""
    from vidlora.data.records import Turn
    from vidlora.data.tokenize import MediaTokenCounts, tokenize_sample
    from vidlora.model.tokenizer import media_token_ids

    counts = MediaTokenCounts(image=3, video=num_frames * 2)
    tokenized = tokenize_sample(
        [Turn(r, v) for r, v in turns], tokenizer, template, counts, tokenization="split_at_media"
    )
    media = media_token_ids(tokenizer)
    ids, labels, k = [], [], 0
    while k < len(tokenized.input_ids):
        token = tokenized.input_ids[k]
        if token == media.image:
            ids.append(original.IMAGE_TOKEN_INDEX)
            labels.append(original.IGNORE_INDEX)
            k += counts.image
        elif token == media.video:
            ids += [original.IMAGE_TOKEN_INDEX] * num_frames
            labels += [original.IGNORE_INDEX] * num_frames
            k += counts.video
        else:
            ids.append(token)
            labels.append(tokenized.labels[k])
            k += 1
    return ids, labels


def reference(tokenizer_dir: Path, legacy: bool | None, turns, media, template, encode=None):
    """The original's ids/labels; with ``encode`` None, on transformers 4.31's tokenizer (legacy default True)."""
    if encode is None:
        slow = original.SlowLlamaTokenizer431(
            str(tokenizer_dir / "tokenizer.model"), legacy=legacy is not False
        )
        encode = slow
    return original.preprocess_v1(
        original.expand_video(turns, 8),
        encode,
        bos_token_id=1,
        pad_token_id=0,
        has_image=bool(media),
        template=template,
    )


def case_row(tokenizer_dirs, legacy_name: str, template: str, modality: str, turns: int) -> dict:
    """One row of the docs table: the comparison facts of one case."""
    directory = tokenizer_dirs[legacy_name]
    tokenizer = vidlora_tokenizer(directory)
    conv = conversation(modality, turns)
    media = QUESTIONS[modality][1]
    ids, labels = vidlora_ids(tokenizer, conv, media, template)
    old = reference(directory, LEGACY[legacy_name], conv, media, template)
    today = reference(
        directory,
        LEGACY[legacy_name],
        conv,
        media,
        template,
        encode=lambda text: list(tokenizer(text).input_ids),
    )
    return {
        "ids": ids,
        "labels": labels,
        "original": old,
        "today": today,
        "tokenizer": tokenizer,
        "same_ids": ids == old.input_ids,
        "same_labels": labels == old.labels,
    }


CASES = [
    (legacy, template, modality, turns)
    for legacy in LEGACY
    for template in TEMPLATES
    for modality in QUESTIONS
    for turns in (1, 2)
]


@pytest.mark.parametrize(("legacy_name", "template", "modality", "turns"), CASES)
def test_ids_and_labels_equal_the_originals_where_its_masking_holds(
    tokenizer_dirs, legacy_name, template, modality, turns
):
    row = case_row(tokenizer_dirs, legacy_name, template, modality, turns)
    # Always: vidlora's ids are the original algorithm's on the tokenizer vidlora loaded.
    assert row["ids"] == row["today"].input_ids
    if row["original"].consistent:
        assert row["same_ids"] and row["same_labels"]
    # Always: what is trained is exactly every answer and its </s>, by construction.
    trained = [
        t for t, label in zip(row["ids"], row["labels"], strict=True) if label != original.IGNORE_INDEX
    ]
    decoded = row["tokenizer"].decode(trained, skip_special_tokens=False)
    assert [part.strip() for part in decoded.split("</s>")] == [*ANSWERS[:turns], ""]


def test_absent_legacy_loads_as_the_original_stack_and_says_so(tokenizer_dirs):
    from vidlora.model.tokenizer import load_tokenizer

    notes: list[str] = []
    tokenizer = load_tokenizer(tokenizer_dirs["absent"], notes=notes)
    assert tokenizer.legacy is True
    assert any("legacy" in note and "4.31" in note for note in notes)
    explicit = load_tokenizer(tokenizer_dirs["false"], notes=(quiet := []))
    assert explicit.legacy is False and not any("legacy" in note for note in quiet)


def test_saved_tokenizer_keeps_its_legacy_setting(tokenizer_dirs, tmp_path):
    """transformers 5 leaves `legacy` out of tokenizer_config.json on save; reloaded, it would flip."""
    from vidlora.model.tokenizer import load_tokenizer

    for name in ("false", "absent"):
        tokenizer = load_tokenizer(tokenizer_dirs[name])
        tokenizer.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert saved["legacy"] is tokenizer.legacy
        assert load_tokenizer(tmp_path / name).legacy is tokenizer.legacy
