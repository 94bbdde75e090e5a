"""The Trainer subclass, kept thin: the modality sampler, optimizer groups, training-time forward
switches, self-contained saves (the format is :mod:`vidlora.checkpoint`'s) and atomic checkpoints
(written aside, renamed into place once every rank's files are on disk; :mod:`.run_dir`).

Everything else — precision, gradient checkpointing, schedules, logging, evaluation and save
strategies, DeepSpeed and resume — is the Trainer's own machinery.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vidlora.quiet import quiet_imports

with quiet_imports():  # transformers' Trainer imports PEFT, which imports bitsandbytes
    from transformers import Trainer
    from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
    from transformers.trainer_callback import ExportableState

from vidlora.checkpoint import (
    ADAPTER_WEIGHTS,
    NON_LORA_FILE,
    RunRecord,
    load_trainables,
    write_record,
    write_trainables,
)
from vidlora.data.collate import BAD_SAMPLES_KEY, SAMPLE_IDS
from vidlora.data.dataset import SampleError
from vidlora.data.sampler import ModalityLengthGroupedSampler
from vidlora.errors import NotFoundError
from vidlora.model.lora import LORA_MARKER
from vidlora.model.safetensors_check import check_safetensors
from vidlora.training.callbacks import (
    extend_logs,
    observe_bad_samples,
    observe_data_wait,
    observe_micro_batch,
)
from vidlora.training.run_dir import CHECKPOINT_PREFIX, partial_dir, rotate_checkpoints, seal_checkpoint

PROJECTOR_NAME = "mm_projector"

logger = logging.getLogger("vidlora.training")


class VidloraTrainer(Trainer):
    """Trainer with what Video-LLaVA fine-tuning needs beyond the stock one.

    ``record`` (the base model, the processor, the arguments) is written into every checkpoint
    next to the adapter, the non-LoRA trainables and the tokenizer, so a ``checkpoint-N``
    directory can be used without the training run.
    """

    def __init__(self, *args: Any, record: RunRecord, **kwargs: Any) -> None:
        with quiet_imports():  # it unwraps the model with accelerate, which imports DeepSpeed when installed
            super().__init__(*args, **kwargs)
        self.record = record

    # -- sampling ---------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths,
            per_device_batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            grad_accum=self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )

    # -- the forward ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Every training and evaluation forward runs both towers and the projector (on a dummy input
        adding exactly zero for a modality the batch lacks), as the original does for text-only
        samples: the projector gets a (zero) gradient in text-only steps on one process exactly as
        under DeepSpeed, and the ranks of a multi-process job run the same modules every step
        (ZeRO-3 gathers parameters collectively). No KV cache is built while training.

        The batch's unreadable samples (``BAD_SAMPLES_KEY``, never a model input) go to the callbacks
        first, which stop the run or skip them; with no callback to decide, the run stops. The
        sample ids are not a model input either: they stay in ``training_step``'s batch for the callbacks."""
        bad = inputs.get(BAD_SAMPLES_KEY)
        callbacks = self.callback_handler.callbacks
        if bad and not observe_bad_samples(callbacks, self.state, bad, training=model.training):
            raise SampleError(bad[0])
        inputs = {k: v for k, v in inputs.items() if k not in (BAD_SAMPLES_KEY, SAMPLE_IDS)}
        inputs = {**inputs, "run_all_towers": True, "use_cache": False}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # -- per micro-batch observation --------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step, then hand the raw loss, labels and sample ids to the callbacks that watch them
        (non-finite losses hidden by `logging_nan_inf_filter`, naming the batch; trained-token counts).

        An optimizer step left without a trained token (every sample of it skipped) divides its zero
        loss sum by 1, not 0: its forwards and backwards run (collectives stay in step) and add zero."""
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        elif num_items_in_batch is not None:
            num_items_in_batch = max(num_items_in_batch, 1)
        loss = super().training_step(model, inputs, num_items_in_batch)
        observe_micro_batch(self.callback_handler.callbacks, self.state, inputs, loss)
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The stock fetch of one optimizer step's batches, timed for the callbacks that log the wait
        (it includes the Trainer's token count across ranks, a small collective)."""
        began = time.perf_counter()
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        observe_data_wait(self.callback_handler.callbacks, time.perf_counter() - began)
        return batches, num_items

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Our callbacks' values (trained tokens, data wait, skips) join the entry before the stock
        log records it and hands it to TensorBoard / W&B."""
        extend_logs(self.callback_handler.callbacks, self.args, self.state, logs)
        super().log(logs, start_time)

    # -- optimizer --------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Decay / no-decay x the rest / LoRA B matrices / projector: the projector may have its own
        learning rate (``--mm_projector_lr``), the B matrices LoRA+'s (``--loraplus_lr_ratio``).

        PEFT's ``create_loraplus_optimizer`` is not used: it puts the projector with the A matrices
        at ``--learning_rate``, losing ``--mm_projector_lr``.
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        projector_lr = getattr(self.args, "mm_projector_lr", None)
        ratio = getattr(self.args, "loraplus_lr_ratio", None)
        rest, lora_b, projector = 0, 1, 2
        groups: dict[tuple[bool, int], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            kind = rest
            if projector_lr is not None and PROJECTOR_NAME in name:
                kind = projector
            elif ratio is not None and f"{LORA_MARKER}B." in name:
                kind = lora_b
            groups.setdefault((name in decay, kind), []).append(param)
        param_groups = []
        # The rest first: the Trainer logs the first group's learning rate, which must be
        # --learning_rate, not --mm_projector_lr (as in the original's group order).
        for (decays, kind), params in sorted(groups.items(), key=lambda item: (item[0][1], not item[0][0])):
            group: dict[str, Any] = {
                "params": params,
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            if kind == projector:
                group["lr"] = projector_lr
            elif kind == lora_b:
                group["lr"] = self.args.learning_rate * ratio
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # -- saving -----------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 with only the projector training, gather the trainable parameters alone.

        The Trainer gathers only trainables for PEFT models; for projector pre-training it would
        gather the whole (frozen) model onto rank 0 at every save, only for `_save` to keep the
        projector.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        engine = getattr(self, "deepspeed", None)
        if engine is not None and engine.zero_optimization_stage() == 3 and trains_projector_only(model):
            state_dict = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)
            return
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint (model, optimizer, scheduler, RNG, state), made atomic.

        Every rank writes into ``.partial-checkpoint-N``; after a barrier the main process writes
        the completeness marker and renames it to ``checkpoint-N``; only then are old checkpoints
        rotated, counting complete ones and never the newest. A kill at any moment leaves the
        previous complete checkpoint untouched and at most one partial directory, which a rerun
        removes. Hyperparameter-search trials and hub pushes go through the stock method.
        """
        if trial is not None or self.args.push_to_hub:
            super()._save_checkpoint(model, trial)
            return
        self.store_flos()
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        final = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
        partial = partial_dir(run_dir, step)
        if self.args.should_save and partial.exists():
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.save_model(str(partial), _internal_call=True)
        if self.state.best_global_step:
            best = run_dir / f"{CHECKPOINT_PREFIX}-{self.state.best_global_step}"
            if best == final or best.exists():
                self.state.best_model_checkpoint = str(best)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(partial))
            self._save_scaler(str(partial))
            self._save_rng_state(str(partial))
        if self.args.should_save:
            stateful: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    name = type(callback).__name__
                    if isinstance(stateful.get(name), list):
                        stateful[name].append(callback.state())
                    else:
                        stateful[name] = callback.state()
            self.state.save_to_json(str(partial / TRAINER_STATE_NAME))
        # Every rank's shards (DeepSpeed's optimizer partitions, RNG states) are on disk.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            seal_checkpoint(partial, final, step, self.args.world_size)
            best_dir = self.state.best_model_checkpoint
            rotate_checkpoints(run_dir, self.args.save_total_limit, [Path(best_dir)] if best_dir else [])
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Adapter + non-LoRA trainables (safetensors) + configs + tokenizer, in every checkpoint.

        Under ZeRO-3 the Trainer hands us a state dict gathered from all ranks (trainable
        parameters only); otherwise we read the parameters directly.
        """
        output_dir = output_dir or self.args.output_dir
        assert output_dir is not None  # TrainingArguments.__post_init__ fills in a default output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if trains_projector_only(model):
            # Pre-training (--tune_mm_mlp_adapter) changes the projector alone: a full copy of the
            # frozen model in every checkpoint would only cost disk (the original keeps
            # mm_projector.bin alone). The projector goes to NON_LORA_FILE below.
            if self.args.should_save:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)
        else:
            super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        write_trainables(model, Path(output_dir), state_dict)
        write_record(Path(output_dir), self.record)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer restores the adapter; the projector comes from our own file."""
        target = model or self.model
        assert target is not None  # the Trainer resumes into the model it trains
        projector_file = Path(resume_from_checkpoint) / NON_LORA_FILE
        if trains_projector_only(self.accelerator.unwrap_model(target, keep_torch_compile=False)):
            if not projector_file.is_file():
                raise NotFoundError(f"cannot resume projector pre-training: {projector_file} is missing")
        else:
            adapter = Path(resume_from_checkpoint) / ADAPTER_WEIGHTS
            if adapter.is_file():
                check_safetensors(adapter)  # the Trainer (PEFT) reads it next, unchecked
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainables(target, projector_file)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resume the optimizer's moments and the schedule's position, under this run's settings.

        The stock load also restores the checkpoint's param-group settings (learning rate, weight
        decay, betas) and the scheduler's base rates, so a rerun with a lower ``--learning_rate``
        after a divergence would silently keep the old one. What the flags decide is put back
        after the load, and every change is logged.
        """
        groups = [] if self.optimizer is None else self.optimizer.param_groups
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        fresh_base_lrs = list(getattr(self.lr_scheduler, "base_lrs", None) or [])
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.optimizer is None:
            return
        changes = reapply_run_settings(self.optimizer, self.lr_scheduler, fresh, fresh_base_lrs)
        if changes and self.args.should_log:
            logger.warning(
                "resuming from %s with this run's settings, not the checkpoint's: %s",
                checkpoint,
                "; ".join(changes),
            )


def reapply_run_settings(
    optimizer: Any, scheduler: Any, fresh: list[dict[str, Any]], fresh_base_lrs: list[float]
) -> list[str]:
    """Put this run's param-group settings (``fresh``: the groups as built, before a resume load)
    and base learning rates back into a loaded optimizer and LambdaLR-style scheduler; returns
    one line per changed setting ("group 0: learning rate 0.0002 -> 0.0001").

    The current learning rate becomes the new base rate times the schedule's factor at the
    resumed step (every Trainer schedule is a LambdaLR: ``lr = base * lambda(step)``).
    """
    changes: list[str] = []
    groups = optimizer.param_groups
    if len(groups) != len(fresh):
        return [f"the checkpoint's optimizer has {len(groups)} parameter groups, this run {len(fresh)}"]
    for index, (group, want) in enumerate(zip(groups, fresh, strict=True)):
        for key, value in want.items():
            if key in ("lr", "initial_lr") or _same_setting(group.get(key), value):
                continue
            changes.append(f"group {index}: {key} {group.get(key)} -> {value}")
            group[key] = value
    lambdas = getattr(scheduler, "lr_lambdas", None)
    loaded_base_lrs = list(getattr(scheduler, "base_lrs", None) or [])
    if lambdas is None or len(loaded_base_lrs) != len(fresh_base_lrs) or len(lambdas) != len(groups):
        return changes
    pairs = enumerate(zip(loaded_base_lrs, fresh_base_lrs, strict=True))
    changed = [(index, old, new) for index, (old, new) in pairs if old != new]
    if not changed:
        return changes  # the resumed rates are already this run's, to the bit
    changes += [f"group {index}: learning rate {old} -> {new}" for index, old, new in changed]
    scheduler.base_lrs = fresh_base_lrs
    # LambdaLR.get_lr() warns outside step(); its formula, at the resumed step:
    current = [base * fn(scheduler.last_epoch) for base, fn in zip(fresh_base_lrs, lambdas, strict=True)]
    for group, base, lr in zip(groups, fresh_base_lrs, current, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = current
    return changes


def _same_setting(a: Any, b: Any) -> bool:
    # A tuple (betas) comes back from a checkpoint as a list or a tuple.
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def trains_projector_only(model: torch.nn.Module) -> bool:
    """True when no adapter is attached and every trainable parameter is the projector's."""
    if hasattr(model, "peft_config"):
        return False
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return bool(trainable) and all(name.startswith(f"{PROJECTOR_NAME}.") for name in trainable)
