"""`vidlora plan`: will this training run fit on the GPU? Peak memory per GPU, before launch.

Takes `vidlora train`'s own flags (paste the train command's), plus ``--num_gpus``,
``--gpu_memory``, ``--modality``, ``--labelled_tokens`` and ``--json``. Knowing no data, it
assumes the largest sample with every text token labelled unless ``--labelled_tokens`` says
otherwise. The model is read on the meta device, so ``videollava-7b`` plans
in seconds; the estimate itself is :mod:`vidlora.training.memory`. With ``--gpu_memory`` it says
whether the run fits and, if not, which settings do (the seed's out-of-memory advice, automated).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Any

from vidlora.args import (
    ArgumentProblems,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    load_options,
    training_problems,
)
from vidlora.training.memory import (
    BREAKDOWN,
    GIB,
    MODALITIES,
    MemoryEstimate,
    MemorySettings,
    ModelShape,
    Suggestion,
    ZeroSettings,
    estimate,
    read_model_shape,
    read_zero_config,
    suggest,
)


@dataclass
class PlanArguments:
    """`vidlora plan`'s own flags (the rest are `vidlora train`'s)."""

    num_gpus: int = field(default=1, metadata={"help": "GPUs of the run (ZeRO partitions over them)."})
    gpu_memory: float | None = field(
        default=None,
        metadata={"help": "Memory of one GPU in GB (2**30 bytes, e.g. 80): says whether it fits."},
    )
    modality: str | None = field(
        default=None,
        metadata={
            "help": "Media of the largest sample: video, image or text (default: the enabled one with most tokens)."
        },
    )
    labelled_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per sample that take a loss (the answers'; the output head and the loss run "
            "there only). Default: every text token of the largest sample, an upper bound."
        },
    )
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of tables."})


@dataclass(frozen=True)
class Plan:
    """A plan: the settings, their estimate, and what to change when they do not fit."""

    model: str
    settings: MemorySettings
    estimate: MemoryEstimate
    gpu_memory: float | None
    suggestions: list[Suggestion]

    @property
    def fits(self) -> bool | None:
        """Whether the predicted total fits (None without ``--gpu_memory``)."""
        return None if self.gpu_memory is None else self.estimate.total <= self.gpu_memory * GIB


_LABELS = {
    "weights": "frozen weights (towers, LLM base; ZeRO-3: this GPU's partition)",
    "gathered_weights": "ZeRO-3 gathered working set",
    "trainable": "trainable parameters (LoRA + projector)",
    "gradients": "their gradients (+ ZeRO buckets)",
    "optimizer": "AdamW states",
    "activations": "activations kept for backward",
    "layer_backward": "one layer's backward (recompute + gradients)",
    "logits": "loss over [labelled tokens, vocab] in fp32",
    "towers": "towers' forward (transient, no autograd)",
    "cuda_overhead": "CUDA context + allocator reserve",
}


def _raw(values: dict[str, Any], dtype: type) -> SimpleNamespace:
    return SimpleNamespace(**{f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values})


def parse_plan_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SimpleNamespace, PlanArguments]:
    """Parse `vidlora train`'s flags plus plan's own; every problem reported at once.

    The training flags stay a namespace of raw values: building `TrainingArguments` would start
    DeepSpeed's and the accelerator's set-up, which a plan must not need.
    """
    import transformers

    argv = list(sys.argv[1:] if argv is None else argv)
    dtypes: tuple[Any, ...] = (ModelArguments, DataArguments, TrainingArguments, PlanArguments)
    parser = transformers.HfArgumentParser(dtypes)
    namespace, leftover = parser.parse_known_args(argv)
    values = vars(namespace)
    model_raw, data_raw, train_raw = (
        _raw(values, t) for t in (ModelArguments, DataArguments, TrainingArguments)
    )
    plan = PlanArguments(**vars(_raw(values, PlanArguments)))
    problems = [f"unknown argument {arg!r}" for arg in leftover if arg.startswith("-")]
    if train_raw.evaluation_strategy is not None:
        train_raw.eval_strategy = train_raw.evaluation_strategy
    problems += training_problems(data_raw, train_raw)
    if plan.num_gpus < 1:
        problems.append(f"--num_gpus {plan.num_gpus}: must be at least 1.")
    if plan.gpu_memory is not None and plan.gpu_memory <= 0:
        problems.append(f"--gpu_memory {plan.gpu_memory}: must be positive (GB).")
    if plan.labelled_tokens is not None and plan.labelled_tokens < 0:
        problems.append(f"--labelled_tokens {plan.labelled_tokens}: must be at least 0.")
    if plan.modality is not None and plan.modality not in MODALITIES:
        problems.append(f"--modality {plan.modality}: use one of {', '.join(MODALITIES)}.")
    elif plan.modality in ("video", "image") and plan.modality.capitalize() not in model_raw.X:
        problems.append(f"--modality {plan.modality}: --X {' '.join(model_raw.X)} does not enable it.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(train_raw, name) < 1:
            problems.append(f"--{name} {getattr(train_raw, name)}: must be at least 1.")
    if data_raw.model_max_length < 1:
        problems.append(f"--model_max_length {data_raw.model_max_length}: must be positive.")
    if model_raw.num_frames is not None and model_raw.num_frames < 1:
        problems.append(f"--num_frames {model_raw.num_frames}: must be at least 1.")
    if problems:
        raise ArgumentProblems(problems)
    return ModelArguments(**vars(model_raw)), DataArguments(**vars(data_raw)), train_raw, plan


def _modality(shape: ModelShape, model: ModelArguments, plan: PlanArguments) -> str:
    """The asked modality, or the enabled one with the most feature tokens."""
    if plan.modality is not None:
        return plan.modality
    enabled = {x.lower() for x in model.X}
    tokens = {
        "video": (shape.frames or 0) * (shape.frame_tokens or 0) if "video" in enabled else 0,
        "image": (shape.image_tokens or 0) if "image" in enabled else 0,
    }
    best = max(tokens, key=lambda k: tokens[k])
    return best if tokens[best] else "text"


def settings_from_args(
    shape: ModelShape, model: ModelArguments, data: DataArguments, train: SimpleNamespace, plan: PlanArguments
) -> MemorySettings:
    """The memory settings the parsed flags describe."""
    zero = read_zero_config(train.deepspeed) if train.deepspeed else ZeroSettings()
    checkpointing = train.gradient_checkpointing or train.activation_checkpointing
    return MemorySettings(
        lora_enable=bool(train.lora_enable) and not model.tune_mm_mlp_adapter,
        lora_r=train.lora_r,
        lora_dropout=train.lora_dropout,
        train_llm=not (model.freeze_backbone or model.tune_mm_mlp_adapter),
        train_projector=not train.freeze_mm_mlp_adapter,
        bits=train.bits,
        double_quant=train.double_quant,
        precision="bf16" if train.bf16 else "fp16" if train.fp16 else "fp32",
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_gpus=plan.num_gpus,
        model_max_length=data.model_max_length,
        tokenizer_model_max_length=data.tokenizer_model_max_length,
        labelled_tokens=plan.labelled_tokens,
        modality=_modality(shape, model, plan),  # type: ignore[arg-type]  # checked by parse_plan_args
        num_frames=model.num_frames,
        gradient_checkpointing=bool(checkpointing),
        zero=zero,
    )


def make_plan(
    model_args: ModelArguments, data_args: DataArguments, train_raw: SimpleNamespace, plan_args: PlanArguments
) -> Plan:
    """Read the model on the meta device, estimate, and suggest (from `parse_plan_args`' values)."""
    from vidlora.model.loading import load_pretrained

    loaded = load_pretrained(model_args.model_name_or_path, device="meta", **load_options(model_args))
    shape = read_model_shape(loaded.model)
    settings = settings_from_args(shape, model_args, data_args, train_raw, plan_args)
    found = estimate(shape, settings)
    suggestions = []
    if plan_args.gpu_memory is not None:
        suggestions = suggest(shape, settings, int(plan_args.gpu_memory * GIB))
    return Plan(model_args.model_name_or_path, settings, found, plan_args.gpu_memory, suggestions)


def _gb(n: int) -> float:
    return round(n / GIB, 2)


def _describe(plan: Plan) -> str:
    s, e = plan.settings, plan.estimate
    recipe = (
        f"LoRA r={s.lora_r}" if s.lora_enable else "LLM trained in full" if s.train_llm else "projector only"
    )
    bits = f", {s.bits}-bit LLM" if s.bits != 16 else ""
    zero = f"ZeRO-{s.zero.stage} ({s.zero.source})" if s.zero.stage else "no DeepSpeed"
    offload = " + optimizer offload" if s.zero.offload_optimizer else ""
    text = s.model_max_length - (1 if e.media_tokens else 0)
    labelled = (
        "every text token: an upper bound, --labelled_tokens N to set"
        if s.labelled_tokens is None
        else "--labelled_tokens"
    )
    return (
        f"{plan.model}: {recipe}{bits}, {s.precision}, batch {s.per_device_train_batch_size} per GPU x "
        f"{s.gradient_accumulation_steps} accumulation x {s.num_gpus} GPU(s) = {s.global_batch}, "
        f"{e.sequence_length} tokens per sample ({text} text + {e.media_tokens} {s.modality}), "
        f"{e.labelled_tokens} of them labelled ({labelled}), gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, {zero}{offload}"
    )


def format_plan(plan: Plan) -> str:
    """Markdown tables: the breakdown, the verdict, the suggestions."""
    e = plan.estimate
    lines = [_describe(plan), "", "| term | GB | |", "|---|---:|---|"]
    lines += [f"| {name} | {getattr(e, name) / GIB:.2f} | {_LABELS[name]} |" for name in BREAKDOWN]
    lines.append(
        f"| **peak per GPU** | **{e.total / GIB:.2f}** | weights..optimizer + max(activations + max(logits, layer backward), towers) + CUDA |"
    )
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines += ["", f"On a {plan.gpu_memory:g} GB GPU: {verdict} ({e.total / GIB:.2f} GB predicted)."]
        if plan.suggestions:
            lines += ["", "Settings that bring it down (each on top of the ones above it):", "",
                      "| change | peak GB | fits |", "|---|---:|---|"]  # fmt: skip
            memory = int(plan.gpu_memory * GIB)
            lines += [
                f"| `{x.flags}` | {x.total / GIB:.2f} | {'yes' if x.fits(memory) else 'no'} |"
                for x in plan.suggestions
            ]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON object."""
    memory = int(plan.gpu_memory * GIB) if plan.gpu_memory is not None else None
    settings = asdict(plan.settings) | {
        "model": plan.model,
        "global_batch": plan.settings.global_batch,
        "sequence_length": plan.estimate.sequence_length,
        "media_tokens": plan.estimate.media_tokens,
        "labelled_tokens": plan.estimate.labelled_tokens,
        "labelled_tokens_upper_bound": plan.settings.labelled_tokens is None,
    }
    return {
        "settings": settings,
        "breakdown": plan.estimate.breakdown_gb(),
        "total_gb": _gb(plan.estimate.total),
        "gpu_memory_gb": plan.gpu_memory,
        "fits": plan.fits,
        "suggestions": [
            {
                "flags": x.flags,
                "total_gb": _gb(x.total),
                "fits": x.fits(memory) if memory is not None else None,
            }
            for x in plan.suggestions
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Run `vidlora plan`; exit status 0 (also when it does not fit: the answer is the output)."""
    model_args, data_args, train_raw, plan_args = parse_plan_args(argv)
    plan = make_plan(model_args, data_args, train_raw, plan_args)
    print(json.dumps(plan_json(plan), indent=2) if plan_args.json else format_plan(plan))
    return 0
