"""Trainer callbacks: stop on a non-finite loss or gradient, stop at or skip (and count) samples that
fail to read, count trained tokens, log the data wait, draw the loss curve.

How the Trainer (transformers 5) lets callbacks see a step, and what that means here:

* Callbacks never receive the per-micro-batch loss, and with ``logging_nan_inf_filter=True`` (the
  default) the Trainer drops a NaN/inf loss from its running sum, so the logged "loss" stays
  finite while the weights are already broken. The Trainer subclass therefore hands each
  micro-batch to :func:`observe_micro_batch` (from ``training_step``); callbacks that implement
  ``observe_micro_batch(state, inputs, loss)`` see the raw loss and the labels.
* ``on_pre_optimizer_step`` runs after backward (and clipping) and before ``optimizer.step()``:
  there the gradients that live on the parameters are checked (plain PyTorch / DDP; under
  DeepSpeed ZeRO the gradients live inside the engine, and its global gradient norm reaches us
  through the logs instead).
* ``on_log`` runs inside ``_maybe_log_save_evaluate`` *before* the save of the same step, so a
  callback can still cancel that save; "grad_norm" is logged unfiltered.
* A batch lists its samples that could not be read under ``BAD_SAMPLES_KEY``; the Trainer hands them
  to :func:`observe_bad_samples` before the forward (training and evaluation alike).
* The reporters (TensorBoard, W&B) are callbacks that run before ours, so what a callback of ours
  adds to a log entry goes in through :func:`extend_logs`, called from ``Trainer.log``; the time
  each step's batches took to fetch comes through :func:`observe_data_wait`.

Micro-batch observations stay on the device (a flag, a count); they are read on the host once
per optimizer step, in one transfer, so the callbacks add no device → host sync per micro-step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from vidlora.data.collate import SAMPLE_IDS
from vidlora.data.dataset import SampleError, SampleProblem
from vidlora.errors import VidloraError
from vidlora.training.plots import plot_loss_curve

logger = logging.getLogger("vidlora.training")

IGNORE_INDEX = -100
LOSS_PLOT_NAME = "loss.png"


def observe_micro_batch(
    callbacks: Iterable[TrainerCallback], state: TrainerState, inputs: Mapping[str, Any], loss: torch.Tensor
) -> None:
    """Hand one micro-batch (its inputs and the loss ``training_step`` returned) to the callbacks
    that want it. Call from ``Trainer.training_step`` on every rank, after ``super().training_step``."""
    for callback in callbacks:
        observe = getattr(callback, "observe_micro_batch", None)
        if observe is not None:
            observe(state, inputs, loss)


def observe_data_wait(callbacks: Iterable[TrainerCallback], seconds: float) -> None:
    """Hand the seconds one optimizer step's fetch waited for the DataLoader to the callbacks that want
    them. Call from ``Trainer.get_batch_samples``."""
    for callback in callbacks:
        observe = getattr(callback, "observe_data_wait", None)
        if observe is not None:
            observe(seconds)


def extend_logs(
    callbacks: Iterable[TrainerCallback], args: TrainingArguments, state: TrainerState, logs: dict[str, float]
) -> None:
    """Let the callbacks that add values to a log entry (``extend_logs(args, state, logs)``) add them;
    call from ``Trainer.log`` on every rank before the stock one, which records the entry in
    ``state.log_history`` and hands it to the reporters (TensorBoard, W&B): those are callbacks
    too, but run before ours, so an ``on_log`` of ours would reach the history and not them."""
    for callback in callbacks:
        extend = getattr(callback, "extend_logs", None)
        if extend is not None:
            extend(args, state, logs)


def observe_bad_samples(
    callbacks: Iterable[TrainerCallback],
    state: TrainerState,
    problems: list[SampleProblem],
    *,
    training: bool,
) -> bool:
    """Hand the problems of a batch's unreadable samples to the callbacks that handle them; call from
    the Trainer before the forward. Returns False when no callback does (the caller must then stop)."""
    handled = False
    for callback in callbacks:
        observe = getattr(callback, "observe_bad_samples", None)
        if observe is not None:
            observe(state, problems, training=training)
            handled = True
    return handled


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    """Reduce across ranks when a process group is up (every rank must call this at the same point)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return value


# -- non-finite loss / gradient ---------------------------------------------------------------------


class NonFiniteTrainingError(RuntimeError):
    """Training met a NaN/inf loss or gradient and was stopped before saving the broken state."""


@dataclass(frozen=True)
class NonFiniteEvent:
    """Where training broke: the optimizer step (as in ``checkpoint-<step>``), what, the value, and
    the batch that produced it.

    ``batch`` holds ``(rank, sample ids)`` for each process whose batch it was: the micro-batch whose
    loss was non-finite (``scope="micro-batch"``), or all micro-batches of the step when only the
    step's gradients or logged values tell (``scope="step"``). Without ids (batches that carry
    none) it is empty on one process and names the ranks alone on several.
    """

    step: int
    what: str
    value: float
    batch: tuple[tuple[int, tuple[str, ...]], ...] = ()
    scope: str = "micro-batch"
    world_size: int = 1

    @property
    def sample_ids(self) -> tuple[str, ...]:
        """The ids of every named sample, in rank then batch order."""
        return tuple(sample for _, ids in self.batch for sample in ids)

    def _batch_text(self) -> str:
        what = "the micro-batch" if self.scope == "micro-batch" else "the step's batch"
        parts = []
        for rank, ids in self.batch:
            where = f" on process {rank} of {self.world_size}" if self.world_size > 1 else ""
            if ids:
                parts.append(f"{what}{where} held samples {', '.join(repr(i) for i in ids)}")
            elif where:
                parts.append(where.strip())
        return f" ({'; '.join(parts)})" if parts else ""

    def message(self, last_checkpoint_step: int | None) -> str:
        latest = (
            f"the latest checkpoint, checkpoint-{last_checkpoint_step}, is from before the failure"
            if last_checkpoint_step is not None
            else "no checkpoint had been written before it"
        )
        return (
            f"training stopped at step {self.step}: {self.what} is {self.value}{self._batch_text()}. No "
            f"checkpoint was written at or after step {self.step}; {latest}. Try a lower --learning_rate, a "
            "longer warmup, bf16 instead of fp16, or check the data with `vidlora check`."
        )


class NonFiniteStop(TrainerCallback):
    """Stop training at the first NaN/inf loss or gradient norm, without checkpointing the broken state.

    Detection, earliest first: the raw micro-batch loss (via :func:`observe_micro_batch`, so the
    Trainer's ``logging_nan_inf_filter`` cannot hide it), the gradients on the parameters before
    the optimizer step, and the logged "loss"/"grad_norm". On a hit it sets
    ``should_training_stop`` and clears ``should_save``/``should_evaluate`` in every later event
    of the run, so the newest checkpoint stays the last good one. The Trainer returns normally;
    the caller then calls :meth:`raise_if_failed` (before saving the final model) to turn the
    event into a :class:`NonFiniteTrainingError` naming the step.

    With several processes the local verdict is OR-ed across ranks once per optimizer step (one
    scalar all-reduce), so every rank stops at the same step instead of one rank leaving the others
    waiting in a collective.

    The micro-batch losses of an optimizer step are folded into a device-side flag (and the first
    non-finite value and its micro-batch's index) and read once, before that step's optimizer
    update, together with the gradient norm: the first non-finite loss still names its optimizer
    step and its micro-batch, without a host sync per micro-batch. The sample ids of each
    micro-batch (the batch's :data:`~vidlora.data.collate.SAMPLE_IDS`) are kept on the host; on a
    hit, every rank gathers the failing ranks' ids (one object all-gather, on the failure path
    only), so the message names the same samples on every process.
    """

    def __init__(self, check_gradients: bool = True) -> None:
        self.check_gradients = check_gradients
        self.event: NonFiniteEvent | None = None
        self.last_checkpoint_step: int | None = None
        # Since the last optimizer step: any non-finite micro-batch loss, the first such value and
        # its micro-batch's index (device tensors), and each micro-batch's sample ids (host).
        self._loss_bad: torch.Tensor | None = None
        self._loss_value: torch.Tensor | None = None
        self._bad_index: torch.Tensor | None = None
        self._micro_ids: list[tuple[str, ...]] = []
        # The previous optimizer step's sample ids, for values that arrive in its logs.
        self._step_ids: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """True once a non-finite value was seen."""
        return self.event is not None

    def failure_message(self) -> str | None:
        """The message for the caller, or None when training went fine."""
        return None if self.event is None else self.event.message(self.last_checkpoint_step)

    def raise_if_failed(self) -> None:
        """Raise :class:`NonFiniteTrainingError` if training was stopped by a non-finite value."""
        message = self.failure_message()
        if message is not None:
            raise NonFiniteTrainingError(message)

    # -- detection ----------------------------------------------------------------------------
    def observe_micro_batch(self, state: TrainerState, inputs: Mapping[str, Any], loss: torch.Tensor) -> None:
        """Fold one micro-batch loss into the optimizer step's flag (on the loss's device, no sync)."""
        if self.event is not None:
            return
        index = len(self._micro_ids)
        self._micro_ids.append(tuple(str(i) for i in inputs.get(SAMPLE_IDS) or ()))
        value = (
            loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        )
        bad = ~torch.isfinite(value)
        if self._loss_bad is None or self._loss_value is None or self._bad_index is None:
            self._loss_bad, self._loss_value = bad, value
            self._bad_index = torch.zeros((), dtype=torch.long, device=value.device)
            return
        # Keep the first non-finite value of the step, and the index of its micro-batch.
        self._loss_value = torch.where(self._loss_bad, self._loss_value, value.to(self._loss_value.device))
        self._bad_index = torch.where(self._loss_bad, self._bad_index, index)
        self._loss_bad = self._loss_bad | bad.to(self._loss_bad.device)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step + 1
        device = args.device
        nan = torch.tensor(math.nan, device=device)
        loss_bad = torch.tensor(False, device=device) if self._loss_bad is None else self._loss_bad.to(device)
        loss_value = nan if self._loss_value is None else self._loss_value.to(device)
        bad_index = torch.zeros((), device=device) if self._bad_index is None else self._bad_index.to(device)
        micro_ids, self._micro_ids = self._micro_ids, []
        self._step_ids = tuple(sample for ids in micro_ids for sample in ids)
        self._loss_bad = self._loss_value = self._bad_index = None
        local_norm = None
        if self.check_gradients and kwargs.get("model") is not None:
            local_norm = _local_grad_norm(kwargs["model"])
        if local_norm is None:
            norm, grad_bad = nan, torch.tensor(False, device=device)
        else:
            norm = local_norm.to(device=device, dtype=torch.float32)
            grad_bad = ~torch.isfinite(norm)
        flag = _all_reduce((loss_bad | grad_bad).float().reshape(1), "max")
        # The one host read of this optimizer step.
        any_bad, local_loss_bad, loss_float, index_float, local_grad_bad, norm_float = torch.stack(
            [flag[0], loss_bad.float(), loss_value, bad_index.float(), grad_bad.float(), norm]
        ).tolist()
        if any_bad > 0 and self.event is None:
            local: _Report | None = None
            if local_loss_bad:
                ids = micro_ids[int(index_float)] if micro_ids else ()
                local = _Report("the training loss", loss_float, ids, "micro-batch")
            elif local_grad_bad:
                local = _Report("the gradient norm", norm_float, self._step_ids, "step")
            self.event = _event(step, _gather_reports(local))
            logger.error(self.event.message(self.last_checkpoint_step))
        self._enforce(control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Logs are reduced over ranks already, so every rank reaches the same verdict (and joins
        # the gather of every rank's ids of the step: the value says nothing about which batch).
        if self.event is None:
            for key, what in (("loss", "the logged training loss"), ("grad_norm", "the gradient norm")):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(float(value)):
                    report = _Report(what, float(value), self._step_ids, "step")
                    self.event = _event(state.global_step, _gather_reports(report))
                    logger.error(self.event.message(self.last_checkpoint_step))
                    break
        self._enforce(control)

    # -- keep the broken state off disk ---------------------------------------------------------
    def _enforce(self, control: TrainerControl) -> None:
        if self.event is not None:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._enforce(control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._enforce(control)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._enforce(control)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.last_checkpoint_step = state.global_step


@dataclass(frozen=True)
class _Report:
    """One process's view of a non-finite value: what, the value, its batch's sample ids."""

    what: str
    value: float
    sample_ids: tuple[str, ...]
    scope: str


def _gather_reports(local: _Report | None) -> list[tuple[int, _Report]]:
    """``(rank, report)`` of every process that has one; every rank must call this at the same point
    (it runs only once a run has failed, so its object all-gather costs nothing in normal steps)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[_Report | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return [(rank, report) for rank, report in enumerate(gathered) if report is not None]
    return [] if local is None else [(0, local)]


def _event(step: int, reports: list[tuple[int, _Report]]) -> NonFiniteEvent:
    """The event every rank records: the first failing rank's value, every failing rank's batch."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not reports:  # cannot happen when the verdicts were all-reduced; keep the step named anyway
        return NonFiniteEvent(step, "the loss or gradient on another process", math.nan, world_size=world)
    first = reports[0][1]
    # Without ids (batches that carry none) the rank alone still says where, with several.
    batch = tuple((rank, report.sample_ids) for rank, report in reports if report.sample_ids or world > 1)
    return NonFiniteEvent(step, first.what, first.value, batch, first.scope, world)


def _local_grad_norm(model: torch.nn.Module) -> torch.Tensor | None:
    """Total 2-norm of the gradients held on the parameters, on their device (None when no parameter
    holds one, e.g. under DeepSpeed ZeRO, whose gradients live inside the engine)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    # NaN/inf in any gradient makes the total norm NaN/inf.
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


# -- samples that fail to read during training --------------------------------------------------------


def _stateful(state: TrainerState) -> dict[str, Any]:
    """``state.stateful_callbacks``: typed as a list of callbacks, a dict of their states once the state exists."""
    if not isinstance(state.stateful_callbacks, dict):
        state.stateful_callbacks = cast("Any", {})
    return cast("dict[str, Any]", state.stateful_callbacks)


class TooManyBadSamples(VidloraError, ValueError):
    """More samples failed to read than ``--max_bad_sample_fraction`` allows; the message lists them."""


#: How many skipped samples an error message lists.
SHOWN_SKIPS = 20


class BadSampleGuard(TrainerCallback, ExportableState):
    """Stop at a sample that fails to read during training, or skip and count it (``--skip_bad_samples``).

    Failing to read means a decode error, a decode over ``--decode_timeout`` or a crashed decoder
    (the dataset's ``mark_failed_items``). Without ``skip`` the first such sample raises its
    :class:`SampleError` (id, index, record file, media file, reason) before the forward of its
    micro-batch, so no optimizer step and no checkpoint come after it: the latest checkpoint is the
    last good one. With ``skip`` each skip is logged once (id, file, reason, step) and recorded;
    every training log entry carries ``skipped_samples`` (the run's count so far, all processes), and
    ``trainer_state.json`` the list (``stateful_callbacks``), so a resumed run continues the count.
    Once more than ``max_fraction`` of the samples the run reads (``max_steps`` x the global batch)
    were skipped, :class:`TooManyBadSamples` is raised at the end of that optimizer step, before
    its save. The budget is over the whole run rather than the samples read so far: a ratio over
    the first few samples would stop a run whose first sample is bad. Skips in evaluation are
    logged and listed (``split`` "eval") but count towards no budget.

    Under several processes each rank sees its own skips; their number is summed once per optimizer
    step and evaluation (one scalar all-reduce) and, when not zero, the records are gathered, so every
    rank holds the same list and stops at the same step.
    """

    def __init__(self, skip: bool, max_fraction: float) -> None:
        self.skip = skip
        self.max_fraction = max_fraction
        #: Every skip of the run (all ranks): the problem's fields plus ``split`` and ``step``.
        self.skipped: list[dict[str, Any]] = []
        #: Skips allowed in training (known once training starts).
        self.allowed: int | None = None
        self._planned = 0
        self._pending: list[dict[str, Any]] = []  # this rank's skips not yet gathered

    @property
    def train_skips(self) -> int:
        """Samples skipped in training so far (every rank's, as gathered)."""
        return sum(1 for record in self.skipped if record["split"] == "train")

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps (ExportableState)."""
        return {
            "args": {"skip": self.skip, "max_fraction": self.max_fraction},
            "attributes": {"skipped": list(self.skipped)},
        }

    def observe_bad_samples(
        self, state: TrainerState, problems: list[SampleProblem], *, training: bool
    ) -> None:
        """Stop (no ``skip``) or record the problems of one batch's unreadable samples."""
        step = state.global_step + 1 if training else state.global_step
        where = f"step {step}" if training else f"evaluation at step {step}"
        if not self.skip:
            others = [p.sample_id for p in problems[1:]]
            more = f"; {len(others)} more sample(s) of the batch failed too: {others}" if others else ""
            raise SampleError(
                problems[0],
                f"{where} stopped: no optimizer step or checkpoint was made after this sample, so the latest "
                "checkpoint is the last good one. Fix or replace the file, pass --skip_bad_samples True to "
                "skip (and count) such samples, or run `vidlora check` with the same arguments to list "
                f"every unreadable sample{more}",
            )
        split = "train" if training else "eval"
        for problem in problems:
            logger.warning("%s: skipped sample %s (--skip_bad_samples)", where, problem.format())
            self._pending.append({**problem.to_dict(), "split": split, "step": step})

    # -- events -------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        saved = _stateful(state).get(type(self).__name__)
        if isinstance(saved, dict):  # a resumed run: the count goes on from the checkpoint's list
            self.skipped = list(saved.get("attributes", {}).get("skipped", self.skipped))
        batch = state.train_batch_size or args.per_device_train_batch_size
        self._planned = state.max_steps * batch * args.gradient_accumulation_steps * max(1, args.world_size)
        self.allowed = math.floor(self.max_fraction * self._planned)
        self._publish(state)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._gather(args, state) and self.allowed is not None and self.train_skips > self.allowed:
            raise TooManyBadSamples(self._too_many_message(state.global_step))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._gather(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._gather(args, state)

    def extend_logs(self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]) -> None:
        """Add ``skipped_samples`` to a training log entry (:func:`extend_logs`)."""
        if self.skip and ("loss" in logs or "train_loss" in logs):
            logs["skipped_samples"] = self.train_skips

    # -- internals ----------------------------------------------------------------------------
    def _gather(self, args: TrainingArguments, state: TrainerState) -> bool:
        """Move every rank's pending skips into ``skipped`` (collective); True when there were any."""
        world = _world_size()
        if world > 1:
            total = _all_reduce(torch.tensor([float(len(self._pending))], device=args.device), "sum")
            if int(total.item()) == 0:
                return False
            import torch.distributed as dist

            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, self._pending)
            new = [record for part in parts for record in part]
        elif self._pending:
            new = self._pending
        else:
            return False
        self._pending = []
        self.skipped.extend(new)
        self._publish(state)
        if state.is_world_process_zero:
            logger.warning(
                "%d sample(s) skipped in training so far; the run stops after more than %s (--max_bad_sample_"
                "fraction %s of the %d samples it reads)",
                self.train_skips,
                self.allowed,
                self.max_fraction,
                self._planned,
            )
        return True

    def _publish(self, state: TrainerState) -> None:
        # Checkpoints refresh stateful_callbacks themselves; the final save_state() does not.
        _stateful(state)[type(self).__name__] = self.state()

    def _too_many_message(self, step: int) -> str:
        train = [r for r in self.skipped if r["split"] == "train"]
        lines = [f"  - step {r['step']}: {SampleProblem.from_dict(r).format()}" for r in train[:SHOWN_SKIPS]]
        if len(train) > SHOWN_SKIPS:
            lines.append(f"  ... and {len(train) - SHOWN_SKIPS} more")
        return (
            f"training stopped at step {step}: {len(train)} sample(s) failed to read and were skipped, more "
            f"than --max_bad_sample_fraction {self.max_fraction} of the {self._planned} samples this run reads "
            f"allows ({self.allowed}); that many points to something beyond a few broken files (a truncated "
            "copy, a codec the decoder lacks, a failing disk). No checkpoint was written at this step.\n"
            + "\n".join(lines)
            + "\nRun `vidlora check` with the same arguments to list every unreadable sample, fix them, "
            "or raise --max_bad_sample_fraction."
        )


# -- trained-token counting ---------------------------------------------------------------------------


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Label positions a causal-LM loss trains on: ``labels[..., 1:] != -100``.

    The model predicts token t+1 from position t, so the first label of each row is never a
    target; counting from the second one gives exactly the number of loss terms (the Trainer's
    ``num_items_in_batch`` counts all positions instead and differs when a row's first label is
    not -100).
    """
    return int(_trained_token_count(labels).item())


def _trained_token_count(labels: torch.Tensor) -> torch.Tensor:
    """:func:`count_trained_tokens` as a 0-d tensor on the labels' device (no host sync)."""
    if labels.dim() < 1 or labels.shape[-1] == 0:
        return torch.zeros((), dtype=torch.long, device=labels.device)
    return (labels[..., 1:] != IGNORE_INDEX).sum()


class TokenCountLogger(TrainerCallback):
    """Count trained tokens per optimizer step, log them, and warn about batches that train nothing.

    Micro-batches arrive through :func:`observe_micro_batch`; their counts stay on the device until
    the optimizer step ends, then are read in one transfer. At each optimizer step the count is
    added to ``step_tokens``; a micro-batch with no trained token is reported with a warning naming
    the step (with per-token-mean losses such a batch gives 0/0 = NaN unless the model guards the
    division). Each training log entry (:func:`extend_logs`) gets "trained_tokens", the tokens
    trained since the previous log, and "trained_tokens_total", since the run began (a resumed run
    goes on from its checkpoint's log), both summed over ranks.
    """

    def __init__(self) -> None:
        self.step_tokens: dict[int, int] = {}
        self.empty_micro_batches: list[tuple[int, int]] = []
        self.total = 0
        self._counts: list[torch.Tensor] = []  # this optimizer step's micro-batch counts, on device
        self._since_log = 0

    def observe_micro_batch(self, state: TrainerState, inputs: Mapping[str, Any], loss: torch.Tensor) -> None:
        """Add one micro-batch's trained tokens to the optimizer step under way (no host sync)."""
        labels = inputs.get("labels")
        if labels is None:
            return
        self._counts.append(_trained_token_count(labels))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        logged = [
            entry["trained_tokens_total"] for entry in state.log_history if "trained_tokens_total" in entry
        ]
        self.total = int(logged[-1]) if logged else 0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._counts:
            return  # nothing observed: the Trainer does not call observe_micro_batch
        device = self._counts[0].device
        counts = [int(c) for c in torch.stack([c.to(device) for c in self._counts]).tolist()]
        self._counts = []
        step = state.global_step
        for index, count in enumerate(counts):
            if count == 0:
                self.empty_micro_batches.append((step, index))
                logger.warning(
                    "step %d, micro-batch %d: no trained tokens (every label is -100); it adds nothing to "
                    "training",
                    step,
                    index,
                )
        total = sum(counts)
        self.step_tokens[step] = total
        if total == 0:
            logger.warning("step %d: no trained tokens in the whole optimizer step on this process", step)
        self._since_log += total

    def extend_logs(self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]) -> None:
        """Add the window's and the run's trained tokens to a training log entry (:func:`extend_logs`)."""
        if "loss" not in logs or not self.step_tokens:
            return  # eval/final summaries: no training window to report
        window = _all_reduce(torch.tensor([float(self._since_log)], device=args.device), "sum")
        self._since_log = 0
        tokens = int(window.item())
        self.total += tokens
        logs["trained_tokens"], logs["trained_tokens_total"] = tokens, self.total


class DataWaitLogger(TrainerCallback):
    """Log "data_wait_s": the seconds the training loop waited for the DataLoader since the previous
    log (the slowest rank's, which every rank then waits for), so a run starved by decoding shows it
    in its own logs; `vidlora bench` measures the same wait against the step time."""

    def __init__(self) -> None:
        self._since_log = 0.0

    def observe_data_wait(self, seconds: float) -> None:
        """Add one optimizer step's fetch time (:func:`observe_data_wait`)."""
        self._since_log += seconds

    def extend_logs(self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]) -> None:
        """Add the window's data wait to a training log entry (:func:`extend_logs`)."""
        if "loss" not in logs:
            return
        wait = _all_reduce(torch.tensor([self._since_log], dtype=torch.float64, device=args.device), "max")
        self._since_log = 0.0
        logs["data_wait_s"] = float(wait.item())


# -- loss curve -----------------------------------------------------------------------------------


class LossCurveWriter(TrainerCallback):
    """Write ``loss.png`` (train and eval loss against the step) into the output directory at every
    checkpoint save and at the end of training, from ``state.log_history`` (main process only)."""

    def __init__(self, filename: str = LOSS_PLOT_NAME) -> None:
        self.filename = filename
        self.written: Path | None = None

    def _write(self, args: TrainingArguments, state: TrainerState) -> None:
        if not state.is_world_process_zero:
            return
        path = plot_loss_curve(state.log_history, Path(str(args.output_dir)) / self.filename)
        if path is not None:
            self.written = path

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(args, state)
