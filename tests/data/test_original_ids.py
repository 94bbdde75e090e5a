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
from transformers import AutoTokenizer

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
    # The original's code as it runs on transformers 5 unchanged (its legacy default is False).
    stock_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    stock = reference(
        directory,
        LEGACY[legacy_name],
        conv,
        media,
        template,
        encode=lambda text: list(stock_tokenizer(text).input_ids),
    )
    return {
        "ids": ids,
        "labels": labels,
        "original": old,
        "today": today,
        "stock": stock,
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


@pytest.mark.parametrize("legacy_name", list(LEGACY))
@pytest.mark.parametrize(
    "question",
    [
        "<image> What color is the circle?",
        "Is there a circle in <image> this picture?",
        "What is this?\n<image>",
    ],
)
def test_placeholders_inside_the_text_give_the_originals_ids(tokenizer_dirs, legacy_name, question):
    """A chunk that starts with a space gets SentencePiece's dummy prefix on top ("▁", "▁What")."""
    directory = tokenizer_dirs[legacy_name]
    conv = [("human", question), ("gpt", ANSWERS[0])]
    ids, labels = vidlora_ids(vidlora_tokenizer(directory), conv, {"image": "a.png"}, "v1")
    old = reference(directory, LEGACY[legacy_name], conv, {"image": "a.png"}, "v1")
    assert old.consistent
    assert ids == old.input_ids and labels == old.labels


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


# -- the docs table ---------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tokenization.md"
TABLE_START, TABLE_END = "<!-- cases:begin -->", "<!-- cases:end -->"


def _note(row: dict) -> str:
    if row["same_ids"] and row["same_labels"]:
        return "equal"
    old = row["original"]
    if not old.consistent and 0 in old.input_ids:
        return (
            "4.31's `legacy=False` strips the `▁` of `▁USER` after `</s>` and finds no such piece (`<unk>`), "
            "so the original masks every label; vidlora keeps the tokenizer's own ids and trains every answer"
        )
    return "differs"


def _masking(sample) -> str:
    return "consistent" if sample.consistent else "mismatch: all masked"


def markdown_table(tokenizer_dirs) -> str:
    """The cases table of docs/tokenization.md, computed."""
    lines = [
        "| `legacy` | template | media | turns | original on transformers 4.31 | original on transformers 5 "
        "| ids = 4.31's | labels = 4.31's | |",
        "|---|---|---|---:|---|---|---|---|---|",
    ]
    for legacy_name, template, modality, turns in CASES:
        row = case_row(tokenizer_dirs, legacy_name, template, modality, turns)
        lines.append(
            f"| {legacy_name} | {template} | {modality} | {turns} | {_masking(row['original'])} | "
            f"{_masking(row['stock'])} | {'yes' if row['same_ids'] else 'no'} | "
            f"{'yes' if row['same_labels'] else 'no'} | {_note(row)} |"
        )
    return "\n".join(lines)


def test_docs_table_is_what_the_comparison_gives(tokenizer_dirs):
    text = DOCS.read_text()
    documented = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip()
    assert documented == markdown_table(tokenizer_dirs), "regenerate: python tests/data/test_original_ids.py"


if __name__ == "__main__":  # print the docs table: python tests/data/test_original_ids.py
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: write_sp_tokenizer(Path(tmp) / name, legacy=value) for name, value in LEGACY.items()}
        print(markdown_table(dirs))


def test_added_tokens_json_keeps_its_ids_and_the_media_tokens_follow(tmp_path):
    """LLaVA-family checkpoints that added a pad token ship it in added_tokens.json (after the pieces)."""
    from hub_repos import SP_VOCAB_SIZE

    directory = write_sp_tokenizer(tmp_path / "t", legacy=None, added_tokens={"[PAD]": SP_VOCAB_SIZE})
    tokenizer = vidlora_tokenizer(directory)
    ids = tokenizer.convert_tokens_to_ids(["[PAD]", "<image>", "<video>", "<pad>"])
    assert ids == [SP_VOCAB_SIZE, SP_VOCAB_SIZE + 1, SP_VOCAB_SIZE + 2, SP_VOCAB_SIZE + 3]
    assert len(tokenizer) == SP_VOCAB_SIZE + 4 and tokenizer.pad_token == "<pad>"
