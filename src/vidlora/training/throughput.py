"""Measuring a training run: padding, time waiting for data, token counts, model FLOPs, peak memory.

Pure functions and one small recorder, shared by `vidlora bench`'s scenarios (vidlora's Trainer
loop and the baselines alike), so every scenario is counted by the same code. The FLOPs count is
the usual matmul estimate for LoRA on a frozen base (see :func:`training_flops`).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100

#: Dense bf16 tensor-core peak, TFLOPS, by a substring of ``torch.cuda.get_device_name()``.
#: H200 has the H100 SXM's compute (more memory only). Unknown devices get no MFU.
PEAK_BF16_TFLOPS: Mapping[str, float] = {"H200": 989.0, "H100": 989.0, "A100": 312.0}

FLOPS_FORMULA = (
    "per token: forward 2N + A, activation backward 2N + 2A (frozen base: no weight "
    "gradients), LoRA 6·N_lora; towers forward only, 2·N_tower per tower token; projector "
    "(trained fully) 6·N_proj per feature token; "
    "N = LLM parameters without the input embedding, A = 4·layers·hidden·L (QKᵀ and AV, 2 FLOPs "
    "per multiply-add, L = the row's length); gradient checkpointing's recomputed forward "
    "(2N + A) is counted apart and not as useful work; MFU = useful FLOPs / (time · peak)"
)


# -- padding ------------------------------------------------------------------------------------


def padding_fraction(batches: Sequence[Sequence[int]]) -> float:
    """Pad tokens / tokens of the padded batches, for batches given as their rows' lengths.

    A batch of rows ``l_1..l_B`` is padded to ``B · max(l)``; its pad tokens are ``B · max(l) − Σ l``.
    """
    padded = sum(len(rows) * max(rows) for rows in batches if rows)
    if padded == 0:
        raise ValueError("no tokens: every batch is empty")
    real = sum(sum(rows) for rows in batches)
    return (padded - real) / padded


def order_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``batch_size`` indices (the last may be shorter), as a DataLoader deals them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]


def order_padding(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Padding fraction of one epoch: ``lengths[i]`` (sign ignored) batched in ``order``."""
    return padding_fraction([[abs(lengths[i]) for i in batch] for batch in order_batches(order, batch_size)])


# -- one batch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchCounts:
    """Token counts of one collated batch (right- or left-padded ``input_ids``/``attention_mask``)."""

    rows: int
    padded_tokens: int  # rows · padded length
    tokens: int  # non-pad tokens (media features included: ids are expanded)
    trained_tokens: int  # labels != IGNORE_INDEX
    row_lengths: tuple[int, ...]
    videos: int = 0
    images: int = 0

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> BatchCounts:
        mask = batch["attention_mask"]
        lengths = tuple(int(n) for n in mask.sum(dim=1).tolist())
        labels = batch.get("labels")
        trained = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        videos, images = (batch.get(k) for k in ("pixel_values_videos", "pixel_values_images"))
        return cls(
            int(mask.shape[0]),
            int(mask.numel()),
            sum(lengths),
            trained,
            lengths,
            0 if videos is None else int(videos.shape[0]),
            0 if images is None else int(images.shape[0]),
        )


# -- FLOPs --------------------------------------------------------------------------------------


def training_flops(
    llm_params: int,
    lora_params: int,
    layers: int,
    hidden: int,
    row_lengths: Sequence[int],
    *,
    media_flops: float = 0.0,
    checkpointing: bool = False,
) -> tuple[float, float]:
    """``(useful, recomputed)`` FLOPs of one LoRA training step over rows of ``row_lengths`` tokens.

    useful = Σ_rows [L·(4N + 6·N_lora) + 3·A_row·L] + media, with A_row = 4·layers·hidden·L;
    recomputed (gradient checkpointing) = Σ_rows [L·2N + A_row·L]. ``media_flops``: see :func:`media_flops`.
    """
    tokens = sum(row_lengths)
    attention = sum(4 * layers * hidden * length * length for length in row_lengths)  # Σ A·L
    useful = (4 * llm_params + 6 * lora_params) * tokens + 3 * attention + media_flops
    recomputed = 2 * llm_params * tokens + attention if checkpointing else 0
    return float(useful), float(recomputed)


def media_flops(tower_params: int, tower_tokens: int, projector_params: int, feature_tokens: int) -> float:
    """Towers forward only (2 FLOPs per parameter per tower token), the fully trained projector
    forward + backward with weight gradients (6 per parameter per feature token)."""
    return float(2 * tower_params * tower_tokens + 6 * projector_params * feature_tokens)


def mfu(useful_flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: useful FLOPs per second over the device's peak."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError("seconds and peak_flops must be positive")
    return useful_flops / seconds / peak_flops


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOPS of a GPU from its name, or None when it is not in :data:`PEAK_BF16_TFLOPS`."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# -- memory -------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# -- the recorder -------------------------------------------------------------------------------


@dataclass
class StepRecorder:
    """Per optimizer step: seconds spent fetching batches, batch counts, and when the step ended.

    A step's time runs from the previous step's end (or the first fetch) to its own end, so the
    fetch, the forward/backward and the optimizer all fall inside one step. ``sync`` is called
    before each clock reading (``torch.cuda.synchronize`` on CUDA, so queued kernels are counted).
    """

    sync: Any = None
    fetch_s: list[float] = field(default_factory=list)
    batches: list[list[BatchCounts]] = field(default_factory=list)
    step_ends: list[float] = field(default_factory=list)
    start: float | None = None

    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def fetched(self, began: float, batches: Sequence[Mapping[str, Any]]) -> None:
        """Record one step's fetch (``began``: :meth:`now` before the fetch)."""
        if self.start is None:
            self.start = began
        self.fetch_s.append(time.perf_counter() - began)
        self.batches.append([BatchCounts.of(b) for b in batches])

    def step_end(self) -> None:
        self.step_ends.append(self.now())

    def summary(self, warmup_steps: int) -> dict[str, float]:
        """Throughput over the steps after ``warmup_steps`` (those are excluded from every number)."""
        steps = len(self.step_ends)
        if steps <= warmup_steps:
            raise ValueError(f"{steps} steps recorded, none after the {warmup_steps} warm-up steps")
        assert self.start is not None
        begin = self.step_ends[warmup_steps - 1] if warmup_steps > 0 else self.start
        seconds = self.step_ends[-1] - begin
        timed = [c for step in self.batches[warmup_steps:steps] for c in step]
        samples = sum(c.rows for c in timed)
        tokens = sum(c.tokens for c in timed)
        padded = sum(c.padded_tokens for c in timed)
        return {
            "steps": float(steps - warmup_steps),
            "seconds": seconds,
            "samples": float(samples),
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "trained_tokens_per_s": sum(c.trained_tokens for c in timed) / seconds,
            "data_wait_fraction": sum(self.fetch_s[warmup_steps:steps]) / seconds,
            "padding_fraction": (padded - tokens) / padded,
        }

    def timed_row_lengths(self, warmup_steps: int) -> list[list[int]]:
        """Row lengths of each timed micro-batch (for the FLOPs count)."""
        return [list(c.row_lengths) for step in self.batches[warmup_steps:] for c in step]


def cuda_sync() -> Any:
    """``torch.cuda.synchronize`` when CUDA is in use, else None (nothing to wait for)."""
    return torch.cuda.synchronize if torch.cuda.is_available() else None
