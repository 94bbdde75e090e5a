"""Golden losses of the original's command on the tiny model, and what must not change them.

The reference run (conftest.py) is the original's flags on the session's synthetic dataset (16 train
samples, seed 0; one held out for `--evaluation_strategy epoch`), tiny preset (weights from seed 0),
`--seed 42` (the Trainer's default), fp32 on the CPU, 5 optimizer steps of 2 x 2 samples.
"""

from __future__ import annotations

import math

import pytest

from vidlora.training.callbacks import count_trained_tokens

# The first four logged losses of the reference run. Obtained by running this file's reference run
# once (torch 2.13 CPU, transformers 5.24, peft 0.21) and copying `trainer.state.log_history`;
# re-pinned when the synthetic shapes grew (radius 0.10 -> 0.18 of the frame for one shape), and
# when the grouped sampler began sorting lengths across 50 steps (with one-step windows this run
# still gives the previous values, 7.8151, 7.8016, 6.7844, 7.1522, and tokens 10, 8, 8, 10, 8).
# Step 1 runs at learning rate 0 (the 0.03 warmup rounds up to one step), so GOLDEN[0] is the
# untrained model's loss on the first step's samples (above ln(vocab 885) = 6.79: the tiny LLM's
# initializer_range 0.1 makes its random logits confident).
GOLDEN_LOSSES = [7.5945024490356445, 7.855503559112549, 6.785717010498047, 7.522092819213867]
GOLDEN_TOL = 1e-4
# Trained tokens per optimizer step (answer word(s) + </s> of the 4 samples of each step).
GOLDEN_TRAINED_TOKENS = [12, 8, 8, 8, 8]
# Recomputing activations must give the same numbers up to float reassociation; on this CPU they are
# bitwise equal, the tolerance only leaves room for other BLAS builds.
CHECKPOINTING_TOL = 1e-5


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_first_four_losses_are_pinned(reference_run):
    trainer, _ = reference_run
    losses = _losses(trainer)
    assert len(losses) == 5
    assert losses[:4] == pytest.approx(GOLDEN_LOSSES, abs=GOLDEN_TOL)
    # The schedule behind them: 1 warmup step, then cosine from 2e-4 over the remaining 4 steps.
    rates = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    expected = [0.0] + [2e-4 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_gradient_checkpointing_does_not_change_the_losses(
    reference_run, original_argv, train_in_process, tmp_path
):
    trainer, _ = reference_run
    argv = original_argv(
        tmp_path / "out", save_steps="2", save_total_limit=None, gradient_checkpointing="False"
    )
    plain = train_in_process(argv)
    assert plain.args.gradient_checkpointing is False and trainer.args.gradient_checkpointing is True
    assert _losses(plain) == pytest.approx(_losses(trainer), abs=CHECKPOINTING_TOL)


def test_trained_tokens_are_logged_and_match_a_count_from_the_dataset(reference_run):
    trainer, _ = reference_run
    logged = [e["trained_tokens"] for e in trainer.state.log_history if "loss" in e]
    assert logged == GOLDEN_TRAINED_TOKENS
    # Independently: the epoch's sample order from the sampler, each sample's labels from the dataset.
    order = list(trainer._get_train_sampler())
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    assert len(order) == per_step * len(logged)
    counts = [count_trained_tokens(trainer.train_dataset[i]["labels"].unsqueeze(0)) for i in order]
    assert [sum(counts[s : s + per_step]) for s in range(0, len(order), per_step)] == logged
