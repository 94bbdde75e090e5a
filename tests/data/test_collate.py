"""Collate: padding values and sides, attention masks, media stacked in row order, unreadable items
left out and listed, a stand-in row when none is left."""

import pytest
import torch

from vidlora.data.collate import (
    BAD_SAMPLE_KEY,
    BAD_SAMPLES_KEY,
    IGNORE_INDEX,
    MultimodalCollator,
    pad_sequences,
)
from vidlora.data.dataset import ProblemKind, SampleProblem


def _item(ids, labels, videos=0, images=0, tag=0, sample_id="x"):
    item = {"id": sample_id, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if videos:
        item["pixel_values_videos"] = torch.full((videos, 2, 3, 4, 4), float(tag))
    if images:
        item["pixel_values_images"] = torch.full((images, 3, 4, 4), float(tag))
    return item


def test_right_padding_masks_and_labels():
    items = [_item([1, 5, 6], [-100, 5, 6]), _item([1, 7], [-100, 7])]
    batch = MultimodalCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, IGNORE_INDEX]]
    assert "pixel_values_videos" not in batch and "pixel_values_images" not in batch
    assert "ids" not in batch


def test_left_padding_for_generation_keeps_ids():
    items = [_item([1, 5, 6], [1, 1, 1], sample_id="a"), _item([1, 7], [1, 1], sample_id="b")]
    batch = MultimodalCollator(pad_token_id=9, padding_side="left", keep_ids=True)(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [9, 1, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["ids"] == ["a", "b"]


def test_media_stacked_in_row_order():
    items = [
        _item([1], [1], videos=1, tag=1),  # video-only
        _item([1], [1], images=2, tag=2),  # two images
        _item([1], [1]),  # text-only
        _item([1], [1], videos=1, images=1, tag=4),  # video + image
    ]
    batch = MultimodalCollator(pad_token_id=0)(items)
    assert batch["pixel_values_videos"].shape == (2, 2, 3, 4, 4)
    assert batch["pixel_values_videos"][:, 0, 0, 0, 0].tolist() == [1.0, 4.0]
    assert batch["pixel_values_images"].shape == (3, 3, 4, 4)
    assert batch["pixel_values_images"][:, 0, 0, 0].tolist() == [2.0, 2.0, 4.0]


def _failed(sample_id: str) -> dict:
    problem = SampleProblem(
        ProblemKind.UNREADABLE_MEDIA, "truncated", sample_id, 3, "t.json", f"{sample_id}.mp4"
    )
    return {"id": sample_id, BAD_SAMPLE_KEY: problem}


def test_unreadable_items_are_left_out_and_listed():
    items = [_item([1, 5], [-100, 5], videos=1, tag=1, sample_id="a"), _failed("b"),
             _item([1, 7, 8], [-100, 7, 8], videos=1, tag=3, sample_id="c"), _failed("d")]  # fmt: skip
    batch = MultimodalCollator(pad_token_id=0, keep_ids=True)(items)
    assert batch["input_ids"].tolist() == [[1, 5, 0], [1, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 5, IGNORE_INDEX], [-100, 7, 8]]
    assert batch["pixel_values_videos"][:, 0, 0, 0, 0].tolist() == [1.0, 3.0]  # a's and c's only
    assert batch["ids"] == ["a", "c"]
    assert [p.sample_id for p in batch[BAD_SAMPLES_KEY]] == ["b", "d"]
    assert batch[BAD_SAMPLES_KEY][0] == items[1][BAD_SAMPLE_KEY]
    assert BAD_SAMPLES_KEY not in MultimodalCollator(pad_token_id=0)([items[0]])


def test_a_batch_of_unreadable_items_becomes_one_row_that_trains_nothing():
    batch = MultimodalCollator(pad_token_id=9)([_failed("a"), _failed("b")])
    assert batch["input_ids"].tolist() == [[9]] and batch["attention_mask"].tolist() == [[1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX]]
    assert "pixel_values_videos" not in batch and "pixel_values_images" not in batch
    assert [p.sample_id for p in batch[BAD_SAMPLES_KEY]] == ["a", "b"]


def test_errors():
    with pytest.raises(ValueError, match="empty batch"):
        MultimodalCollator(pad_token_id=0)([])
    with pytest.raises(ValueError, match="padding side"):
        pad_sequences([torch.tensor([1])], 0, "middle")
