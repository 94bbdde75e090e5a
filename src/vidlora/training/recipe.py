"""The training recipe: the original's LoRA fine-tuning, step by step, on today's stack.

1. load the model in any supported layout, with the run's overrides (feature layer, frames)
   validated by the loader, and build the run's :class:`~vidlora.data.processor.Processor` once;
2. build the datasets through the processor (every record validated and tokenized up front,
   before any heavier work; media decoded lazily);
3. declare what trains (towers frozen, projector fully trained, LoRA on the LLM; QLoRA quantizes
   the LLM first) and print the trainable-parameter report;
4. train with the Trainer; every checkpoint records the base, the processor and the arguments
   (:mod:`vidlora.checkpoint`), so it is usable on its own and resumable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from vidlora.args import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    base_model,
    format_config,
    load_options,
    media_folders,
    processor_options,
    wants_evaluation,
)
from vidlora.checkpoint import RunRecord
from vidlora.data.dataset import (
    PreparedSample,
    SampleProblem,
    SupervisedDataset,
    prepare_samples,
    read_samples,
    train_eval_split,
)
from vidlora.data.frame_cache import FrameCache
from vidlora.data.media import VideoReader, read_video
from vidlora.data.processor import Processor
from vidlora.data.records import Sample
from vidlora.errors import UsageError
from vidlora.jsonl import write_text_atomic
from vidlora.model.loading import LoadedModel
from vidlora.training.distributed import computed_on_rank_zero
from vidlora.training.run_dir import (
    CONFIG_FILE,
    ResumePlan,
    finished_step,
    mark_finished,
    plan_resume,
    run_identity,
    scan_checkpoints,
)

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from vidlora.model.lora import LoraBias
    from vidlora.model.modeling import VideoLlavaForCausalLM
    from vidlora.training.callbacks import NonFiniteStop
    from vidlora.training.trainer import VidloraTrainer


def load_dtype(train_args: TrainingArguments) -> torch.dtype:
    """Weights in the training precision, as the original casts the model before adding LoRA."""
    if train_args.bf16:
        return torch.bfloat16
    if train_args.fp16:
        return torch.float16
    return torch.float32


def load_model(model_args: ModelArguments, train_args: TrainingArguments) -> LoadedModel:
    """The base model and tokenizer, built with the run's overrides (the loader validates them)."""
    from vidlora.model.loading import load_pretrained

    loaded = load_pretrained(
        model_args.model_name_or_path, torch_dtype=load_dtype(train_args), **load_options(model_args)
    )
    if train_args.should_log:
        print(loaded.report.format(), file=sys.stderr)
    return loaded


def set_trainable_dtype(model: torch.nn.Module, dtype: torch.dtype, *, deepspeed: bool) -> None:
    """Precision of what trains.

    DeepSpeed keeps its own fp32 master copies and wants one dtype for all trainable parameters
    (PEFT makes adapters fp32 even on a bf16 model), so everything trainable takes the training
    dtype. Without DeepSpeed the optimizer updates the parameters themselves, so trainables stay
    in fp32 (the Trainer's autocast runs the bf16/fp16 compute) and small updates are not lost.
    """
    target = dtype if deepspeed else torch.float32
    for param in model.parameters():
        if param.requires_grad and param.dtype != target:
            param.data = param.data.to(target)


def apply_training_recipe(
    model: VideoLlavaForCausalLM, model_args: ModelArguments, train_args: TrainingArguments
):
    """Quantize (``--bits``), freeze and wrap with LoRA as the flags say; returns the model to train."""
    from vidlora.model.lora import apply_recipe, build_lora_config

    if train_args.bits in (4, 8):
        from vidlora.model.quantize import quantize_language_model

        model = quantize_language_model(
            model,
            device=train_args.device,
            bits=train_args.bits,
            compute_dtype=load_dtype(train_args),
            double_quant=train_args.double_quant,
            quant_type=train_args.quant_type,
            # TrainingArguments mirrors activation_checkpointing here (a bool once parsed).
            gradient_checkpointing=bool(train_args.gradient_checkpointing),
        )
    # Training never decodes: no KV cache (the LLM's own config decides its forward's default).
    model.config.text_config.use_cache = False
    train_llm = not (model_args.freeze_backbone or model_args.tune_mm_mlp_adapter)
    if not train_llm:
        model.language_model.requires_grad_(False)
    lora_config = None
    if train_args.lora_enable and not model_args.tune_mm_mlp_adapter:
        # One of LORA_BIASES: parse_train_args rejects anything else (training_problems).
        bias = cast("LoraBias", train_args.lora_bias)
        lora_config = build_lora_config(
            model,
            train_args.lora_r,
            train_args.lora_alpha,
            train_args.lora_dropout,
            bias,
            targets=train_args.lora_target,
            use_dora=train_args.use_dora,
            use_rslora=train_args.use_rslora,
        )
    base = model
    trained = apply_recipe(base, lora_config, train_llm=train_llm)
    if train_args.freeze_mm_mlp_adapter:
        if base.mm_projector is None:
            raise UsageError("--freeze_mm_mlp_adapter: the model has no projector (it has no tower)")
        base.mm_projector.requires_grad_(False)
    set_trainable_dtype(trained, load_dtype(train_args), deepspeed=bool(train_args.deepspeed))
    if train_args.gradient_checkpointing:
        # LoRA leaves the embeddings frozen; without inputs that require grad, re-entrant
        # checkpointing would cut the graph and the adapters would get no gradient.
        base.enable_input_require_grads()
    return trained


def trainable_report(model: torch.nn.Module) -> str:
    """One line per part: trainable / total parameters."""
    from vidlora.model.info import count_parameters, format_counts

    return format_counts(count_parameters(model, from_flags=True))


def build_datasets(
    data_args: DataArguments,
    train_args: TrainingArguments,
    processor: Processor,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[SupervisedDataset, SupervisedDataset | None]:
    """Training dataset and (optionally) evaluation dataset, all records validated up front.

    Videos are read through a :class:`~vidlora.data.watchdog.DecodeWatchdog` (``--decode_watchdog``);
    a sample that fails to read comes back as a marker for the Trainer's
    :class:`~vidlora.training.callbacks.BadSampleGuard` to stop at or skip, in the main process.
    """
    from vidlora.data.watchdog import DecodeWatchdog

    frame_cache = FrameCache.from_flag(data_args.frame_cache)
    video_reader: VideoReader = DecodeWatchdog() if data_args.decode_watchdog else read_video

    folders = media_folders(data_args)
    # Sets up the process group of a torchrun launch (DeepSpeed's is up already), so that rank 0
    # alone reads and tokenizes the records and the other ranks receive its result.
    train_args.world_size  # noqa: B018

    def read(paths: list[str]) -> SupervisedDataset:
        def prepare() -> tuple[list[Sample], list[SampleProblem], list[PreparedSample]]:
            samples, problems = read_samples(paths)
            return samples, problems, prepare_samples(samples, processor, tokenizer, folders)

        samples, problems, prepared = computed_on_rank_zero(prepare, what=f"reading {' '.join(paths)}")
        return SupervisedDataset(
            samples,
            processor=processor,
            tokenizer=tokenizer,
            folders=folders,
            decode_timeout=data_args.decode_timeout,
            skip_bad_samples=data_args.skip_bad_samples,
            prior_problems=problems,
            frame_cache=frame_cache,
            prepared=prepared,
            video_reader=video_reader,
            mark_failed_items=True,
        )

    assert data_args.data_path, "parse_train_args requires --data_path"
    train_set = read(data_args.data_path)
    eval_set = None
    if data_args.eval_data_path:
        eval_set = read(data_args.eval_data_path)
    elif wants_evaluation(train_args.eval_strategy):
        train_set, eval_set = train_eval_split(train_set, data_args.eval_holdout_ratio, train_args.seed)
        if train_args.should_log:
            print(
                f"vidlora: no --eval_data_path; holding out {len(eval_set)} of {len(train_set) + len(eval_set)} "
                f"training samples for evaluation (--eval_holdout_ratio {data_args.eval_holdout_ratio})",
                file=sys.stderr,
            )
    return train_set, eval_set


def load_model_and_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    loaded: LoadedModel | None = None,
):
    """The base model, the run's processor and its datasets: every sample is validated here,
    before quantization, LoRA or the first step. Returns ``(loaded, processor, train_set, eval_set)``.
    ``loaded`` is a model built elsewhere (`vidlora bench`'s random 7B on a GPU); None loads the flags'.
    """
    if loaded is None:
        loaded = load_model(model_args, train_args)
    # Only the shape-only videollava-7b preset comes without a tokenizer, and it never loads for training.
    assert loaded.tokenizer is not None
    processor = Processor.for_model(loaded.model.config, **processor_options(model_args, data_args))
    train_set, eval_set = build_datasets(data_args, train_args, processor, loaded.tokenizer)
    return loaded, processor, train_set, eval_set


def run_record(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    processor: Processor,
    arguments: dict[str, Any] | None = None,
) -> RunRecord:
    """What every checkpoint of this run records: the base to load, the processor, the arguments
    (``arguments``: :func:`run_arguments`' result when the caller has it already)."""
    if arguments is None:
        arguments = run_arguments(model_args, data_args, train_args)
    return RunRecord(base=base_model(model_args), processor=processor, training=arguments)


def run_arguments(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> dict[str, Any]:
    """The arguments a checkpoint records, with the run's identity (model, data by content, recipe)
    that a rerun is compared with."""
    given = asdict(model_args)
    model = {**given, **asdict(base_model(model_args))}  # local paths made absolute
    data, training = asdict(data_args), train_args.to_dict()
    return {
        "model_args": given,
        "data_args": data,
        "training_args": training,
        "identity": run_identity(model, data, training),
    }


def build_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    *,
    trainer_cls: type[VidloraTrainer] | None = None,
    extra_callbacks: Sequence[TrainerCallback] = (),
    loaded: LoadedModel | None = None,
    arguments: dict[str, Any] | None = None,
) -> tuple[VidloraTrainer, NonFiniteStop | None]:
    """Model, data and the Trainer exactly as `vidlora train` runs them; returns the Trainer and the
    non-finite watch (None when ``--stop_on_nonfinite False``). ``trainer_cls`` (a subclass),
    ``extra_callbacks`` and ``loaded`` (a model built elsewhere) let `vidlora bench` observe the
    very same loop; ``arguments`` is the run's recorded arguments (:func:`plan_run` has them)."""
    from transformers import set_seed

    from vidlora.data.collate import MultimodalCollator
    from vidlora.training.callbacks import (
        BadSampleGuard,
        DataWaitLogger,
        LossCurveWriter,
        NonFiniteStop,
        TokenCountLogger,
    )
    from vidlora.training.distributed import init_deepspeed_distributed
    from vidlora.training.trainer import VidloraTrainer

    set_seed(train_args.seed)
    # ZeRO-3 builds models inside deepspeed.zero.Init, which needs DeepSpeed's process group first.
    init_deepspeed_distributed(train_args.deepspeed, train_args.ddp_timeout)
    loaded, processor, train_set, eval_set = load_model_and_data(model_args, data_args, train_args, loaded)
    assert loaded is not None and loaded.tokenizer is not None  # load_model_and_data checked it
    model = apply_training_recipe(loaded.model, model_args, train_args)
    if train_args.should_log:
        print(trainable_report(model), file=sys.stderr)
    nonfinite = NonFiniteStop() if train_args.stop_on_nonfinite else None
    callbacks: list[TrainerCallback] = [
        c for c in (nonfinite, TokenCountLogger(), DataWaitLogger(), LossCurveWriter()) if c is not None
    ]
    callbacks.append(BadSampleGuard(data_args.skip_bad_samples, data_args.max_bad_sample_fraction))
    trainer = (trainer_cls or VidloraTrainer)(
        model=model,
        args=train_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        # The sample ids ride along so a non-finite loss names its batch (the Trainer pops them).
        data_collator=MultimodalCollator(pad_token_id=loaded.tokenizer.pad_token_id, keep_ids=True),
        processing_class=loaded.tokenizer,
        callbacks=[*callbacks, *extra_callbacks],
        record=run_record(model_args, data_args, train_args, processor, arguments),
    )
    return trainer, nonfinite


def plan_run(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments
) -> tuple[ResumePlan, dict[str, Any]]:
    """Where this run starts (:func:`~vidlora.training.run_dir.plan_resume`), decided on rank 0 of a
    launch and handed to every rank with the run's arguments (:func:`run_arguments`: the record
    files are hashed once, there); its messages are printed once."""
    from vidlora.training.distributed import init_deepspeed_distributed

    # The process group must be up for the ranks to agree: DeepSpeed's, or torchrun's (world_size).
    init_deepspeed_distributed(train_args.deepspeed, train_args.ddp_timeout)
    train_args.world_size  # noqa: B018

    def plan() -> tuple[ResumePlan, dict[str, Any]]:
        arguments = run_arguments(model_args, data_args, train_args)
        decided = plan_resume(
            Path(train_args.output_dir or "."),
            resume_from_checkpoint=train_args.resume_from_checkpoint,
            overwrite_output_dir=train_args.overwrite_output_dir,
            current=arguments,
        )
        return decided, arguments

    decided, arguments = computed_on_rank_zero(plan, what=f"reading {train_args.output_dir}")
    if train_args.should_log:
        for message in decided.messages:
            print(f"vidlora train: {message}", file=sys.stderr)
    return decided, arguments


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    config: dict[str, Any] | None = None,
):
    """Train, continuing the run in ``output_dir`` when there is one; returns the Trainer (its state
    holds the log history), or None when ``output_dir`` holds this run finished already.

    ``config`` (:func:`~vidlora.args.parse_train_config`'s) is written to ``output_dir/config.yaml``
    once the directory is known to hold this run, so `vidlora train` of that file runs it again."""
    plan, arguments = plan_run(model_args, data_args, train_args)
    if plan.finished:
        return None
    if config is not None and train_args.process_index == 0:
        write_text_atomic(Path(train_args.output_dir or ".") / CONFIG_FILE, format_config(config))
    trainer, nonfinite = build_trainer(model_args, data_args, train_args, arguments=arguments)
    trainer.train(resume_from_checkpoint=plan.checkpoint)
    if nonfinite is not None:
        # Before the final save: the broken weights must not overwrite the last good checkpoint.
        nonfinite.raise_if_failed()
    trainer.save_model(train_args.output_dir)
    trainer.save_state()
    if trainer.args.should_save:
        mark_finished(Path(train_args.output_dir or "."), trainer.state.global_step)
    return trainer


def summary_line(output_dir: Path, trainer: VidloraTrainer | None) -> str:
    """What `vidlora train` ends with: steps, speed, final loss and where the checkpoints are
    (``trainer``: :func:`run`'s result, None when the run was finished already)."""
    latest = scan_checkpoints(output_dir).latest
    where = f"checkpoints in {output_dir}/ (latest {latest})" if latest else f"saved in {output_dir}/"
    if trainer is None:
        return f"vidlora train: finished already at step {finished_step(output_dir)}, {where}"
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    speed = next(
        (e["train_samples_per_second"] for e in reversed(history) if "train_samples_per_second" in e), None
    )
    parts = [f"{trainer.state.global_step} steps"]
    if speed is not None:
        parts.append(f"{speed:.3g} samples/s")
    if losses:
        parts.append(f"final loss {losses[-1]:.3f}")
    return f"vidlora train: {', '.join(parts)}, {where}"
