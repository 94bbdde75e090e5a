"""What a run logs where users look: TensorBoard event files with the loss, the trained-token counts
(per logging window and cumulative) and the data wait, the same values as trainer_state.json; and the
one-line summary `vidlora train` ends with.

Fixtures (`original_argv`) come from conftest.py.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate

import pytest

from vidlora.cli import main as vidlora

pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'vidlora[tensorboard]'")


def _scalars(logging_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(logging_dir.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_gets_loss_tokens_and_data_wait_and_the_run_ends_with_one_line(
    original_argv, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = original_argv(
        out, max_steps="3", save_steps="3", evaluation_strategy="no", report_to="tensorboard",
        disable_tqdm="True",
    )  # fmt: skip
    assert vidlora(["train", *argv]) == 0
    history = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    scalars = _scalars(out / "runs")  # the Trainer's default: <output_dir>/runs/<time>_<host>/
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([e["loss"] for e in history])
    tokens = [e["trained_tokens"] for e in history]
    assert min(tokens) > 0
    assert [e["trained_tokens_total"] for e in history] == list(accumulate(tokens))
    assert [v for _, v in scalars["train/trained_tokens"]] == tokens
    assert [v for _, v in scalars["train/trained_tokens_total"]] == list(accumulate(tokens))
    waits = [v for _, v in scalars["train/data_wait_s"]]
    assert len(waits) == 3 and all(w > 0 for w in waits)  # every step decodes its batch in the loop
    assert waits == pytest.approx([e["data_wait_s"] for e in history])

    lines = capsys.readouterr().out.strip().splitlines()
    pattern = (
        rf"vidlora train: 3 steps, [0-9.]+ samples/s, final loss {history[-1]['loss']:.3f}, "
        rf"checkpoints in {re.escape(str(out))}/ \(latest {re.escape(str(out / 'checkpoint-3'))}\)"
    )
    assert re.fullmatch(pattern, lines[-1]), lines[-1]

    assert vidlora(["train", *argv]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"vidlora train: finished already at step 3, checkpoints in {out}/ (latest {out / 'checkpoint-3'})"
    )
