"""`vidlora train` / `python -m vidlora.train`: the seed's LoRA command, on today's stack.

Launch it as the seed does — the DeepSpeed launcher spells `-m` as `--module`:
`deepspeed --module vidlora.train --deepspeed configs/zero3.json …` — or with
`torchrun -m vidlora.train …`, `accelerate launch -m vidlora.train …`, or plainly. The order:

1. parse and check every flag (all problems at once, before any model is loaded);
2. load the model in any supported layout, then declare what trains (towers frozen, projector
   fully trained, LoRA on the LLM) and print the trainable-parameter report;
3. build the datasets (every record validated and tokenized up front; media decoded lazily);
4. train with the Trainer; every checkpoint is usable on its own and resumable.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from vidlora.args import (
    ArgumentProblems,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_train_args,
    wants_evaluation,
)


def load_dtype(train_args: TrainingArguments) -> torch.dtype:
    """Weights in the training precision, as the original casts the model before adding LoRA."""
    if train_args.bf16:
        return torch.bfloat16
    if train_args.fp16:
        return torch.float16
    return torch.float32


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


def prepare_model(model_args: ModelArguments, train_args: TrainingArguments):
    """Load the model and tokenizer, apply the training recipe; returns (model, tokenizer, base_config)."""
    from vidlora.model.loading import load_pretrained
    from vidlora.model.lora import apply_recipe, build_lora_config

    loaded = load_pretrained(
        model_args.model_name_or_path,
        video_tower=model_args.video_tower,
        image_tower=model_args.image_tower,
        pretrain_mm_mlp_adapter=model_args.pretrain_mm_mlp_adapter,
        mm_projector_type=model_args.mm_projector_type,
        torch_dtype=load_dtype(train_args),
        cache_dir=train_args.cache_dir,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    if train_args.should_log:
        print(loaded.report.format(), file=sys.stderr)
    config = model.config
    config.mm_vision_select_layer = model_args.mm_vision_select_layer
    config.use_cache = False
    if config.video_config is not None and model_args.num_frames != config.num_frames:
        if config.video_config.add_time_attn:
            raise ValueError(
                f"--num_frames {model_args.num_frames}: this video tower's temporal embedding is trained for "
                f"{config.num_frames} frames; pass --num_frames {config.num_frames}"
            )
        config.video_config.num_frames = model_args.num_frames
    # Every training forward runs both towers and the projector, on a dummy input (adding exactly
    # zero) for a modality absent from the batch, as the original does for text-only samples. So
    # the projector gets a (zero) gradient in text-only steps on one process exactly as under
    # DeepSpeed, and the ranks of a multi-process job run the same modules every step (ZeRO-3
    # gathers parameters collectively). Inference loads the model with this off.
    config.run_all_towers = True
    if train_args.bits in (4, 8):
        from vidlora.model.quantize import quantize_language_model

        model = quantize_language_model(
            model,
            device=train_args.device,
            bits=train_args.bits,
            compute_dtype=load_dtype(train_args),
            double_quant=train_args.double_quant,
            quant_type=train_args.quant_type,
            gradient_checkpointing=train_args.gradient_checkpointing,
        )
    if model_args.freeze_backbone or model_args.tune_mm_mlp_adapter:
        model.language_model.requires_grad_(False)
    lora_config = None
    if train_args.lora_enable and not model_args.tune_mm_mlp_adapter:
        lora_config = build_lora_config(
            train_args.lora_r, train_args.lora_alpha, train_args.lora_dropout, train_args.lora_bias
        )
    base = model
    model = apply_recipe(model, lora_config, train_llm=not (model_args.freeze_backbone or model_args.tune_mm_mlp_adapter))
    if train_args.freeze_mm_mlp_adapter:
        base.mm_projector.requires_grad_(False)
    set_trainable_dtype(model, load_dtype(train_args), deepspeed=bool(train_args.deepspeed))
    if train_args.gradient_checkpointing:
        # LoRA leaves the embeddings frozen; without inputs that require grad, re-entrant
        # checkpointing would cut the graph and the adapters would get no gradient.
        base.enable_input_require_grads()
    return model, tokenizer, base.config


def trainable_report(model: torch.nn.Module) -> str:
    """One line per part: trainable / total parameters."""
    from vidlora.model.info import count_parameters, format_counts

    return format_counts(count_parameters(model, from_flags=True))


def build_datasets(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments,
                   tokenizer, model_config):
    """Training dataset and (optionally) evaluation dataset, all records validated up front."""
    from vidlora.data.dataset import SupervisedDataset, train_eval_split

    train_set = SupervisedDataset.from_args(model_args, data_args, train_args, tokenizer, model_config)
    eval_set = None
    if data_args.eval_data_path:
        eval_set = SupervisedDataset.from_args(
            model_args, data_args, train_args, tokenizer, model_config, eval_split=True
        )
    elif wants_evaluation(train_args.eval_strategy):
        train_set, eval_set = train_eval_split(train_set, data_args.eval_holdout_ratio, train_args.seed)
        if train_args.should_log:
            print(
                f"vidlora: no --eval_data_path; holding out {len(eval_set)} of {len(train_set) + len(eval_set)} "
                f"training samples for evaluation (--eval_holdout_ratio {data_args.eval_holdout_ratio})",
                file=sys.stderr,
            )
    return train_set, eval_set


def data_config(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments,
                model_config) -> dict[str, Any]:
    """What inference needs to pre-process exactly like training: saved in every checkpoint."""
    return {
        "base_model": model_args.model_name_or_path,
        "video_tower": model_args.video_tower,
        "image_tower": model_args.image_tower,
        "template": model_args.version,
        "num_frames": model_config.num_frames if model_config.video_config is not None else None,
        "image_aspect_ratio": data_args.image_aspect_ratio,
        "model_max_length": train_args.model_max_length,
        "tokenizer_model_max_length": train_args.tokenizer_model_max_length,
        "modalities": list(model_args.X),
        "lora": {
            "enabled": bool(train_args.lora_enable),
            "r": train_args.lora_r,
            "alpha": train_args.lora_alpha,
            "dropout": train_args.lora_dropout,
            "bias": train_args.lora_bias,
        },
        "bits": train_args.bits,
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
    }


def run(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments):
    """Train; returns the Trainer (its state holds the log history)."""
    from transformers import set_seed

    from vidlora.data.collate import MultimodalCollator
    from vidlora.training.callbacks import LossCurveWriter, NonFiniteStop, TokenCountLogger
    from vidlora.training.distributed import init_deepspeed_distributed
    from vidlora.training.trainer import VidloraTrainer

    set_seed(train_args.seed)
    # ZeRO-3 builds models inside deepspeed.zero.Init, which needs DeepSpeed's process group first.
    init_deepspeed_distributed(train_args.deepspeed, train_args.ddp_timeout)
    model, tokenizer, model_config = prepare_model(model_args, train_args)
    if train_args.should_log:
        print(trainable_report(model), file=sys.stderr)
    train_set, eval_set = build_datasets(model_args, data_args, train_args, tokenizer, model_config)
    nonfinite = NonFiniteStop() if train_args.stop_on_nonfinite else None
    callbacks = [c for c in (nonfinite, TokenCountLogger(), LossCurveWriter()) if c is not None]
    trainer = VidloraTrainer(
        model=model,
        args=train_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=MultimodalCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        data_config=data_config(model_args, data_args, train_args, model_config),
    )
    trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    if nonfinite is not None:
        # Before the final save: the broken weights must not overwrite the last good checkpoint.
        nonfinite.raise_if_failed()
    trainer.save_model(train_args.output_dir)
    trainer.save_state()
    return trainer


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, train_args = parse_train_args(argv)
    except ArgumentProblems as err:
        print(f"vidlora train: {err}", file=sys.stderr)
        return 2
    from vidlora.training.callbacks import NonFiniteTrainingError
    from vidlora.training.distributed import LauncherRequired

    Path(train_args.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        run(model_args, data_args, train_args)
    except (NonFiniteTrainingError, LauncherRequired) as err:
        print(f"vidlora train: {err}", file=sys.stderr)
        return 1
    finally:
        # Left to interpreter exit, the process group's threads can be torn down while still
        # running ("terminate called without an active exception", exit code -6 after a run
        # that finished and saved: seen once in three ZeRO-3 resume runs).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from vidlora.cli import run_command

    raise SystemExit(run_command("train", main, sys.argv[1:]))
