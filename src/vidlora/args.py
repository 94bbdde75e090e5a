"""The original's flags, as argument dataclasses: the public interface of `vidlora train` and `check`.

Every flag of the Video-LLaVA LoRA command is accepted with the original meaning, including the
old names (`--evaluation_strategy`, `--warmup_ratio`, `--X`, `--lazy_preprocess`,
`--mm_use_x_start_end`). A default the library shares comes from the one constant it uses
(template, aspect, lengths: `vidlora.data.processor`; the feature layer: `model.configuration`;
the decode timeout: `data.media`); the rest live here. `vidlora check` parses the same
`ModelArguments` and `DataArguments` as training, so it reads the data under the same rules.
``parse_train_args`` / ``parse_check_args`` report every problem at once, before any model is loaded.
`vidlora train config.yaml [--flag value …]` reads the same flags from a YAML mapping (command-line
flags win); the YAML becomes command-line tokens, so it is checked by the very same parser.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import transformers

from vidlora.checkpoint import BaseModel
from vidlora.data.dataset import MediaFolders
from vidlora.data.media import DEFAULT_DECODE_TIMEOUT
from vidlora.data.processor import (
    ASPECT_MODES,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_MODEL_MAX_LENGTH,
    DEFAULT_TEMPLATE,
    MEDIA_MODALITIES,
)
from vidlora.data.templates import TemplateError, get_template, template_names
from vidlora.errors import VidloraError
from vidlora.model.configuration import (
    DEFAULT_ATTN_IMPLEMENTATION,
    DEFAULT_SELECT_LAYER,
    attn_implementation_problem,
)
from vidlora.model.lora import ALL_LINEAR
from vidlora.quiet import quiet_imports

with quiet_imports():  # transformers' TrainingArguments imports PEFT, which imports bitsandbytes
    from transformers import TrainingArguments as HfTrainingArguments

#: `--X` spells the processor's modalities capitalised, as the original does.
SUPPORTED_MODALITIES = tuple(m.capitalize() for m in MEDIA_MODALITIES)
ASPECT_RATIOS = tuple(ASPECT_MODES)
LORA_BIASES = ("none", "all", "lora_only")
#: Training reads (decodes) samples in this many DataLoader worker processes by default.
DEFAULT_DATALOADER_WORKERS = min(4, os.cpu_count() or 1)
QUANT_BITS = (4, 8, 16)
#: With --skip_bad_samples, training stops once more than this fraction of the samples it reads failed
#: to read. The records were checked up front, so a file failing to decode mid-run is rare; one in a
#: hundred points to something systematic (a truncated copy, a codec the decoder lacks, a failing
#: disk) that silently thinning the data would hide.
DEFAULT_MAX_BAD_SAMPLE_FRACTION = 0.01
#: A positional argument with one of these suffixes is a config file of flags.
CONFIG_SUFFIXES = (".yaml", ".yml")
#: Flags a resolved config leaves out: what one invocation does to the output directory (delete it,
#: pick a checkpoint), where a launcher places the process, and a secret. With them, rerunning a
#: run's own config.yaml could delete the run it describes.
CONFIG_EXCLUDED = frozenset({"overwrite_output_dir", "resume_from_checkpoint", "local_rank", "hub_token"})


class ArgumentProblems(VidloraError, ValueError):
    """Several argument problems, reported together."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with the arguments:\n{lines}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="tiny",
        metadata={
            "help": "A preset ('tiny', 'videollava-7b'), a local directory or a hub id: a Video-LLaVA "
            "checkpoint (original or -hf layout), a vidlora output, or a plain LLaMA/Vicuna LLM "
            "(then --video_tower/--image_tower are needed)."
        },
    )
    version: str = field(
        default=DEFAULT_TEMPLATE, metadata={"help": "Prompt template (v1, llava_v1, v0, plain, llama_2)."}
    )
    video_tower: str | None = field(
        default=None,
        metadata={"help": "LanguageBind video tower (e.g. LanguageBind/LanguageBind_Video_merge)."},
    )
    image_tower: str | None = field(
        default=None, metadata={"help": "LanguageBind image tower (e.g. LanguageBind/LanguageBind_Image)."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={"help": "Projector weights from pre-training (safetensors, or a legacy .bin)."},
    )
    mm_projector_type: str | None = field(
        default=None,
        metadata={"help": "linear | mlp{N}x_gelu | identity; default: the checkpoint's, else mlp2x_gelu."},
    )
    mm_vision_select_layer: int = field(
        default=DEFAULT_SELECT_LAYER, metadata={"help": "Tower hidden state used as features."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})
    mm_use_x_start_end: bool = field(
        default=False, metadata={"help": "Start/end tokens around media (unsupported)."}
    )
    mm_use_x_patch_token: bool = field(default=False, metadata={"help": "Patch tokens (unsupported)."})
    X: list[str] = field(
        default_factory=lambda: list(SUPPORTED_MODALITIES),
        metadata={"help": "Modalities to enable: Video and/or Image.", "nargs": "+"},
    )
    num_frames: int | None = field(
        default=None,
        metadata={
            "help": "Frames sampled per video (uniform, first and last); default: the video tower's. A tower "
            "with temporal attention takes only its own count."
        },
    )
    attn_implementation: str = field(
        default=DEFAULT_ATTN_IMPLEMENTATION,
        metadata={
            "help": "Attention kernel of the LLM and both towers: sdpa, eager, or flash_attention_2 "
            "(CUDA, fp16/bf16, pip install 'vidlora[flash]'). Recorded with the checkpoint; inference "
            "uses the same."
        },
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM (no LoRA on it either)."})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Train only the projector (pre-training)."}
    )


@dataclass
class DataArguments:
    data_path: list[str] | None = field(
        default=None, metadata={"help": "Training JSON/JSONL file(s), concatenated.", "nargs": "+"}
    )
    eval_data_path: list[str] | None = field(
        default=None, metadata={"help": "Evaluation JSON/JSONL file(s).", "nargs": "+"}
    )
    video_folder: str | None = field(
        default=None, metadata={"help": "Folder that video paths are relative to."}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that image paths are relative to."}
    )
    image_aspect_ratio: str = field(
        default=DEFAULT_ASPECT_RATIO,
        metadata={"help": "pad: pad images to a square with the mean colour; square: resize+crop."},
    )
    lazy_preprocess: bool = field(default=True, metadata={"help": "Accepted for compatibility; always lazy."})
    eval_holdout_ratio: float = field(
        default=0.02,
        metadata={
            "help": "With an eval strategy but no --eval_data_path, hold out this fraction of the training "
            "data (at least one sample) for evaluation; 0 makes that an error instead."
        },
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Skip (and count) bad samples instead of stopping: those the up-front check refuses, and "
            "those that fail to decode during training (logged with id, file and reason, counted in the "
            "logs and trainer_state.json)."
        },
    )
    max_bad_sample_fraction: float = field(
        default=DEFAULT_MAX_BAD_SAMPLE_FRACTION,
        metadata={
            "help": "With --skip_bad_samples: stop once more than this fraction of the samples the run reads "
            "failed to decode during training (1 never stops)."
        },
    )
    allow_media_outside_folder: bool = field(
        default=False, metadata={"help": "Allow absolute media paths and paths escaping their folder."}
    )
    decode_timeout: float = field(
        default=DEFAULT_DECODE_TIMEOUT, metadata={"help": "Seconds allowed to read one sample's media."}
    )
    decode_watchdog: bool = field(
        default=True,
        metadata={
            "help": "Training decodes each video in a helper process that is killed and replaced after "
            "--decode_timeout (plus 1 s), so a decoder stuck inside FFmpeg or crashing costs one sample, "
            "not the run. False decodes in the loading process, where the timeout is only checked "
            "between packets."
        },
    )
    model_max_length: int = field(
        default=DEFAULT_MODEL_MAX_LENGTH,
        metadata={"help": "Max text tokens per sample (each media placeholder counts once)."},
    )
    tokenizer_model_max_length: int | None = field(
        default=None,
        metadata={"help": "Max sequence length after media expansion (default: no extra bound)."},
    )
    frame_cache: str | None = field(
        default=None,
        metadata={
            "help": "Directory of decoded, pre-processed frames: media decoded once, read back every epoch "
            "(filled on first use, or ahead by `vidlora cache`); keyed on file content and pre-processing."
        },
    )


@dataclass
class TrainingArguments(HfTrainingArguments):
    bits: int = field(default=16, metadata={"help": "16, or 4/8 for QLoRA (the LLM only is quantized)."})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA double quantization."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type: nf4 or fp4."})
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_bias: str = field(default="none", metadata={"help": "none | all | lora_only."})
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: LoRA on the direction of each weight plus a trained magnitude (PEFT's)."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={
            "help": "Rank-stabilized LoRA: adapters scaled by lora_alpha/sqrt(lora_r), not lora_alpha/lora_r."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: the B matrices learn at --learning_rate times this (the paper suggests 16); the A "
            "matrices at --learning_rate, the projector at --mm_projector_lr."
        },
    )
    lora_target: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={
            "help": "The LLM's linear layers that get LoRA, by name (q_proj v_proj ...), or all-linear: every "
            "one but lm_head. Never the towers or the projector.",
            "nargs": "+",
        },
    )
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Projector learning rate."})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "One modality per step, similar lengths together."}
    )
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep the projector frozen."})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Warmup as a fraction of all steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep media columns (must stay False)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete the checkpoints of an earlier run in --output_dir and start from step 0 (without "
            "it, rerunning the same command resumes from the latest complete checkpoint)."
        },
    )
    stop_on_nonfinite: bool = field(
        default=True, metadata={"help": "Stop with a clear message on a NaN/inf loss or gradient."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's unused-parameter search. Off: every trained parameter (LoRA, projector) gets "
            "a gradient every step, as all towers run; True only for a model that skips some."
        },
    )
    # The Trainer's defaults (0 workers, workers restarted every epoch) decode every video inside
    # the training step; measured with `vidlora bench` (benchmarks/RESULTS.md, "DataLoader workers").
    dataloader_num_workers: int = field(
        default=DEFAULT_DATALOADER_WORKERS,
        metadata={
            "help": "DataLoader worker processes (default: min(4, CPU count)); 0 reads in the main process."
        },
    )
    dataloader_persistent_workers: bool = field(
        default=True,
        metadata={"help": "Keep the workers between epochs (no effect, and off, with 0 workers)."},
    )

    def __post_init__(self) -> None:
        # Old spellings the original uses; transformers 5 dropped them.
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        # transformers 5 renamed --gradient_checkpointing (the original's flag) and warns on the old
        # name; it is the original's interface here, so it is translated without a warning.
        if self.gradient_checkpointing is not None and self.activation_checkpointing is None:
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        stage = _zero_stage(self.deepspeed)
        if self.dataloader_num_workers == 0:
            # Persistence means nothing without workers, and torch refuses it there.
            self.dataloader_persistent_workers = False
        super().__post_init__()
        if self.activation_checkpointing:
            kwargs = checkpointing_kwargs(
                self.activation_checkpointing_kwargs,
                zero_stage=stage,
                deepspeed_version=_version("deepspeed"),
            )
            # The old name mirrors the new one (transformers 5 keeps both in step).
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs

    @cached_property
    def _setup_devices(self) -> Any:
        """The Trainer's device setup, with a launched CPU run's process group started with
        ``--ddp_timeout`` first (accelerate's CPU path would start it without one)."""
        if self.use_cpu:
            from vidlora.training.distributed import init_cpu_process_group

            init_cpu_process_group(self.ddp_timeout, self.ddp_backend)
        return super()._setup_devices


# The first DeepSpeed verified to keep frozen weights gathered through a non-reentrant checkpoint's
# recompute under ZeRO-3 (deepspeedai/DeepSpeed#8148); older ones fail in backward with
# CheckpointError "saved shape [4096] vs recomputed [0]" on a LoRA model (frozen base weights).
ZERO3_NON_REENTRANT_DEEPSPEED = "0.19.8"


def checkpointing_kwargs(
    kwargs: dict[str, Any] | str | None, *, zero_stage: int | None, deepspeed_version: str | None
) -> dict[str, Any] | str | None:
    """Activation-checkpointing keyword arguments for the run: re-entrant under ZeRO-3 with a DeepSpeed
    older than `ZERO3_NON_REENTRANT_DEEPSPEED` (transformers 5 defaults to non-reentrant), unless
    ``--gradient_checkpointing_kwargs`` chose ``use_reentrant`` already."""
    from packaging.version import Version

    if zero_stage != 3 or deepspeed_version is None or not isinstance(kwargs, dict | None):
        return kwargs
    if "use_reentrant" in (kwargs or {}) or Version(deepspeed_version) >= Version(
        ZERO3_NON_REENTRANT_DEEPSPEED
    ):
        return kwargs
    return {**(kwargs or {}), "use_reentrant": True}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def wants_evaluation(eval_strategy: object) -> bool:
    """Whether an eval strategy (the enum or its raw string, old or new flag name) asks for evaluation."""
    return str(eval_strategy).lower() not in ("no", "intervalstrategy.no")


def _zero_stage(deepspeed: str | dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a path or a dict); None when absent or unreadable."""
    if not deepspeed:
        return None
    config = deepspeed
    if isinstance(deepspeed, str):
        try:
            with open(deepspeed) as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    return stage if isinstance(stage, int) else None


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def hardware_problems(
    args: TrainingArguments | SimpleNamespace, cuda_available: bool, bf16_supported: bool
) -> list[str]:
    """Flags this machine cannot honour, each with what to do instead."""
    problems = []
    if args.tf32 and not cuda_available:
        problems.append(
            "--tf32 True needs an NVIDIA GPU (Ampere or newer); on this machine pass --tf32 False."
        )
    if args.bf16 and not bf16_supported:
        problems.append(
            "--bf16 True: this device has no bfloat16 support; pass --bf16 False (or --fp16 True on GPU)."
        )
    if args.fp16 and not cuda_available:
        problems.append("--fp16 True needs a GPU; on CPU pass --fp16 False (or --bf16 True).")
    if args.deepspeed and not _has_module("deepspeed"):
        problems.append("--deepspeed needs DeepSpeed: pip install 'vidlora[deepspeed]'.")
    if args.bits in (4, 8) and not _has_module("bitsandbytes"):
        problems.append(f"--bits {args.bits} needs bitsandbytes: pip install 'vidlora[qlora]'.")
    reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
    for reporter in reporters:
        if reporter not in ("none", "all") and not _has_module(reporter):
            problems.append(
                f"--report_to {reporter}: the {reporter} package is not installed (pip install {reporter})."
            )
    return problems


def attention_problems(
    model: ModelArguments | SimpleNamespace, train: TrainingArguments | SimpleNamespace, cuda_available: bool
) -> list[str]:
    """What flash attention needs beyond its package (that one is a `data_problems` check)."""
    if model.attn_implementation != "flash_attention_2":
        return []
    problems = []
    if not cuda_available:
        problems.append("--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU use sdpa.")
    if not (train.bf16 or train.fp16):
        problems.append(
            "--attn_implementation flash_attention_2 runs in half precision only: pass --bf16 True "
            "(or --fp16 True), or use sdpa."
        )
    return problems


def data_problems(
    model: ModelArguments | SimpleNamespace, data: DataArguments | SimpleNamespace
) -> list[str]:
    """Problems with the flags that decide how samples are read (shared by `train` and `check`)."""
    problems = []
    try:
        get_template(model.version)
    except TemplateError:
        problems.append(
            f"--version {model.version}: unknown template; use one of {', '.join(template_names())}."
        )
    unknown = [x for x in model.X if x not in SUPPORTED_MODALITIES]
    if unknown:
        problems.append(f"--X {' '.join(model.X)}: unknown modality {unknown}; use Video and/or Image.")
    if model.mm_use_x_start_end:
        problems.append("--mm_use_x_start_end True is not supported (Video-LLaVA's recipe uses False).")
    if model.mm_use_x_patch_token:
        problems.append("--mm_use_x_patch_token True is not supported (Video-LLaVA's recipe uses False).")
    if model.num_frames is not None and model.num_frames < 1:
        problems.append(f"--num_frames {model.num_frames}: must be at least 1.")
    attn_problem = attn_implementation_problem(model.attn_implementation)
    if attn_problem is not None:
        problems.append(attn_problem)
    if data.image_aspect_ratio not in ASPECT_RATIOS:
        problems.append(
            f"--image_aspect_ratio {data.image_aspect_ratio}: use one of {', '.join(ASPECT_RATIOS)}."
        )
    if not data.data_path:
        problems.append("--data_path is required (one or more JSON/JSONL files).")
    if not 0 <= data.eval_holdout_ratio < 1:
        problems.append(f"--eval_holdout_ratio {data.eval_holdout_ratio}: must be in [0, 1).")
    if data.model_max_length < 1:
        problems.append(f"--model_max_length {data.model_max_length}: must be positive.")
    if data.tokenizer_model_max_length is not None and data.tokenizer_model_max_length < 1:
        problems.append("--tokenizer_model_max_length must be positive.")
    if data.decode_timeout <= 0:
        problems.append(f"--decode_timeout {data.decode_timeout}: must be positive.")
    if not 0 <= data.max_bad_sample_fraction <= 1:
        problems.append(f"--max_bad_sample_fraction {data.max_bad_sample_fraction}: must be in [0, 1].")
    return problems


def training_problems(
    data: DataArguments | SimpleNamespace, train: TrainingArguments | SimpleNamespace
) -> list[str]:
    """Training flag values that are wrong whatever the machine."""
    problems = []
    if train.bits not in QUANT_BITS:
        problems.append(f"--bits {train.bits}: use 4, 8 or 16.")
    if train.bits in (4, 8) and not train.lora_enable:
        problems.append(
            f"--bits {train.bits} quantizes the LLM, which then needs --lora_enable True to train."
        )
    if train.bits in (4, 8) and _zero_stage(train.deepspeed) == 3:
        problems.append(
            f"--bits {train.bits} with a ZeRO-3 config: ZeRO-3 would partition the quantized weights; "
            "use configs/zero2.json (or no --deepspeed) for QLoRA."
        )
    if train.quant_type not in ("nf4", "fp4"):
        problems.append(f"--quant_type {train.quant_type}: use nf4 or fp4.")
    if train.lora_bias not in LORA_BIASES:
        problems.append(f"--lora_bias {train.lora_bias}: use one of {', '.join(LORA_BIASES)}.")
    if train.lora_enable and train.lora_r < 1:
        problems.append(f"--lora_r {train.lora_r}: must be at least 1.")
    targets = list(train.lora_target)
    if ALL_LINEAR in targets and len(targets) > 1:
        problems.append(
            f"--lora_target {' '.join(targets)}: {ALL_LINEAR} already means every linear layer of the LLM; "
            "give it alone, or only layer names."
        )
    if train.loraplus_lr_ratio is not None and train.loraplus_lr_ratio <= 0:
        problems.append(f"--loraplus_lr_ratio {train.loraplus_lr_ratio}: must be positive (16 is usual).")
    variants = [
        flag
        for flag, given in (
            ("--use_dora True", train.use_dora),
            ("--use_rslora True", train.use_rslora),
            (f"--loraplus_lr_ratio {train.loraplus_lr_ratio}", train.loraplus_lr_ratio is not None),
            (f"--lora_target {' '.join(targets)}", targets != [ALL_LINEAR]),
        )
        if given
    ]
    if variants and not train.lora_enable:
        problems.append(f"{', '.join(variants)}: LoRA settings, which need --lora_enable True.")
    if getattr(train, "use_liger_kernel", False):
        problems.append(
            "--use_liger_kernel True is not supported: Liger patches transformers' LLaMA classes process-wide "
            "and its fused loss expects the full sequence, while vidlora's model already applies the LM head "
            "only at the labelled positions; leave it False."
        )
    if getattr(train, "fsdp", None) not in (None, "", False, []):
        # It starts on 2 CPU processes, but sharding, equality with one process and resume are
        # unverified: refused until a test proves them, rather than documented untested.
        problems.append(
            f"--fsdp {train.fsdp!r} is not supported yet; use --deepspeed configs/zero3.json (parameters "
            "sharded across GPUs, tested) or configs/zero2.json."
        )
    if train.remove_unused_columns:
        problems.append("--remove_unused_columns True would drop the media inputs; leave it False.")
    if wants_evaluation(train.eval_strategy) and not data.eval_data_path and data.eval_holdout_ratio == 0:
        problems.append(
            f"--eval_strategy {train.eval_strategy} needs evaluation data: pass --eval_data_path, or "
            "--eval_holdout_ratio > 0 to hold out part of the training data."
        )
    return problems


@dataclass
class CheckArguments:
    """`vidlora check`'s and `vidlora cache`'s own flags (the data and model flags are training's)."""

    workers: int = field(default=1, metadata={"help": "Decode media in this many processes."})
    report: str | None = field(default=None, metadata={"help": "Write the full report as JSON here."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})


def _parser(dtypes: tuple[Any, ...]) -> transformers.HfArgumentParser:
    # exit_on_error=False: a bad value raises ArgumentError, reported as one of the problems.
    return transformers.HfArgumentParser(dtypes, exit_on_error=False)


def _parse_known(
    parser: transformers.HfArgumentParser, argv: list[str], where: str = ""
) -> tuple[dict[str, Any], list[str]]:
    try:
        namespace, leftover = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        # "--lora_r/--lora-r": the flag as the user spells it, not its dashed alias too.
        flag = (err.argument_name or "").split("/")[0]
        raise ArgumentProblems(
            [f"{where}argument {flag}: {err.message}" if flag else f"{where}{err}"]
        ) from err
    return vars(namespace), leftover


def _config_tokens(path: Path, parser: transformers.HfArgumentParser, names: list[str]) -> list[str]:
    """A YAML config (a mapping flag name -> value) as command-line tokens; every problem with its
    keys raises :class:`ArgumentProblems` naming the file, and its values go through the parser."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ArgumentProblems([f"{path}: cannot read the config file ({err.strerror or err})"]) from err
    except yaml.YAMLError as err:
        raise ArgumentProblems([f"{path}: not valid YAML ({err})"]) from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ArgumentProblems(
            [f"{path}: must be a mapping of flag names to values, not {type(data).__name__}"]
        )
    tokens: list[str] = []
    problems = []
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}: unknown key {key!r}: not a flag of vidlora train{hint}")
        elif value == parser.get_default(key):
            continue  # the default (null, [] included, which no command line can spell)
        elif value is None or value == []:
            problems.append(f"{path}: {key}: {value}; give a value, or leave the key out for the default")
        elif isinstance(value, list) and all(not isinstance(v, list | dict) for v in value):
            listed = [f"--{key}", *map(_token, value)]
            if _parse_known(parser, listed, where=f"{path}: ")[1]:
                problems.append(f"{path}: {key}: a list of {len(value)}, but --{key} takes one value")
            tokens += listed
        else:
            tokens += [f"--{key}", _token(value)]
    if problems:
        raise ArgumentProblems(problems)
    _parse_known(parser, tokens, where=f"{path}: ")  # a bad value is reported with the file named
    return tokens


def _token(value: Any) -> str:
    """A YAML value as the parser reads it on the command line (a mapping as JSON, as the Trainer's
    dict-valued flags take it)."""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _expand_config(parser: transformers.HfArgumentParser, argv: list[str], names: list[str]) -> list[str]:
    """``argv`` with its config file (a positional ``*.yaml``) replaced by the file's flags, put first
    so that the command line's own flags override them."""
    _, leftover = _parse_known(parser, argv)
    configs = [arg for arg in leftover if arg.endswith(CONFIG_SUFFIXES) and not arg.startswith("-")]
    if not configs:
        return argv
    if len(configs) > 1:
        raise ArgumentProblems([f"one config file at a time, got {', '.join(configs)}"])
    rest = list(argv)
    rest.remove(configs[0])
    return [*_config_tokens(Path(configs[0]), parser, names), *rest]


def _plain(value: Any) -> Any:
    """A parsed value as YAML writes it (enums by value)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _read(
    argv: list[str] | None, dtypes: tuple[Any, ...], *, config_file: bool
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The parsed values of ``argv`` (its config file read), the tokens left over, and the config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(dtypes)
    names = [f.name for dtype in dtypes for f in fields(dtype) if f.init]
    if config_file:
        argv = _expand_config(parser, argv, names)
    values, leftover = _parse_known(parser, argv)
    config = {name: _plain(values[name]) for name in names if name in values and name not in CONFIG_EXCLUDED}
    return values, leftover, config


def _parse(
    argv: list[str] | None,
    dtypes: tuple[Any, ...],
    check: Callable[..., list[str]],
    *,
    config_file: bool = False,
) -> tuple[list[Any], dict[str, Any]]:
    """Parse ``argv`` into ``dtypes``; ``check(raw namespaces)`` returns problems; all reported at once.
    Returns the built dataclasses and the resolved flags (see :func:`parse_train_config`).

    The checks run on the raw values first, so one run reports everything that is wrong instead
    of stopping at the first dataclass that refuses to build. ``config_file``: a positional YAML
    file supplies flags (:func:`_expand_config`).
    """
    values, leftover, config = _read(argv, dtypes, config_file=config_file)
    problems = [f"unknown argument {arg!r}" for arg in leftover if arg.startswith("-")]
    raw = [
        SimpleNamespace(**{f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values})
        for dtype in dtypes
    ]
    problems += check(*raw)
    if problems:
        raise ArgumentProblems(problems)
    built = []
    for dtype, ns in zip(dtypes, raw, strict=True):
        try:
            built.append(dtype(**vars(ns)))
        except (ValueError, ImportError, TypeError) as err:
            problems.append(f"{dtype.__name__}: {err}")
    if problems:
        raise ArgumentProblems(problems)
    return built, config


def parse_train_args(
    argv: list[str] | None = None,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the original's command line; raise ArgumentProblems listing every problem at once."""
    model, data, train, _ = parse_train_config(
        argv, cuda_available=cuda_available, bf16_supported=bf16_supported
    )
    return model, data, train


def parse_train_config(
    argv: list[str] | None = None,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, dict[str, Any]]:
    """:func:`parse_train_args`, plus the run's resolved config: every flag a user can set (but
    :data:`CONFIG_EXCLUDED`) with its value after the config file, the command line and the
    defaults, as parsed (before the dataclasses translate old names), so that parsing it again
    gives the same arguments (:func:`format_config` writes it)."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported() if cuda_available else True

    def check(model_raw, data_raw, train_raw) -> list[str]:
        if train_raw.evaluation_strategy is not None:
            train_raw.eval_strategy = train_raw.evaluation_strategy
        if not cuda_available:
            # Without a GPU the Trainer runs on the CPU anyway; saying so lets --bf16 use CPU autocast.
            train_raw.use_cpu = True
        return (
            data_problems(model_raw, data_raw)
            + training_problems(data_raw, train_raw)
            + hardware_problems(train_raw, cuda_available, bf16_supported)
            + attention_problems(model_raw, train_raw, cuda_available)
        )

    built, config = _parse(argv, (ModelArguments, DataArguments, TrainingArguments), check, config_file=True)
    model, data, train = built
    return model, data, train, config


def train_config(argv: list[str]) -> dict[str, Any]:
    """The resolved config of a `vidlora train` command line (see :func:`parse_train_config`), values
    not checked: what two spellings of a command (flags, a config file) are compared by."""
    return _read(argv, (ModelArguments, DataArguments, TrainingArguments), config_file=True)[2]


def format_config(config: dict[str, Any]) -> str:
    """A resolved config as the YAML `vidlora train CONFIG` reads: one flag per key, grouped as the
    argument dataclasses are."""
    import yaml

    parts = []
    for dtype in (ModelArguments, DataArguments, TrainingArguments):
        group = {f.name: config[f.name] for f in fields(dtype) if f.name in config}
        parts.append(
            f"# {dtype.__name__}\n" + yaml.safe_dump(group, sort_keys=False, default_flow_style=None)
        )
    return "\n".join(parts)


def _parse_check_like(
    argv: list[str] | None, *, frame_cache_required: bool
) -> tuple[ModelArguments, DataArguments, CheckArguments]:
    def check(model_raw, data_raw, check_raw) -> list[str]:
        problems = data_problems(model_raw, data_raw)
        if check_raw.workers < 1:
            problems.append(f"--workers {check_raw.workers}: must be at least 1.")
        if frame_cache_required and not data_raw.frame_cache:
            problems.append("--frame_cache DIR is required (the cache directory to fill).")
        return problems

    (model, data, options), _ = _parse(argv, (ModelArguments, DataArguments, CheckArguments), check)
    return model, data, options


def parse_check_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CheckArguments]:
    """Parse `vidlora check`'s command line: training's model and data flags plus its own."""
    return _parse_check_like(argv, frame_cache_required=False)


def parse_cache_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CheckArguments]:
    """Parse `vidlora cache`'s command line: `vidlora check`'s, with ``--frame_cache`` required."""
    return _parse_check_like(argv, frame_cache_required=True)


def base_model(model: ModelArguments) -> BaseModel:
    """The base model the flags name; local paths made absolute, so a checkpoint's record of it
    still resolves from another working directory."""

    def absolute(name: str | None) -> str | None:
        return str(Path(name).resolve()) if name is not None and Path(name).exists() else name

    return BaseModel(
        model_name_or_path=absolute(model.model_name_or_path) or model.model_name_or_path,
        video_tower=absolute(model.video_tower),
        image_tower=absolute(model.image_tower),
        pretrain_mm_mlp_adapter=absolute(model.pretrain_mm_mlp_adapter),
        mm_projector_type=model.mm_projector_type,
        cache_dir=absolute(model.cache_dir),
        attn_implementation=model.attn_implementation,
    )


def load_options(model: ModelArguments) -> dict[str, Any]:
    """`load_pretrained`'s keyword arguments for the model flags (training and `check` load alike)."""
    from vidlora.model.configuration import ConfigOverrides

    overrides = ConfigOverrides(
        mm_vision_select_layer=model.mm_vision_select_layer, num_frames=model.num_frames
    )
    return {**base_model(model).load_kwargs(), "overrides": overrides}


def media_folders(data: DataArguments) -> MediaFolders:
    """Where the data flags say relative media paths point (and whether they may leave the folders)."""
    return MediaFolders(data.video_folder, data.image_folder, data.allow_media_outside_folder)


def processor_options(model: ModelArguments, data: DataArguments) -> dict[str, Any]:
    """`Processor.for_model`'s keyword arguments for the data flags (training and `check` read alike)."""
    return {
        "template": model.version,
        "image_aspect_ratio": data.image_aspect_ratio,
        "model_max_length": data.model_max_length,
        "tokenizer_model_max_length": data.tokenizer_model_max_length,
        "modalities": [x.lower() for x in model.X],
    }
