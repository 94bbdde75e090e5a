"""`vidlora bench`: the report's fields and ratios, and the measuring pieces against hand counts."""

from __future__ import annotations

import json

import pytest
import torch

from vidlora.cli import main as cli_main
from vidlora.training.throughput import (
    BatchCounts,
    StepRecorder,
    media_flops,
    mfu,
    order_padding,
    padding_fraction,
    peak_flops,
    training_flops,
)

SCENARIO_FIELDS = (
    "samples_per_s",
    "tokens_per_s",
    "trained_tokens_per_s",
    "data_wait_fraction",
    "padding_fraction",
    "peak_rss_bytes",
    "useful_tflops_per_s",
    "seconds",
    "samples",
)


def test_padding_fraction_hand_count():
    # [5, 3, 2] pads to 3·5 = 15 with 5 pad tokens; [4, 4] has none; [1, 3] pads 2 of 6.
    assert padding_fraction([[5, 3, 2]]) == pytest.approx(5 / 15)
    assert padding_fraction([[4, 4], [1, 3]]) == pytest.approx(2 / 14)
    # The order decides the batches: lengths (signs ignored) 10, 2, 9, -3 in order 0,2 | 1,3.
    assert order_padding([10, 2, 9, -3], [0, 2, 1, 3], 2) == pytest.approx((1 + 1) / (20 + 6))
    assert order_padding([10, 2, 9, -3], [0, 1, 2, 3], 2) == pytest.approx((8 + 6) / (20 + 18))


def test_batch_counts_of_a_collated_batch():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 6, 7, -100], [-100, 6, -100, -100]]),
        "pixel_values_videos": torch.zeros(1, 8, 3, 4, 4),
    }
    counts = BatchCounts.of(batch)
    assert (counts.rows, counts.padded_tokens, counts.tokens, counts.trained_tokens) == (2, 8, 5, 3)
    assert (counts.row_lengths, counts.videos, counts.images) == ((3, 2), 1, 0)


def test_flops_and_mfu_hand_computation():
    # N = 1000, N_lora = 10, 2 layers, hidden 8, rows of 3 and 5 tokens (8 tokens).
    # Σ A·L = 4·2·8·(3² + 5²) = 2176; useful = (4·1000 + 6·10)·8 + 3·2176 = 39008;
    # recomputed = 2·1000·8 + 2176 = 18176 with checkpointing, 0 without.
    assert training_flops(1000, 10, 2, 8, [3, 5]) == (39008.0, 0.0)
    assert training_flops(1000, 10, 2, 8, [3, 5], checkpointing=True) == (39008.0, 18176.0)
    # Towers 2·100·7, projector 6·20·3.
    assert media_flops(100, 7, 20, 3) == 1400 + 360
    assert training_flops(1000, 10, 2, 8, [3, 5], media_flops=1760)[0] == 39008 + 1760
    assert mfu(39008.0, 2.0, 1e4) == pytest.approx(1.9504)
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None


def test_step_recorder_summary_excludes_warmup():
    def batch(lengths: list[int], trained: int) -> dict[str, torch.Tensor]:
        longest = max(lengths)
        mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
        labels = torch.full_like(mask, -100)
        labels.view(-1)[:trained] = 1
        return {"attention_mask": mask, "labels": labels}

    recorder = StepRecorder()
    for lengths in ([9, 9], [4, 2], [3, 3]):
        recorder.fetched(recorder.now(), [batch(lengths, 2)])
        recorder.step_end()
    # Hand-set clock: start 0, steps end at 1, 3, 6 s; fetches of 0.5, 0.5, 1.0 s.
    recorder.start, recorder.step_ends, recorder.fetch_s = 0.0, [1.0, 3.0, 6.0], [0.5, 0.5, 1.0]
    summary = recorder.summary(warmup_steps=1)
    # Timed: steps 2-3, from t=1 to t=6 (5 s); 4 samples, 12 tokens of 14 padded, 4 trained.
    assert summary["seconds"] == 5.0
    assert summary["samples_per_s"] == pytest.approx(4 / 5)
    assert summary["tokens_per_s"] == pytest.approx(12 / 5)
    assert summary["trained_tokens_per_s"] == pytest.approx(4 / 5)
    assert summary["data_wait_fraction"] == pytest.approx(1.5 / 5)
    assert summary["padding_fraction"] == pytest.approx(2 / 14)
    with pytest.raises(ValueError, match="none after"):
        recorder.summary(warmup_steps=3)


def _check_report(report: dict, mixes: list[str]) -> None:
    assert set(report["mixes"]) == set(mixes)
    for mix in mixes:
        scenarios = report["mixes"][mix]["scenarios"]
        expected = {"train", "loop", "train_cached"} | ({"train_random"} if mix == "mixed" else set())
        assert set(scenarios) == expected
        for name, result in scenarios.items():
            for key in SCENARIO_FIELDS:
                assert result[key] >= 0, (mix, name, key)
            for key in ("samples_per_s", "tokens_per_s", "trained_tokens_per_s", "seconds", "peak_rss_bytes"):
                assert result[key] > 0, (mix, name, key)
            assert 0 <= result["padding_fraction"] < 1 and 0 < result["data_wait_fraction"] < 1
        train, loop = scenarios["train"], scenarios["loop"]
        ratios = report["mixes"][mix]["ratios"]
        assert ratios["samples_per_s_train_over_loop"] == pytest.approx(
            train["samples_per_s"] / loop["samples_per_s"]
        )
        cached = scenarios["train_cached"]
        assert ratios["samples_per_s_cached_over_train"] == pytest.approx(
            cached["samples_per_s"] / train["samples_per_s"]
        )
        assert ratios["samples_per_s_cached_over_loop"] == pytest.approx(
            cached["samples_per_s"] / loop["samples_per_s"]
        )
        # The cache was filled ahead by `vidlora cache`: every media file of the mix has an entry.
        fill = report["mixes"][mix]["cache_fill"]
        assert fill["seconds"] > 0 and fill["report"]["ok"] and fill["report"]["stats"]["corrupt"] == 0
        assert sum(e["count"] for e in fill["report"]["entries"].values()) == sum(
            fill["report"]["files"].values()
        )
        # The longest sample's sizes, which `vidlora plan` takes to predict the run's peak.
        sequence = train["sequence"]
        assert 0 < sequence["max_labelled_tokens"] < sequence["max_text_tokens"] < sequence["max_tokens"]
        padding = train["epoch_padding"]
        assert set(padding) == {"random", "grouped", "grouped_one_step_window"}
        assert all(0 <= value < 1 for value in padding.values())
        if mix != "mixed":
            continue
        rand = scenarios["train_random"]
        assert ratios["samples_per_s_grouped_over_random"] == pytest.approx(
            train["samples_per_s"] / rand["samples_per_s"]
        )
        if train["padding_fraction"] > 0:
            assert ratios["padding_random_over_grouped"] == pytest.approx(
                rand["padding_fraction"] / train["padding_fraction"]
            )
    decode = report["decode"]
    assert decode["videos"] and all(row["same_frames"] for row in decode["videos"])
    assert decode["ratio"] == pytest.approx(decode["decode_all_s"] / decode["read_video_s"])
    for row in decode["videos"]:
        assert row["read_video_s"] > 0 and row["ratio"] == pytest.approx(
            row["decode_all_s"] / row["read_video_s"]
        )


def _bench(tmp_path, capsys, *extra: str) -> dict:
    argv = ["bench", "--json", "--steps", "2", "--warmup_steps", "1", "--per_device_train_batch_size", "2"]
    argv += ["--num_samples", "12", "--data_dir", str(tmp_path / "data"), *extra]
    assert cli_main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_reports_every_field_and_ratio(tmp_path, capsys):
    # 0 workers: forking DataLoader workers would cost more than these two steps.
    report = _bench(
        tmp_path, capsys, "--isolate", "False", "--modalities", "mixed", "--dataloader_num_workers", "0"
    )
    _check_report(report, ["mixed"])
    assert report["settings"]["steps"] == 2 and "N = LLM parameters" in report["flops_formula"]


@pytest.mark.slow
def test_bench_json_reports_every_mix_and_baseline(tmp_path, capsys):
    report = _bench(tmp_path, capsys, "--isolate", "False")
    _check_report(report, ["video", "image", "mixed"])


@pytest.mark.slow
def test_bench_isolated_scenarios(tmp_path, capsys):
    report = _bench(tmp_path, capsys, "--modalities", "image")
    _check_report(report, ["image"])


def test_bench_refuses_unknown_mixes_and_data(tmp_path, capsys):
    assert cli_main(["bench", "--modalities", "audio", "--data", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--modalities audio" in err and "--data nope" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the 7B bench would run")
def test_bench_measures_the_7b_preset_on_a_gpu_only(capsys):
    # Random 7B weights on the CPU would take 28 GB and minutes: refused with the reason here.
    assert cli_main(["bench", "--model_name_or_path", "videollava-7b"]) == 2
    assert "random weights on a GPU" in capsys.readouterr().err
