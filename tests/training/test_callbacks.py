"""Callbacks on a real (tiny) Trainer run: non-finite stop, token counts, loss curve; the bad-sample
guard's policy, budget, resume and cross-rank count."""

from __future__ import annotations

import logging
import math
import struct
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from vidlora.data.dataset import ProblemKind, SampleError, SampleProblem
from vidlora.training.callbacks import (
    BadSampleGuard,
    LossCurveWriter,
    NonFiniteEvent,
    NonFiniteStop,
    NonFiniteTrainingError,
    TokenCountLogger,
    TooManyBadSamples,
    count_trained_tokens,
    extend_logs,
    observe_micro_batch,
)
from vidlora.training.plots import loss_series, plot_loss_curve


class PoisonableRegressor(nn.Module):
    """y = W x; the loss is an MSE. At forward call ``poison_call`` (1-based) the loss is made
    non-finite, either through the gradients (``mode="grad"``: the input becomes NaN) or only in
    the reported value (``mode="value"``: a NaN constant is added, the gradients stay finite —
    the case the Trainer's logging_nan_inf_filter hides)."""

    def __init__(self, poison_call: int | None = None, mode: str = "grad") -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.poison_call = poison_call
        self.mode = mode
        self.calls = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        poisoned = self.calls == self.poison_call
        if poisoned and self.mode == "grad":
            x = x * float("nan")
        loss = nn.functional.mse_loss(self.linear(x), labels)
        if poisoned and self.mode == "value":
            loss = loss + torch.tensor(float("nan"))
        return {"loss": loss}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = torch.randn(n, 2, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class ObservingTrainer(Trainer):
    """What VidloraTrainer does: hand each micro-batch to the callbacks that observe them."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        observe_micro_batch(self.callback_handler.callbacks, self.state, inputs, loss)
        return loss

    def log(self, logs, start_time=None):
        extend_logs(self.callback_handler.callbacks, self.args, self.state, logs)
        super().log(logs, start_time)


def make_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=6,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def checkpoints(tmp_path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("trainer_cls", "mode"),
    [
        (Trainer, "grad"),  # plain Trainer: caught from the gradients before the optimizer step
        (ObservingTrainer, "grad"),  # caught from the raw loss
        (ObservingTrainer, "value"),  # finite gradients, NaN loss hidden by logging_nan_inf_filter
    ],
)
def test_nonfinite_stop_halts_at_the_poisoned_step_without_saving_it(tmp_path, trainer_cls, mode):
    # batch 2 and no accumulation: forward call k is optimizer step k; poison step 3
    stop = NonFiniteStop()
    args = make_args(tmp_path)
    assert args.logging_nan_inf_filter  # the default that hides NaN losses from the logs
    trainer = trainer_cls(
        model=PoisonableRegressor(poison_call=3, mode=mode),
        args=args,
        train_dataset=Pairs(),
        callbacks=[stop],
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert checkpoints(tmp_path) == [1, 2]
    assert stop.event is not None and stop.event.step == 3 and math.isnan(stop.event.value)
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 3: .* checkpoint-2, is from before"):
        stop.raise_if_failed()


def test_nonfinite_stop_is_silent_on_a_finite_run(tmp_path):
    stop = NonFiniteStop()
    trainer = Trainer(
        model=PoisonableRegressor(),
        args=make_args(tmp_path, max_steps=3, save_steps=2),
        train_dataset=Pairs(),
        callbacks=[stop],
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert checkpoints(tmp_path) == [2, 3]
    assert not stop.failed and stop.failure_message() is None
    stop.raise_if_failed()


def test_nonfinite_stop_names_step_one_when_nothing_was_saved(tmp_path):
    stop = NonFiniteStop()
    trainer = Trainer(
        model=PoisonableRegressor(poison_call=1),
        args=make_args(tmp_path),
        train_dataset=Pairs(),
        callbacks=[stop],
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert checkpoints(tmp_path) == []
    assert "no checkpoint had been written before it" in stop.failure_message()


def test_nonfinite_stop_catches_a_logged_nan_gradient_norm():
    # Under DeepSpeed the gradients are not on the parameters; the global norm arrives in the logs.
    stop = NonFiniteStop()
    control = TrainerControl(should_save=True)
    stop.on_log(None, TrainerState(global_step=7), control, logs={"loss": 1.25, "grad_norm": float("inf")})
    assert stop.event.step == 7 and stop.event.what == "the gradient norm" and stop.event.value == math.inf
    assert control.should_training_stop and not control.should_save


def test_count_trained_tokens_counts_shifted_targets():
    labels = torch.tensor(
        [
            [5, -100, 7, 8, -100],  # first label is never a target: 2 (7, 8)
            [-100, -100, -100, 3, 4],  # 2
            [-100, -100, -100, -100, -100],  # 0
        ]
    )
    assert count_trained_tokens(labels) == 4
    assert count_trained_tokens(labels[2:]) == 0
    assert count_trained_tokens(torch.empty(2, 0, dtype=torch.long)) == 0


def test_token_count_logger_sums_micro_batches_and_warns_on_empty_ones(caplog):
    counter = TokenCountLogger()
    state = TrainerState(global_step=4)
    full = {"labels": torch.tensor([[-100, 1, 2, -100], [-100, -100, 9, 9]])}  # 2 + 2
    empty = {"labels": torch.full((2, 4), -100)}
    with caplog.at_level(logging.WARNING, logger="vidlora.training"):
        observe_micro_batch([counter], state, full, torch.tensor(0.5))
        observe_micro_batch([counter], state, empty, torch.tensor(0.0))
        counter.on_step_end(None, TrainerState(global_step=5), TrainerControl())
    assert counter.step_tokens == {5: 4}
    assert counter.empty_micro_batches == [(5, 1)]
    assert "step 5, micro-batch 1: no trained tokens" in caplog.text

    with caplog.at_level(logging.WARNING, logger="vidlora.training"):
        observe_micro_batch([counter], TrainerState(global_step=5), empty, torch.tensor(0.0))
        counter.on_step_end(None, TrainerState(global_step=6), TrainerControl())
    assert counter.step_tokens == {5: 4, 6: 0}
    assert "step 6: no trained tokens in the whole optimizer step" in caplog.text


def test_token_count_logger_adds_trained_tokens_to_the_log(tmp_path):
    class TokenModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, input_ids, labels):
            return {"loss": self.w[0] * (labels != -100).float().sum() / 10}

    class Rows(torch.utils.data.Dataset):
        # row i has i trained targets after the shift (first label always -100)
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            labels = torch.full((5,), -100)
            labels[1 : 1 + i] = 7
            return {"input_ids": torch.zeros(5, dtype=torch.long), "labels": labels}

    counter = TokenCountLogger()
    args = make_args(
        tmp_path,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=2,
        save_strategy="no",
    )
    trainer = ObservingTrainer(model=TokenModel(), args=args, train_dataset=Rows(), callbacks=[counter])
    trainer.train()
    assert sorted(counter.step_tokens.values()) == [1, 5]  # rows {0,1} and {2,3}, in some order
    assert sum(counter.step_tokens.values()) == 0 + 1 + 2 + 3
    logged = [h["trained_tokens"] for h in trainer.state.log_history if "trained_tokens" in h]
    assert sorted(logged) == [1, 5]
    totals = [h["trained_tokens_total"] for h in trainer.state.log_history if "trained_tokens" in h]
    assert totals == [logged[0], 6] and counter.total == 6


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_loss_curve_writer_draws_train_and_eval_loss(tmp_path):
    writer = LossCurveWriter()
    args = make_args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = Trainer(
        model=PoisonableRegressor(),
        args=args,
        train_dataset=Pairs(),
        eval_dataset=Pairs(4),
        callbacks=[writer],
    )
    trainer.train()
    png = tmp_path / "run" / "loss.png"
    assert writer.written == png
    assert _png_size(png) == (700, 400)  # figsize (7, 4) at 100 dpi
    assert png.stat().st_size > 5_000
    steps, values = loss_series(trainer.state.log_history, "eval_loss")
    assert steps == [2, 4] and all(math.isfinite(v) for v in values)


def test_plot_loss_curve_keeps_nan_points_and_skips_empty_histories(tmp_path):
    history = [
        {"loss": 2.0, "step": 1},
        {"loss": float("nan"), "step": 2},
        {"eval_loss": 1.5, "step": 2},
        {"train_runtime": 3.0, "step": 2},
    ]
    steps, values = loss_series(history, "loss")
    assert steps == [1, 2] and values[0] == 2.0 and math.isnan(values[1])
    assert plot_loss_curve(history, tmp_path / "a" / "loss.png") == tmp_path / "a" / "loss.png"
    assert _png_size(tmp_path / "a" / "loss.png") == (700, 400)
    assert plot_loss_curve([{"learning_rate": 0.1, "step": 1}], tmp_path / "b.png") is None
    assert not (tmp_path / "b.png").exists()


def test_micro_batches_are_observed_without_host_reads_and_read_once_per_optimizer_step():
    from host_reads import HostReads

    stop, counter = NonFiniteStop(), TokenCountLogger()
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    state = TrainerState(global_step=2)
    labels = {"labels": torch.tensor([[-100, 1, 2, -100], [-100, -100, 9, 9]])}  # 2 + 2 trained
    losses = [torch.tensor(0.5), torch.tensor(float("inf")), torch.tensor(float("nan")), torch.tensor(0.25)]
    with HostReads() as reads:
        for loss in losses:  # four micro-batches of one optimizer step
            observe_micro_batch([stop, counter], state, labels, loss)
    assert reads.names == []
    with HostReads() as reads:
        stop.on_pre_optimizer_step(args, state, TrainerControl(), model=model)
    assert reads.names == ["tolist"]  # loss flag, first bad value and gradient norm in one read
    # The first non-finite micro-batch loss of the step is the one reported.
    assert stop.event == NonFiniteEvent(3, "the training loss", math.inf)
    with HostReads() as reads:
        counter.on_step_end(args, TrainerState(global_step=3), TrainerControl())
    assert reads.names == ["tolist"]
    assert counter.step_tokens == {3: 16}


# -- samples that fail to read ------------------------------------------------------------------------


def _problem(sample_id: str) -> SampleProblem:
    return SampleProblem(
        ProblemKind.UNREADABLE_MEDIA, "truncated", sample_id, 7, "d.json", f"{sample_id}.mp4"
    )


def _guard_args(world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        world_size=world_size,
        device=torch.device("cpu"),
    )


def test_bad_sample_guard_stops_by_default_and_counts_against_the_whole_run_when_skipping():
    state, control = TrainerState(global_step=2, max_steps=5, train_batch_size=2), TrainerControl()
    with pytest.raises(SampleError) as info:
        BadSampleGuard(skip=False, max_fraction=1.0).observe_bad_samples(
            state, [_problem("a"), _problem("b")], training=True
        )
    assert info.value.problem == _problem("a")
    assert "step 3 stopped" in str(info.value) and "1 more sample(s) of the batch failed too: ['b']" in str(
        info.value
    )

    guard = BadSampleGuard(skip=True, max_fraction=0.1)
    guard.on_train_begin(_guard_args(), state, control)
    assert guard.allowed == 2  # floor(0.1 x 5 steps x 2 x 2 reads)
    guard.observe_bad_samples(state, [_problem("a"), _problem("b")], training=True)
    guard.observe_bad_samples(state, [_problem("e")], training=False)  # evaluation: listed, not budgeted
    guard.on_step_end(_guard_args(), state, control)
    assert [(r["id"], r["split"], r["step"]) for r in guard.skipped] == [
        ("a", "train", 3),
        ("b", "train", 3),
        ("e", "eval", 2),
    ]
    assert guard.train_skips == 2
    assert state.stateful_callbacks["BadSampleGuard"] == guard.state()  # what trainer_state.json keeps
    logs = {"loss": 1.0}
    guard.extend_logs(_guard_args(), state, logs)
    assert logs["skipped_samples"] == 2
    guard.observe_bad_samples(state, [_problem("c")], training=True)
    with pytest.raises(
        TooManyBadSamples, match=r"3 sample\(s\) failed .* of the 20 samples this run reads allows \(2\)"
    ):
        guard.on_step_end(_guard_args(), state, control)

    # A resumed run's state carries the list on: the count goes on from it.
    resumed_state = TrainerState(
        max_steps=5, train_batch_size=2, stateful_callbacks=dict(state.stateful_callbacks)
    )
    resumed = BadSampleGuard(skip=True, max_fraction=0.1)
    resumed.on_train_begin(_guard_args(), resumed_state, control)
    assert resumed.skipped == guard.skipped and resumed.train_skips == 3


def _guard_on_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        guard = BadSampleGuard(skip=True, max_fraction=0.1)
        state, control = TrainerState(max_steps=5, train_batch_size=2), TrainerControl()
        state.is_world_process_zero = rank == 0
        guard.on_train_begin(_guard_args(2), state, control)  # 5 x 2 x 2 x 2 = 40 reads: 4 allowed
        guard.observe_bad_samples(
            state, [_problem("a")] if rank == 0 else [_problem("b"), _problem("c")], training=True
        )
        guard.on_step_end(_guard_args(2), state, control)
        first = [r["id"] for r in guard.skipped]
        state.global_step = 1
        guard.on_step_end(_guard_args(2), state, control)  # nothing new on either rank: no gather
        if rank == 1:
            guard.observe_bad_samples(state, [_problem("d"), _problem("e")], training=True)
        try:
            state.global_step = 2
            guard.on_step_end(_guard_args(2), state, control)
            stopped = None
        except TooManyBadSamples as err:
            stopped = str(err).splitlines()[0]
        results.put((rank, guard.allowed, first, stopped))
    finally:
        dist.destroy_process_group()


def test_bad_sample_guard_sums_and_gathers_across_ranks():
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_guard_on_rank, args=(rank, port, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    got = sorted(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=30)
        assert process.exitcode == 0
    stop = (
        "training stopped at step 2: 5 sample(s) failed to read and were skipped, more than "
        "--max_bad_sample_fraction 0.1 of the 40 samples this run reads allows (4); that many points to "
        "something beyond a few broken files (a truncated copy, a codec the decoder lacks, a failing disk). "
        "No checkpoint was written at this step."
    )
    # Both ranks hold every rank's skips, in rank order, and stop at the same step.
    assert got == [(0, 4, ["a", "b", "c"], stop), (1, 4, ["a", "b", "c"], stop)]
