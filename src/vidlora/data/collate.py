"""Batching: pad token sequences, build attention masks, stack media in row order.

A dataset item is a dict with ``input_ids`` and (for training) ``labels`` as 1-D LongTensors,
``pixel_values_videos`` ``[n_videos, T, 3, S, S]`` and ``pixel_values_images`` ``[n_images, 3, S, S]``
(either may be absent or hold zero rows) and ``id``. The model scatters media features into the
placeholder positions in reading order, so media are concatenated row by row, each row's media
in the order its text mentions them.

An item a dataset could not read (:class:`~vidlora.data.dataset.SupervisedDataset` with
``mark_failed_items``) is ``{"id", BAD_SAMPLE_KEY: SampleProblem}``: it is left out of the batch,
which lists such problems under :data:`BAD_SAMPLES_KEY` (the Trainer takes that key off before the
forward and decides to stop or skip). A batch whose every item failed becomes one stand-in row (a
pad token, label -100) that trains nothing: every process of a multi-process job still runs the
same forward and backward, so their collectives stay in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
#: The batch key of the sample ids (``keep_ids``); not a model input, so whoever calls the model pops it.
SAMPLE_IDS = "ids"
#: Key of a dataset item that could not be read: its ``SampleProblem``.
BAD_SAMPLE_KEY = "bad_sample"
#: Key of a batch's list of the ``SampleProblem`` of its items that could not be read (absent if none).
BAD_SAMPLES_KEY = "bad_samples"


def pad_sequences(sequences: Sequence[torch.Tensor], value: int, side: str) -> torch.Tensor:
    """Stack 1-D tensors into ``[B, L_max]``, padding with ``value`` on ``side`` ("right"/"left")."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=sequences[0].dtype)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, longest - len(seq) :] = seq
    return out


def _stack_media(items: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    parts = [item[key] for item in items if item.get(key) is not None and len(item[key]) > 0]
    return torch.cat(parts, dim=0) if parts else None


@dataclass(frozen=True)
class MultimodalCollator:
    """Collate dataset items into a model batch.

    Right padding for training (the loss ignores padded labels); left padding for batched
    generation, so every row's last prompt token sits at the end. ``keep_ids`` adds the sample
    ids (a list of str) under :data:`SAMPLE_IDS`: prediction writes them next to the answers, and
    training names the batch that broke (the Trainer pops them before the forward, which takes
    only tensors).
    """

    pad_token_id: int
    padding_side: str = "right"
    keep_ids: bool = False

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        bad = [item[BAD_SAMPLE_KEY] for item in items if BAD_SAMPLE_KEY in item]
        items = [item for item in items if BAD_SAMPLE_KEY not in item]
        rows = items or [self._stand_in()]
        ids = [item["input_ids"] for item in rows]
        batch: dict[str, Any] = {
            "input_ids": pad_sequences(ids, self.pad_token_id, self.padding_side),
            "attention_mask": pad_sequences([torch.ones_like(s) for s in ids], 0, self.padding_side),
        }
        if all("labels" in item for item in rows):
            batch["labels"] = pad_sequences(
                [item["labels"] for item in rows], IGNORE_INDEX, self.padding_side
            )
        for key in ("pixel_values_videos", "pixel_values_images"):
            stacked = _stack_media(rows, key)
            if stacked is not None:
                batch[key] = stacked
        if self.keep_ids:
            batch[SAMPLE_IDS] = [str(item["id"]) for item in items if "id" in item]
        if bad:
            batch[BAD_SAMPLES_KEY] = bad
        return batch

    def _stand_in(self) -> dict[str, Any]:
        """The row of a batch whose every item failed: one pad token, nothing trained."""
        return {
            "input_ids": torch.tensor([self.pad_token_id], dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX], dtype=torch.long),
        }
