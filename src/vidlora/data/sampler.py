"""Modality-length grouped sampling (`--group_by_modality_length`).

Video-LLaVA's recipe keeps every optimizer step to one modality group — multimodal samples
(video and/or images) or text-only ones — and, inside a group, puts samples of similar length
in the same step so little compute goes to padding. We keep the original algorithm
(`get_modality_length_grouped_indices`) with four changes a user can rely on:

* lengths are the *expanded* sequence lengths (a video counts its 2056 feature tokens, not 1);
* the order is a pure function of ``(seed, epoch)`` — the original shuffled inside each group
  with an unseeded generator, so a resumed run could not replay the same order;
* lengths are sorted across :data:`WINDOW_STEPS` steps, not inside one step as the original (whose
  sort changed nothing a step holds), so a multimodal step holds videos or images of similar length;
* the original merged the two groups' leftovers into one mixed final step. Here each group's
  tail is completed by repeating samples of the same group (as torch's DistributedSampler pads),
  so *every* step holds one modality; the number of repeats is reported by ``padding``.

Index order matches how the Trainer's dataloader deals batches out: a "megabatch" is one
optimizer step across all ranks (``world_size * per_device_batch * grad_accum`` samples) and is
laid out as ``world_size * grad_accum`` consecutive per-device micro-batches of balanced total
length, in the order the dataloader hands them to ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

#: Optimizer steps whose samples are sorted by length together (transformers' length-grouped
#: sampler uses 50 batches). Padding of one epoch at batch 4 (`vidlora bench`, benchmarks/RESULTS.md),
#: random order / one-step windows (the original) / 50 steps: 24.6 / 18.7 / 1.0 % on the tiny
#: preset's mixed synthetic set, 30.8 / 31.3 / 11.1 % on the 27-sample real-resolution set (where
#: sorted batches are the optimum for its four question lengths).
WINDOW_STEPS = 50


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split ``indices`` into ``num_chunks`` chunks of equal size and similar total length.

    Greedy, like the original: each index (longest first, as given) goes to the chunk with the
    smallest length sum that is not yet full. Falls back to a strided split when the count does
    not divide evenly.
    """
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        target = min(range(num_chunks), key=lambda c: totals[c])
        chunks[target].append(index)
        totals[target] += lengths[index]
        if len(chunks[target]) == per_chunk:
            totals[target] = float("inf")
    return chunks


def length_grouped_indices(
    lengths: Sequence[int],
    megabatch_size: int,
    num_chunks: int,
    generator: torch.Generator,
    window_steps: int = 1,
) -> list[int]:
    """Shuffle, sort windows of ``window_steps`` megabatches by length (longest first), cut each window
    into megabatches and balance every megabatch across chunks.

    With ``window_steps`` 1 (the original) only the samples of one step are sorted, which does not
    change what a step holds: a video and an image sample still share a batch and the image's row
    is mostly padding. Sorting across many steps puts similar lengths in the same step.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = megabatch_size * window_steps
    result: list[int] = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        for step in range(0, len(ranked), megabatch_size):
            for chunk in split_to_even_chunks(ranked[step : step + megabatch_size], lengths, num_chunks):
                result.extend(chunk)
    return result


def _complete_tail(
    group: list[int], megabatch_size: int, generator: torch.Generator
) -> tuple[list[int], int]:
    """Repeat members of ``group`` so its size is a multiple of ``megabatch_size``."""
    missing = (-len(group)) % megabatch_size
    if missing == 0:
        return group, 0
    picks = torch.randint(len(group), (missing,), generator=generator).tolist()
    return group + [group[p] for p in picks], missing


def modality_grouped_indices(
    lengths: Sequence[int],
    per_device_batch_size: int,
    world_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    window_steps: int = WINDOW_STEPS,
) -> tuple[list[int], int]:
    """The full sample order for one epoch, and how many repeated samples it contains.

    ``lengths[i] > 0`` marks a multimodal sample of that expanded length, ``< 0`` a text-only one.
    Lengths are sorted across ``window_steps`` optimizer steps of one group at a time.
    """
    if any(length == 0 for length in lengths):
        zero = next(i for i, length in enumerate(lengths) if length == 0)
        raise ValueError(f"sample {zero} has length 0: lengths must be signed non-zero token counts")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    megabatch_size = per_device_batch_size * world_size * grad_accum
    # One chunk per micro-batch of one rank, as the original did (its "world_size" was
    # world_size * grad_accum), so every forward pass sees a similar token total.
    num_chunks = world_size * grad_accum
    groups = [
        [i for i, length in enumerate(lengths) if length > 0],
        [i for i, length in enumerate(lengths) if length < 0],
    ]
    megabatches: list[list[int]] = []
    padding = 0
    abs_lengths = [abs(length) for length in lengths]
    for group in groups:
        if not group:
            continue
        group, added = _complete_tail(group, megabatch_size, generator)
        padding += added
        group_lengths = [abs_lengths[i] for i in group]
        local = length_grouped_indices(group_lengths, megabatch_size, num_chunks, generator, window_steps)
        ordered = [group[i] for i in local]
        megabatches += [ordered[s : s + megabatch_size] for s in range(0, len(ordered), megabatch_size)]
    shuffle = torch.randperm(len(megabatches), generator=generator).tolist()
    return [i for m in shuffle for i in megabatches[m]], padding


class ModalityLengthGroupedSampler(Sampler[int]):
    """Sampler for the Trainer: one modality per optimizer step, reproducible per (seed, epoch).

    The Trainer calls ``set_epoch`` before each epoch; on resume it replays the same epoch order
    and skips the batches already seen, so the resumed run sees exactly the uninterrupted order.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        per_device_batch_size: int,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        window_steps: int = WINDOW_STEPS,
    ) -> None:
        if min(per_device_batch_size, world_size, grad_accum, window_steps) < 1:
            raise ValueError("per_device_batch_size, world_size, grad_accum and window_steps must be >= 1")
        self.lengths = list(lengths)
        self.per_device_batch_size = per_device_batch_size
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.window_steps = window_steps
        self.epoch = 0
        _, self.padding = self._indices()

    def _indices(self) -> tuple[list[int], int]:
        return modality_grouped_indices(
            self.lengths,
            self.per_device_batch_size,
            self.world_size,
            self.grad_accum,
            self.seed,
            self.epoch,
            self.window_steps,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) + self.padding

    def __iter__(self) -> Iterator[int]:
        indices, _ = self._indices()
        return iter(indices)
