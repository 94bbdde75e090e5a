"""Training through the frame cache sees the same float32 pixels: the reference run's losses, exactly,
both when the run fills the cache and when it only reads it (slow); the short version compares the
training datasets' items, built through `--frame_cache` and without it."""

from __future__ import annotations

import pytest
import torch

from conftest import losses
from vidlora.args import parse_train_args
from vidlora.data.frame_cache import CacheStats
from vidlora.training.recipe import load_model_and_data


def test_cached_dataset_items_equal_the_uncached_ones(original_argv, tmp_path):
    cache = tmp_path / "frames"
    sets = []
    for run, flags in enumerate([{}, {"frame_cache": str(cache)}, {"frame_cache": str(cache)}]):
        argv = original_argv(tmp_path / f"out{run}", evaluation_strategy="no", **flags)
        _, _, train_set, _ = load_model_and_data(*parse_train_args(argv))
        sets.append(train_set)
    plain, filling, reading = sets
    assert plain.frame_cache is None and len(plain) == 16
    media = 0
    for index in range(len(plain)):
        expected = plain[index]
        for dataset in (filling, reading):
            item = dataset[index]
            assert item.keys() == expected.keys()
            for key, value in expected.items():
                assert torch.equal(item[key], value) if key != "id" else item[key] == value
        media += sum(len(v) for k, v in expected.items() if k.startswith("pixel_values"))
    assert media > 0
    assert filling.frame_cache.stats.hits + filling.frame_cache.stats.misses == media
    assert filling.frame_cache.stats.misses == len(list(cache.glob("*/*.safetensors")))
    assert reading.frame_cache.stats == CacheStats(hits=media)


def _eval_losses(trainer) -> list[float]:
    return [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]


@pytest.mark.slow
def test_cached_runs_reproduce_the_uncached_losses_exactly(
    reference_run, original_argv, train_in_process, tmp_path
):
    reference, _ = reference_run
    cache = tmp_path / "frames"
    filling = train_in_process(original_argv(tmp_path / "fill", frame_cache=str(cache)))
    reading = train_in_process(original_argv(tmp_path / "read", frame_cache=str(cache)))

    assert losses(filling) == losses(reference) and losses(reading) == losses(reference)
    assert _eval_losses(reading) == _eval_losses(reference) and len(_eval_losses(reference)) == 1

    # Every media file the run read was decoded once by the first run and read back by the second.
    # The held-out evaluation set shares the training set's cache, so both count here.
    first = filling.train_dataset.frame_cache.stats
    second = reading.train_dataset.frame_cache.stats
    entries = sorted(cache.glob("*/*.safetensors"))
    assert first.misses == len(entries) > 0 and first.corrupt == 0
    assert first.bytes_written == sum(p.stat().st_size for p in entries)
    assert second == CacheStats(hits=first.hits + first.misses)
