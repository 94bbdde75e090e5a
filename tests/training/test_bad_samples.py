"""Media that fails to read during training (it passed the up-front checks, which only stat files):
by default the run stops naming the sample, file and reason and keeps its last good checkpoint; with
--skip_bad_samples it trains on exactly the other samples, counting the skip in the logs and in
trainer_state.json, until --max_bad_sample_fraction is exceeded; a decoder that hangs inside FFmpeg
or crashes costs its sample, not the run.

Every run is the original's flags on the session's synthetic data (a private copy, since files get
damaged) with 16 training samples (no eval hold-out), 5 optimizer steps of 2 x 2 samples, saves every
2 steps. The grouped sampler (seed 0) puts these videos at step 3: micro-batch 1 = train_00009 +
train_00002, micro-batch 2 = train_00014 + train_00012; the three that get damaged are read there
only (train_00002 comes again at step 4, the sampler's padding to 20 reads): asserted in
:func:`_steps`, not taken on trust. Of 20 reads, --max_bad_sample_fraction 0.05 allows 1 skip.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import TrainerCallback

from misbehaving_decoders import CRASH, STUCK, bounded, mark, read_video_or_misbehave
from vidlora.args import parse_train_args
from vidlora.data.collate import BAD_SAMPLE_KEY
from vidlora.data.dataset import ProblemKind, SampleError
from vidlora.data.sampler import ModalityLengthGroupedSampler
from vidlora.data.watchdog import DecodeWatchdog
from vidlora.training.callbacks import TooManyBadSamples, count_trained_tokens
from vidlora.training.recipe import build_trainer

STEPS = 5
PER_STEP = 4  # per-device batch 2 x accumulation 2
FRAUGHT_STEP = 3
STEP_3 = [["train_00009", "train_00002"], ["train_00014", "train_00012"]]
#: The samples these tests damage (train_00002 is read again at step 4: the sampler's padding).
DAMAGED = ("train_00009", "train_00014", "train_00012")
GUARD = "BadSampleGuard"


@pytest.fixture
def data(synth_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's synthetic data set."""
    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    return root


@pytest.fixture
def flags(original_argv, data: Path):
    """``flags(out, **overrides)``: the original's command on the private copy, as the module says."""

    def build(out: Path, **overrides: str | None) -> list[str]:
        defaults: dict[str, str | None] = {
            "data_path": str(data / "train.json"),
            "video_folder": str(data),
            "image_folder": str(data),
            "evaluation_strategy": "no",
            "gradient_checkpointing": "False",
            "save_steps": "2",
            "save_total_limit": None,
            "dataloader_num_workers": "2",
            "disable_tqdm": "True",
        }
        return original_argv(out, **{**defaults, **overrides})

    return build


def _build(argv: list[str]):
    trainer, _ = build_trainer(*parse_train_args(argv))
    return trainer


def _steps(trainer) -> list[list[str]]:
    """The sample ids of each optimizer step, from the run's own sampler class and settings."""
    dataset, args = trainer.train_dataset, trainer.args
    sampler = ModalityLengthGroupedSampler(
        dataset.modality_lengths,
        per_device_batch_size=args.per_device_train_batch_size,
        world_size=1,
        grad_accum=args.gradient_accumulation_steps,
        seed=args.seed,
    )
    ids = [dataset.samples[i].id for i in sampler]
    steps = [ids[k : k + PER_STEP] for k in range(0, len(ids), PER_STEP)]
    assert len(steps) == STEPS and steps[FRAUGHT_STEP - 1] == STEP_3[0] + STEP_3[1]
    assert all(Counter(ids)[sample_id] == 1 for sample_id in DAMAGED)  # read once, at step 3
    return steps


def _video(data: Path, sample_id: str) -> Path:
    return data / "videos" / f"{sample_id}.mp4"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 5])


def _record_index(data: Path, sample_id: str) -> int:
    records = json.loads((data / "train.json").read_text())
    return next(k for k, record in enumerate(records) if record["id"] == sample_id)


def _trained_tokens(trainer, sample_ids: list[str]) -> int:
    """Hand count: the loss terms of these samples' labels, tokenized on their own (no decoding)."""
    import torch

    dataset = trainer.train_dataset
    by_id = {s.id: s for s in dataset.samples}
    total = 0
    for sample_id in sample_ids:
        labels = dataset.processor.tokenize(by_id[sample_id], dataset.tokenizer).labels
        total += count_trained_tokens(torch.tensor(labels))
    return total


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


class TruncateOnTrainBegin(TrainerCallback):
    """Damage files after the dataset was built and checked, before the first read."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths

    def on_train_begin(self, args, state, control, **kwargs):
        for path in self.paths:
            _truncate(path)


@dataclass(frozen=True)
class RecordingCollator:
    """The run's collator, writing the ids of the items that went into each batch to ``log`` (one JSON
    list a line; DataLoader workers append to the same file)."""

    inner: object
    log: Path

    def __call__(self, items):
        batch = self.inner(items)  # type: ignore[operator]
        kept = [item["id"] for item in items if BAD_SAMPLE_KEY not in item]
        assert len(batch["input_ids"]) == max(1, len(kept))  # the rows are exactly those (or a stand-in)
        with open(self.log, "a") as handle:
            handle.write(json.dumps(kept) + "\n")
        return batch


def test_the_flags_default_and_validate(flags, tmp_path):
    from vidlora.args import ArgumentProblems

    _, data_args, _ = parse_train_args(flags(tmp_path / "out"))
    assert (data_args.skip_bad_samples, data_args.max_bad_sample_fraction, data_args.decode_watchdog) == (
        False,
        0.01,
        True,
    )
    with pytest.raises(ArgumentProblems) as info:
        parse_train_args(flags(tmp_path / "out", max_bad_sample_fraction="1.5", decode_timeout="0"))
    assert info.value.problems == [
        "--decode_timeout 0.0: must be positive.",
        "--max_bad_sample_fraction 1.5: must be in [0, 1].",
    ]


def test_a_video_truncated_after_the_check_stops_the_run_naming_it(data, flags, tmp_path, capsys):
    from vidlora.cli import main

    out = tmp_path / "out"
    bad = _video(data, "train_00009")
    _truncate(bad)  # the up-front check only stats files: it passes this one
    assert main(["train", *flags(out)]) == 2
    stderr = capsys.readouterr().err
    error = stderr[stderr.index("vidlora train: error:") :].strip().splitlines()
    index = _record_index(data, "train_00009")
    assert error[0] == (
        f"vidlora train: error: sample id 'train_00009' ({data / 'train.json'} #{index}) file {bad}: "
        f"[unreadable_media] not a readable video ([Errno 1094995529] Invalid data found when processing "
        f"input: '{bad}')"
    )
    assert error[1].strip().startswith(f"(step {FRAUGHT_STEP} stopped: no optimizer step or checkpoint")
    # The checkpoint before the failing step is there and complete, nothing after it.
    assert _checkpoints(out) == ["checkpoint-2"]
    checkpoint = out / "checkpoint-2"
    for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors",
                 "vidlora_config.json", "config.json", "tokenizer.json", "trainer_state.json",
                 "optimizer.pt", "scheduler.pt", "rng_state.pth"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [e["step"] for e in state["log_history"]] == [1, 2]
    assert state["stateful_callbacks"][GUARD]["attributes"]["skipped"] == []


def test_skipping_trains_on_exactly_the_other_samples_and_counts_the_skip(data, flags, tmp_path, caplog):
    out = tmp_path / "out"
    bad = _video(data, "train_00009")
    trainer = _build(flags(out, skip_bad_samples="True", max_bad_sample_fraction="0.05"))
    steps = _steps(trainer)
    log = tmp_path / "batches.jsonl"
    trainer.data_collator = RecordingCollator(trainer.data_collator, log)
    trainer.add_callback(TruncateOnTrainBegin(bad))
    with caplog.at_level("WARNING", logger="vidlora.training"):
        trainer.train()
    trainer.save_state()

    trained = Counter(i for line in log.read_text().splitlines() for i in json.loads(line))
    assert trained == Counter(i for step in steps for i in step) - Counter(["train_00009"])
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5]
    assert [e["skipped_samples"] for e in history] == [0, 0, 1, 1, 1]
    assert trainer.state.log_history[-1]["skipped_samples"] == 1  # the run's summary
    # Each step trained exactly its samples' tokens (hand count), step 3 without the skipped one.
    expected = [_trained_tokens(trainer, [i for i in step if i != "train_00009"]) for step in steps]
    assert [e["trained_tokens"] for e in history] == expected
    assert expected[2] < _trained_tokens(trainer, steps[2])

    record = {
        "id": "train_00009",
        "index": _record_index(data, "train_00009"),
        "source": str(data / "train.json"),
        "file": str(bad),
        "kind": "unreadable_media",
        "split": "train",
        "step": FRAUGHT_STEP,
    }
    for state_file in (out / "trainer_state.json", out / "checkpoint-4" / "trainer_state.json"):
        saved = json.loads(state_file.read_text())["stateful_callbacks"][GUARD]["attributes"]["skipped"]
        assert [{k: v for k, v in r.items() if k != "reason"} for r in saved] == [record], state_file
        assert saved[0]["reason"].startswith("not a readable video")
    skips = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(skips) == 1 and skips[0].startswith("step 3: skipped sample id 'train_00009' (")
    assert str(bad) in skips[0] and "[unreadable_media]" in skips[0]

    # The count survives a resume: from checkpoint-4 (step 5 left), the run still says 1.
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoint-4", again / "checkpoint-4")
    resumed = _build(flags(again, skip_bad_samples="True", max_bad_sample_fraction="0.05"))
    resumed.train(resume_from_checkpoint=str(again / "checkpoint-4"))
    assert [e.get("skipped_samples") for e in resumed.state.log_history if "loss" in e] == [0, 0, 1, 1, 1]
    assert resumed.state.log_history[-1]["skipped_samples"] == 1


def test_more_skips_than_the_fraction_allows_stop_the_run(data, flags, tmp_path):
    out = tmp_path / "out"
    bad = [_video(data, "train_00009"), _video(data, "train_00014")]
    argv = flags(out, skip_bad_samples="True", max_bad_sample_fraction="0.05", dataloader_num_workers="0")
    trainer = _build(argv)
    _steps(trainer)
    trainer.add_callback(TruncateOnTrainBegin(*bad))
    with pytest.raises(TooManyBadSamples) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith(
        "training stopped at step 3: 2 sample(s) failed to read and were skipped, more than "
        "--max_bad_sample_fraction 0.05 of the 20 samples this run reads allows (1)"
    )
    assert "id 'train_00009'" in message and "id 'train_00014'" in message and str(bad[1]) in message
    assert trainer.state.global_step == 3 and _checkpoints(out) == ["checkpoint-2"]


def test_a_step_whose_every_sample_fails_trains_nothing_and_the_run_goes_on(data, flags, tmp_path):
    out = tmp_path / "out"
    step_3 = STEP_3[0] + STEP_3[1]  # train_00002 is read again at step 4: 5 skips in all
    argv = flags(
        out,
        skip_bad_samples="True",
        max_bad_sample_fraction="0.25",
        save_strategy="no",
        dataloader_num_workers="0",
    )
    trainer = _build(argv)
    steps = _steps(trainer)
    trainer.add_callback(TruncateOnTrainBegin(*(_video(data, i) for i in step_3)))
    trainer.train()
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == STEPS and len(history) == STEPS
    # Two stand-in rows: zero trained tokens, a zero loss (0 / 1, not 0 / 0 = NaN), a zero gradient.
    assert (history[2]["trained_tokens"], history[2]["loss"], history[2]["grad_norm"]) == (0, 0.0, 0.0)
    assert history[3]["trained_tokens"] == _trained_tokens(
        trainer, [i for i in steps[3] if i != "train_00002"]
    )
    assert [e["skipped_samples"] for e in history] == [0, 0, 4, 5, 5]


def test_a_stuck_and_a_crashed_decoder_cost_their_samples_not_the_run(data, flags, tmp_path):
    out = tmp_path / "out"
    stuck, crashed = (
        _video(data, "train_00014"),
        _video(data, "train_00012"),
    )  # all of step 3's 2nd micro-batch
    argv = flags(
        out,
        skip_bad_samples="True",
        max_bad_sample_fraction="0.1",
        decode_timeout="2",
        save_strategy="no",
    )
    trainer = _build(argv)
    steps = _steps(trainer)
    trainer.train_dataset.video_reader = DecodeWatchdog(read_video_or_misbehave)
    mark(stuck, STUCK)
    mark(crashed, CRASH)
    with bounded(240, "training past a stuck and a crashed decoder"):
        trainer.train()
    assert trainer.state.global_step == STEPS
    guard = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == GUARD)
    skipped = sorted(guard.skipped, key=lambda r: r["id"])
    assert [(r["id"], r["kind"], r["step"], r["file"]) for r in skipped] == [
        ("train_00012", "decoder_crashed", 3, str(crashed)),
        ("train_00014", "decode_timeout", 3, str(stuck)),
    ]
    assert "killed by SIGSEGV" in skipped[0]["reason"] and "timeout_s=2.0" in skipped[1]["reason"]
    history = [e for e in trainer.state.log_history if "loss" in e]
    # Step 3's second micro-batch is a stand-in row: the step trains micro-batch 1 alone.
    assert history[2]["trained_tokens"] == _trained_tokens(trainer, STEP_3[0])
    assert [e["trained_tokens"] for e in history] == [
        _trained_tokens(trainer, [i for i in step if i not in ("train_00014", "train_00012")])
        for step in steps
    ]
    assert [e["skipped_samples"] for e in history] == [0, 0, 2, 2, 2]


def test_a_stuck_decoder_without_skipping_is_a_named_decode_timeout(data, flags, tmp_path):
    out = tmp_path / "out"
    stuck = _video(data, "train_00009")
    argv = flags(out, decode_timeout="1", save_strategy="no", dataloader_num_workers="0")
    trainer = _build(argv)
    _steps(trainer)
    trainer.train_dataset.video_reader = DecodeWatchdog(read_video_or_misbehave)
    mark(stuck, STUCK)
    with bounded(120, "stopping at a stuck decoder"), pytest.raises(SampleError) as info:
        trainer.train()
    problem = info.value.problem
    assert (problem.sample_id, problem.kind, problem.file) == (
        "train_00009",
        ProblemKind.DECODE_TIMEOUT,
        str(stuck),
    )
    assert f"step {FRAUGHT_STEP} stopped" in str(info.value) and "timeout_s=1.0" in str(info.value)
    assert trainer.state.global_step == FRAUGHT_STEP - 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_zero3_two_processes_skip_a_sample_in_step(data, flags, tmp_path):
    """Under `deepspeed --num_gpus 2` (ZeRO-3, CPU), per-device batch 1: the rank holding the bad sample
    runs a stand-in row while the other trains, the collectives stay in step, the skip is counted once."""
    from test_zero3_original_command import ZERO3, _launch_zero3

    out = tmp_path / "zero3"
    overrides = {
        "skip_bad_samples": "True",
        "max_bad_sample_fraction": "0.1",
        "per_device_train_batch_size": "1",
        "dataloader_num_workers": "1",
        "save_strategy": "no",
        "lora_dropout": "0",
    }
    # The reads the 2-rank run makes (its sampler, in this process): every one trains except the bad one.
    probe = _build(flags(tmp_path / "probe", **overrides))
    dataset = probe.train_dataset
    sampler = ModalityLengthGroupedSampler(
        dataset.modality_lengths, per_device_batch_size=1, world_size=2, grad_accum=2, seed=0
    )
    reads = [dataset.samples[i].id for i in sampler]
    bad_id = "train_00009"
    assert Counter(reads)[bad_id] == 1 and len(reads) == 20
    _truncate(_video(data, bad_id))
    _launch_zero3([*flags(out, **overrides), "--deepspeed", str(ZERO3)])

    state = json.loads((out / "trainer_state.json").read_text())
    skipped = state["stateful_callbacks"][GUARD]["attributes"]["skipped"]
    assert [(r["id"], r["kind"], r["split"]) for r in skipped] == [(bad_id, "unreadable_media", "train")]
    history = [e for e in state["log_history"] if "loss" in e]
    assert len(history) == STEPS and history[-1]["skipped_samples"] == 1
    # Summed over both ranks, the run trained every read's tokens but the skipped sample's.
    assert sum(e["trained_tokens"] for e in history) == _trained_tokens(
        probe, [i for i in reads if i != bad_id]
    )
