"""Peak GPU memory of a training run, predicted from the model's structure before launch.

The model is read on the meta device (no weights), so a 7B plan takes seconds. Every term is
derived from the model itself (parameter counts per part, LoRA targets, the LLM's and towers'
config sizes), the run's settings and its DeepSpeed config; nothing is a constant for one model.
The terms, their byte counts and why are in :func:`estimate`; ``tests/training/test_memory_plan.py``
checks the prediction against the measured peak tensor memory of real training steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from vidlora.errors import UsageError
from vidlora.jsonl import read_json_object
from vidlora.model.configuration import tower_side
from vidlora.model.info import count_parameters
from vidlora.model.lora import lora_target_module_names

if TYPE_CHECKING:
    from vidlora.model.modeling import VideoLlavaForCausalLM

GIB = 2**30
#: CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's unused reserve (fragmentation),
#: kept as its own line: it is what `nvidia-smi` shows beyond the tensors (0.5-1 GB on current GPUs).
CUDA_OVERHEAD_BYTES = 1 * GIB
#: bitsandbytes' 4-bit block size: one absmax per 64 weights.
_NF4_BLOCK = 64
#: Double quantization: the absmaxes are stored in 8 bits, with one fp32 constant per 256 of them.
_DQ_BLOCK = 256
Modality = Literal["video", "image", "text"]
MODALITIES: tuple[str, ...] = ("video", "image", "text")


@dataclass(frozen=True)
class ZeroSettings:
    """What a DeepSpeed config says about memory; stage 0 = no DeepSpeed.

    Attributes:
        stage: ZeRO stage (0-3).
        offload_optimizer: optimizer states (and their step) live on the CPU.
        offload_param: ZeRO-3 parameter partitions live on the CPU.
        max_live_parameters: ZeRO-3 ``stage3_max_live_parameters`` (a cap on gathered parameters).
        prefetch_bucket_size: ZeRO-3 ``stage3_prefetch_bucket_size`` in parameters; None = ``auto``
            (the Trainer's 0.9 * hidden**2).
        param_persistence_threshold: ZeRO-3 parameters smaller than this stay whole on every GPU;
            None = ``auto`` (10 * hidden).
        reduce_bucket_size: gradient reduction bucket in elements; None = ``auto`` (hidden**2).
        source: the config file, for reports.
    """

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    max_live_parameters: float = 1e9
    prefetch_bucket_size: float | None = None
    param_persistence_threshold: float | None = None
    reduce_bucket_size: float | None = None
    source: str | None = None


def _size(value: Any, name: str, path: Path) -> float | None:
    """A DeepSpeed size: a number, or "auto" (None: the Trainer fills it in from the model)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f'{path}: zero_optimization.{name} must be a number or "auto", got {value!r}')
    return float(value)


def read_zero_config(path: str | Path) -> ZeroSettings:
    """The memory-relevant part of a DeepSpeed JSON config (its ``zero_optimization`` block)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--deepspeed {path}: no such file")
    zero = read_json_object(path).get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UsageError(f"{path}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")

    def on_cpu(key: str) -> bool:
        block = zero.get(key) or {}
        return isinstance(block, dict) and block.get("device") in ("cpu", "nvme")

    max_live = _size(zero.get("stage3_max_live_parameters"), "stage3_max_live_parameters", path)
    return ZeroSettings(
        stage=stage,
        offload_optimizer=on_cpu("offload_optimizer"),
        offload_param=stage == 3 and on_cpu("offload_param"),
        max_live_parameters=1e9 if max_live is None else max_live,
        prefetch_bucket_size=_size(
            zero.get("stage3_prefetch_bucket_size"), "stage3_prefetch_bucket_size", path
        ),
        param_persistence_threshold=_size(
            zero.get("stage3_param_persistence_threshold"), "stage3_param_persistence_threshold", path
        ),
        reduce_bucket_size=_size(zero.get("reduce_bucket_size"), "reduce_bucket_size", path),
        source=str(path),
    )


@dataclass(frozen=True)
class MemorySettings:
    """The run settings that decide memory (the `vidlora train` flags of the same names).

    Attributes:
        lora_enable / lora_r / lora_dropout: the adapters (without LoRA the LLM trains in full).
        train_llm: False for ``--freeze_backbone`` / ``--tune_mm_mlp_adapter`` (LLM frozen, no LoRA).
        train_projector: False for ``--freeze_mm_mlp_adapter``.
        bits: 16, or 4/8 (the LLM's linear layers quantized).
        double_quant: 4 bits: quantization constants quantized too.
        precision: "bf16", "fp16" or "fp32" (weights and activations).
        per_device_train_batch_size / gradient_accumulation_steps / num_gpus: the batch; the
            global batch is their product. Accumulation does not change the peak.
        model_max_length: text tokens per sample (each media placeholder counts once).
        tokenizer_model_max_length: bound after media expansion (None: none).
        labelled_tokens: positions per sample that take a loss (None: every text token, the sequence
            length minus its media tokens, an upper bound). The output head and the loss run on
            these positions only; media, system prompt and questions carry no label.
        modality: the media of the largest sample: "video", "image" or "text".
        num_frames: frames per video (None: the video tower's).
        gradient_checkpointing: recompute each LLM layer in backward.
        device: "cuda", or "cpu" for a CPU run (its dropout keeps a noise tensor in the activation
            dtype where CUDA's fused kernel keeps a 1-byte mask).
        zero: the DeepSpeed config's memory settings.
    """

    lora_enable: bool = True
    lora_r: int = 64
    lora_dropout: float = 0.05
    train_llm: bool = True
    train_projector: bool = True
    bits: int = 16
    double_quant: bool = True
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_gpus: int = 1
    model_max_length: int = 2048
    tokenizer_model_max_length: int | None = None
    labelled_tokens: int | None = None
    modality: Modality = "video"
    num_frames: int | None = None
    gradient_checkpointing: bool = False
    device: Literal["cuda", "cpu"] = "cuda"
    zero: ZeroSettings = field(default_factory=ZeroSettings)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all GPUs."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_gpus

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the weights and activations."""
        return 4 if self.precision == "fp32" else 2

    def problems(self) -> list[str]:
        """Settings that cannot describe a run."""
        found = []
        if self.bits not in (4, 8, 16):
            found.append(f"--bits {self.bits}: use 4, 8 or 16.")
        if self.bits in (4, 8) and not (self.lora_enable and self.train_llm):
            found.append(f"--bits {self.bits} quantizes the LLM, which then needs --lora_enable True.")
        if self.bits in (4, 8) and self.zero.stage == 3:
            found.append(f"--bits {self.bits} with ZeRO-3: ZeRO-3 cannot partition quantized weights.")
        if self.lora_enable and self.lora_r < 1:
            found.append(f"--lora_r {self.lora_r}: must be at least 1.")
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_gpus",
            "model_max_length",
        ):
            if getattr(self, name) < 1:
                found.append(f"--{name} {getattr(self, name)}: must be at least 1.")
        if self.labelled_tokens is not None and self.labelled_tokens < 0:
            found.append(f"--labelled_tokens {self.labelled_tokens}: must be at least 0.")
        if self.modality not in MODALITIES:
            found.append(f"--modality {self.modality}: use one of {', '.join(MODALITIES)}.")
        return found


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read from its modules and config."""

    parts: dict[str, int]
    lora_per_rank: int  # LoRA parameters per unit of rank: sum of (in + out) over the targets
    quantizable_sizes: tuple[int, ...]  # weights per LLM linear layer that --bits quantizes
    quantizable_rows: int  # their output rows (LLM.int8() keeps one fp32 scale per row)
    largest_block: int  # parameters of the largest decoder/encoder layer or other module
    param_sizes: tuple[int, ...]  # every parameter's element count (ZeRO-3 keeps small ones whole)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    projector_saved_width: int  # per media token: elements the projector saves for its backward
    image_tokens: int | None
    frame_tokens: int | None
    frames: int | None
    tower_hidden: int
    tower_intermediate: int
    tower_layers: int
    tower_pixels: int  # 3 * H * W of one frame or image

    @property
    def quantizable(self) -> int:
        """Weights that --bits quantizes."""
        return sum(self.quantizable_sizes)

    @property
    def base_params(self) -> int:
        """All parameters without LoRA."""
        return sum(self.parts.values())


def _blocks(model: nn.Module) -> Iterator[int]:
    """Parameter counts of the units ZeRO-3 gathers at once: layers, else leaf modules."""
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    inside: set[str] = set()
    for name, module in model.named_modules():
        if type(module).__name__ in block_types:
            inside.add(name + ".")
            yield sum(p.numel() for p in module.parameters())
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            yield own


def read_model_shape(model: VideoLlavaForCausalLM) -> ModelShape:
    """Sizes of `model` (a `VideoLlavaForCausalLM`, on the meta device or not) for the estimate."""
    config = model.config
    text = config.text_config
    counts = count_parameters(model, lora_r=1)
    targets = [model.get_submodule(name) for name in lora_target_module_names(model)]
    linears = [m for m in targets if isinstance(m, nn.Linear)]  # all of them: LoRA targets are linear
    quantizable = tuple(m.in_features * m.out_features for m in linears)
    rows = sum(m.out_features for m in linears)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    projector = getattr(model, "mm_projector", None)
    steps = [m for m in projector.modules() if isinstance(m, nn.Linear)] if projector is not None else []
    # Each linear saves its input; each GELU between two linears saves its input (the previous output).
    saved_width = sum(m.in_features for m in steps) + sum(m.out_features for m in steps[:-1])
    tower = config.video_config if config.video_config is not None else config.image_config
    side = tower_side(tower) if tower is not None else 0
    return ModelShape(
        parts=dict(counts.parts),
        lora_per_rank=counts.lora,
        quantizable_sizes=quantizable,
        quantizable_rows=rows,
        largest_block=max(_blocks(model), default=0),
        param_sizes=tuple(p.numel() for p in model.parameters()),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
        projector_saved_width=saved_width,
        image_tokens=config.image_seq_length if config.image_config is not None else None,
        frame_tokens=config.frame_seq_length if config.video_config is not None else None,
        frames=config.num_frames if config.video_config is not None else None,
        tower_hidden=tower.hidden_size if tower is not None else 0,
        tower_intermediate=tower.intermediate_size if tower is not None else 0,
        tower_layers=tower.num_hidden_layers if tower is not None else 0,
        tower_pixels=3 * side * side,
    )


#: The terms of `MemoryEstimate`, in the order they are reported.
BREAKDOWN = (
    "weights",
    "gathered_weights",
    "trainable",
    "gradients",
    "optimizer",
    "activations",
    "layer_backward",
    "logits",
    "towers",
    "cuda_overhead",
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory per GPU, in bytes per term.

    Attributes:
        weights: frozen base weights resident on the GPU (ZeRO-3: this GPU's partition).
        gathered_weights: ZeRO-3's gathered working set (0 otherwise).
        trainable: the trainable parameters' working copy (+ autocast's low-precision copy).
        gradients: their gradients (+ ZeRO's fp32 gradient partition and reduce bucket).
        optimizer: AdamW's states (fp32 master under DeepSpeed, two moments).
        activations: activations kept for backward: every LLM layer's saved set, or with
            gradient checkpointing each layer's input; plus the projector's.
        layer_backward: the backward of one layer: its recomputed saved set (with checkpointing)
            and the activation gradients alive inside it (d (2 f + 2 h) per token).
        logits: the loss: the final norm's fp32 input at every position, and at the labelled
            positions only (the output head runs there alone) [N, vocab] in fp32 (log-probabilities
            and their gradients); the loss backward finishes before the first layer's backward
            starts, so the peak takes the larger of the two.
        towers: the frozen towers' transient forward peak (no autograd); it ends before the LLM
            forward, so the peak takes the larger of it and the LLM's activations.
        cuda_overhead: `CUDA_OVERHEAD_BYTES`.
        sequence_length: tokens per sample after media expansion.
        media_tokens: feature tokens of the sample's media.
        labelled_tokens: positions per sample that take a loss (N is the batch's sum).
    """

    weights: int
    gathered_weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    layer_backward: int
    logits: int
    towers: int
    cuda_overhead: int
    sequence_length: int
    media_tokens: int
    labelled_tokens: int

    @property
    def persistent(self) -> int:
        """What stays allocated through the step: weights, trainables and their states."""
        return self.weights + self.gathered_weights + self.trainable + self.gradients + self.optimizer

    @property
    def tensors(self) -> int:
        """Peak of live tensors (everything but the CUDA overhead)."""
        llm = self.activations + max(self.logits, self.layer_backward)
        return self.persistent + max(llm, self.towers)

    @property
    def total(self) -> int:
        """Peak memory of the process on one GPU."""
        return self.tensors + self.cuda_overhead

    def breakdown_gb(self) -> dict[str, float]:
        """The terms in GB (2**30 bytes), rounded to 0.01."""
        return {name: round(getattr(self, name) / GIB, 2) for name in BREAKDOWN}


def _nf4_bytes(weights: int, double_quant: bool) -> int:
    """One 4-bit layer as bitsandbytes stores it: two weights per byte, one absmax per 64 (fp32, or
    8-bit with one fp32 per 256 of them and the 256-entry fp32 code under double quantization),
    and the 16-entry fp32 NF4 code."""
    blocks = math.ceil(weights / _NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / _DQ_BLOCK) + 4 * (256 + 1) if double_quant else 4 * blocks
    return math.ceil(weights / 2) + constants + 4 * 16


def _weights_bytes(shape: ModelShape, s: MemorySettings) -> int:
    """Frozen base weights in their dtype (quantized LLM linears at 4/8 bits)."""
    dtype = s.dtype_bytes
    parts = shape.parts
    towers = parts["video_tower"] + parts["video_tower.temporal"] + parts["image_tower"]
    llm = parts["language_model"]
    frozen = towers + (0 if s.train_projector else parts["mm_projector"])
    total = frozen * dtype
    if s.lora_enable or not s.train_llm:
        if s.bits == 16:
            total += llm * dtype
        else:
            # QLoRA: prepare_model_for_kbit_training keeps embeddings, norms and lm_head in fp32,
            # unless DeepSpeed casts the whole module to the training dtype.
            rest = (llm - shape.quantizable) * (dtype if s.zero.stage else 4)
            if s.bits == 4:
                total += sum(_nf4_bytes(n, s.double_quant) for n in shape.quantizable_sizes) + rest
            else:
                total += shape.quantizable + 4 * shape.quantizable_rows + rest
    return total


def _trainable_count(shape: ModelShape, s: MemorySettings) -> int:
    projector = shape.parts["mm_projector"] if s.train_projector else 0
    if not s.train_llm:
        return projector
    if s.lora_enable:
        return projector + shape.lora_per_rank * s.lora_r
    return projector + shape.parts["language_model"]


def sequence_length(shape: ModelShape, s: MemorySettings) -> tuple[int, int]:
    """(tokens per sample after media expansion, media feature tokens): every text token of
    ``model_max_length`` used, the one media placeholder replaced by the media's features."""
    media = 0
    if s.modality == "video":
        if shape.frame_tokens is None:
            raise UsageError("--modality video: the model has no video tower")
        media = (s.num_frames or shape.frames or 1) * shape.frame_tokens
    elif s.modality == "image":
        if shape.image_tokens is None:
            raise UsageError("--modality image: the model has no image tower")
        media = shape.image_tokens
    length = s.model_max_length + media - (1 if media else 0)
    if s.tokenizer_model_max_length is not None:
        length = min(length, s.tokenizer_model_max_length)
    return length, media


def labelled_tokens(shape: ModelShape, s: MemorySettings) -> int:
    """Positions per sample that take a loss: ``s.labelled_tokens``, or every text token of the
    sample (its length minus the media tokens, which never carry a label): an upper bound."""
    length, media = sequence_length(shape, s)
    text = max(length - media, 0)
    if s.labelled_tokens is None:
        return text
    if s.labelled_tokens > text:
        raise UsageError(
            f"--labelled_tokens {s.labelled_tokens}: a sample has only {text} text tokens "
            f"({length} tokens, {media} of them {s.modality} features, which take no loss)"
        )
    return s.labelled_tokens


def _layer_bytes_per_token(shape: ModelShape, s: MemorySettings) -> int:
    """Bytes one LLaMA-style decoder layer saves for backward, per token (sdpa: no L x L matrix).

    Counted op by op (activation dtype d bytes, hidden h, FFN f, rank r, heads a):
    - each RMSNorm keeps its input in fp32 (4h, twice);
    - attention keeps q and k after RoPE, v and the output (d(2h + 2 kv)), plus fp32 log-sum-exp (4a);
    - the gated MLP keeps the gate, its SiLU and the up projection (3 d f);
    - the linear layers' inputs: LoRA with dropout keeps, per adapted linear, the dropout mask
      (1 byte on CUDA; on the CPU a noise tensor in the adapters' dtype) and the dropped copy
      that lora_A saves (q, k, v, o, gate, up: h each; down: f), plus lora_A's r outputs; a frozen base linear saves nothing. Without dropout the copies are the
      shared inputs (h for q/k/v, h for o, h for gate/up, f for down); a fully trained LLM saves
      the same shared inputs. A frozen LLM without LoRA saves no linear input.
    """
    d = s.dtype_bytes
    h, f, a = shape.hidden, shape.intermediate, shape.heads
    per_token = 8 * h + d * (2 * h + 2 * shape.kv_dim) + 4 * a + 3 * d * f
    if s.train_llm and s.lora_enable:
        adapted_in = 6 * h + f
        if s.lora_dropout > 0:
            # CUDA's fused dropout keeps a 1-byte mask; the CPU's a noise tensor in the adapters'
            # dtype (PEFT casts the input to it): fp32 without DeepSpeed, the training dtype with.
            mask = 1 if s.device == "cuda" else 4 if s.zero.stage == 0 else d
            per_token += adapted_in * (mask + d)
        else:
            per_token += d * (3 * h + f)
        per_token += 7 * d * s.lora_r
    elif s.train_llm:
        per_token += d * (3 * h + f)
    return per_token


def estimate(shape: ModelShape, s: MemorySettings) -> MemoryEstimate:
    """Predict the peak memory per GPU of one training step under `s`.

    Trainable parameters (LoRA + projector): without DeepSpeed they are fp32 (the optimizer updates
    them directly), so 4 B working copy + 4 B gradient + 8 B AdamW moments, plus autocast's
    bf16/fp16 copy of each (2 B) held through the forward; on several GPUs DDP's gradient buckets
    add another 4 B. Under DeepSpeed they take the training
    dtype (d B) with d B gradients and an fp32 copy of them for the step (4 B); the optimizer holds
    the fp32 master and two moments (12 B). Every ZeRO stage partitions the optimizer states over
    the GPUs, stage 2 the gradients too, stage 3 the parameters themselves; ``offload_optimizer``
    moves states and gradient partitions to the CPU (a reduce bucket stays). ZeRO-3 keeps
    parameters below the persistence threshold whole and gathers one layer (plus the prefetch
    bucket, at most ``stage3_max_live_parameters``) at a time; ``offload_param`` keeps the
    partitions on the CPU.

    Activations peak at the start of backward: without checkpointing every layer's saved set plus
    the loss; with it each layer's input (d h per token) plus the larger of the loss and one
    recomputed layer. The model applies its output head at the N labelled positions only (a boolean
    ``logits_to_keep``), so the loss holds three fp32 [N, vocab] tensors at the start of backward
    (log_softmax's saved log-probabilities and the gradients in and out of it; the [N, vocab]
    logits in the compute dtype and their fp32 copy are freed by then), plus the final norm's fp32
    input at every position. Accumulation does not change the peak.
    """
    problems = s.problems()
    if problems:
        raise UsageError(" ".join(problems))
    zero = s.zero
    n = s.num_gpus
    d = s.dtype_bytes
    tokens_per_sample, media = sequence_length(shape, s)
    tokens = s.per_device_train_batch_size * tokens_per_sample
    labelled_per_sample = labelled_tokens(shape, s)
    labelled = s.per_device_train_batch_size * labelled_per_sample
    trainable = _trainable_count(shape, s)

    weights = _weights_bytes(shape, s)
    gathered = 0
    if zero.stage == 3:
        threshold = zero.param_persistence_threshold or 10 * shape.hidden
        persistent = sum(size for size in shape.param_sizes if size < threshold)
        frozen_bytes = weights
        weights = (0 if zero.offload_param else (frozen_bytes - persistent * d) // n) + persistent * d
        prefetch = zero.prefetch_bucket_size or 0.9 * shape.hidden**2
        gathered = int(min(zero.max_live_parameters, shape.largest_block + prefetch) * d)

    if zero.stage == 0:
        trainable_bytes = trainable * (4 + (2 if s.precision != "fp32" else 0))
        # Several GPUs without DeepSpeed: DDP's reducer keeps its buckets beside the gradients.
        gradients = trainable * 4 * (2 if n > 1 else 1)
        optimizer = trainable * 8
    else:
        shard = math.ceil(trainable / n)
        on_gpu = 0 if zero.offload_optimizer else 1
        trainable_bytes = (shard if zero.stage == 3 and not zero.offload_param else trainable) * d
        if zero.stage == 3 and zero.offload_param:
            trainable_bytes = 0
        bucket = int(zero.reduce_bucket_size or shape.hidden**2) * d
        # With optimizer offload the reduced gradient partitions go to the CPU as well.
        kept = (shard if zero.stage >= 2 else trainable) * (d + 4) * on_gpu
        gradients = bucket + kept
        optimizer = on_gpu * shard * 12

    # QLoRA without DeepSpeed keeps the embeddings and norms in fp32: the residual stream is fp32.
    residual = 4 if s.bits != 16 and zero.stage == 0 else d
    ckpt_inputs = tokens * shape.hidden * residual
    layer = tokens * _layer_bytes_per_token(shape, s)
    projector = s.per_device_train_batch_size * media * shape.projector_saved_width * d
    if not s.train_projector:
        projector = 0
    saved = shape.layers * (ckpt_inputs if s.gradient_checkpointing else layer) + projector
    gradients_inside = tokens * d * 2 * (shape.intermediate + shape.hidden)
    layer_backward = (layer if s.gradient_checkpointing else 0) + gradients_inside
    # The final norm's fp32 input at every position; three fp32 [labelled, vocab] tensors; a trained
    # head (the LLM in full) also saves its gathered input [labelled, hidden].
    head_input = labelled * shape.hidden * d if s.train_llm and not s.lora_enable else 0
    logits = tokens * shape.hidden * 4 + labelled * shape.vocab * 12 + head_input

    towers = 0
    if media:
        if s.modality == "video":
            images, tower_tokens = media // (shape.frame_tokens or 1), shape.frame_tokens or 0
        else:
            images, tower_tokens = 1, (shape.image_tokens or 0) + 1  # the tower runs the CLS token too
        images *= s.per_device_train_batch_size
        # No autograd: the tower returns every hidden state; one layer's MLP and attention
        # intermediates are alive at a time.
        towers = (
            d
            * images
            * (
                shape.tower_pixels
                + tower_tokens * shape.tower_hidden * (shape.tower_layers + 1)
                + tower_tokens * (2 * shape.tower_intermediate + 6 * shape.tower_hidden)
            )
        )
    return MemoryEstimate(
        weights=int(weights),
        gathered_weights=gathered,
        trainable=int(trainable_bytes),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(saved),
        layer_backward=int(layer_backward),
        logits=int(logits),
        towers=int(towers),
        cuda_overhead=CUDA_OVERHEAD_BYTES,
        sequence_length=tokens_per_sample,
        media_tokens=media,
        labelled_tokens=labelled_per_sample,
    )


#: The repository's DeepSpeed configs that the suggestions name, with what they set.
ZERO2_OFFLOAD = ZeroSettings(stage=2, offload_optimizer=True, source="configs/zero2_offload.json")
ZERO3_OFFLOAD = ZeroSettings(
    stage=3, offload_optimizer=True, offload_param=True, source="configs/zero3_offload.json"
)
ZERO2 = ZeroSettings(stage=2, source="configs/zero2.json")


@dataclass(frozen=True)
class Suggestion:
    """One change of settings, applied on top of the ones before it, and its predicted total."""

    flags: str
    settings: MemorySettings
    total: int

    def fits(self, gpu_memory: int) -> bool:
        """Whether the predicted total fits in `gpu_memory` bytes."""
        return self.total <= gpu_memory


def _flag_changes(before: MemorySettings, after: MemorySettings) -> str:
    """The `vidlora train` flags that turn `before` into `after`."""
    changes = []
    if after.gradient_checkpointing != before.gradient_checkpointing:
        changes.append(f"--gradient_checkpointing {after.gradient_checkpointing}")
    if after.lora_r != before.lora_r:
        changes.append(f"--lora_r {after.lora_r}")
    if after.per_device_train_batch_size != before.per_device_train_batch_size:
        changes.append(f"--per_device_train_batch_size {after.per_device_train_batch_size}")
    if after.gradient_accumulation_steps != before.gradient_accumulation_steps:
        changes.append(f"--gradient_accumulation_steps {after.gradient_accumulation_steps}")
    if after.bits != before.bits:
        changes.append(f"--bits {after.bits}")
    if after.zero != before.zero:
        changes.append(f"--deepspeed {after.zero.source}")
    return " ".join(changes)


def _checkpointing(s: MemorySettings) -> list[MemorySettings]:
    return [] if s.gradient_checkpointing else [replace(s, gradient_checkpointing=True)]


def _lower_rank(s: MemorySettings) -> list[MemorySettings]:
    """Halved ranks down to 8."""
    if not (s.lora_enable and s.train_llm):
        return []
    ranks = []
    r = s.lora_r // 2
    while r >= 8:
        ranks.append(r)
        r //= 2
    return [replace(s, lora_r=r) for r in ranks]


def _smaller_batch(s: MemorySettings) -> list[MemorySettings]:
    """Halved per-device batches, accumulation raised to keep the global batch."""
    found = []
    b, accum = s.per_device_train_batch_size, s.gradient_accumulation_steps
    while b > 1 and b % 2 == 0:
        b, accum = b // 2, accum * 2
        found.append(replace(s, per_device_train_batch_size=b, gradient_accumulation_steps=accum))
    if b > 1:  # an odd batch goes to 1 with the same global batch
        found.append(replace(s, per_device_train_batch_size=1, gradient_accumulation_steps=accum * b))
    return found


def _four_bits(s: MemorySettings) -> list[MemorySettings]:
    """QLoRA; it cannot run under ZeRO-3, so a ZeRO-3 run moves to ZeRO-2 (still sharding states)."""
    if s.bits != 16 or not (s.lora_enable and s.train_llm):
        return []
    return [replace(s, bits=4, zero=ZERO2 if s.zero.stage == 3 else s.zero)]


def _offload(s: MemorySettings) -> list[MemorySettings]:
    if s.zero.offload_optimizer:
        return []
    return [replace(s, zero=ZERO2_OFFLOAD if s.bits != 16 else ZERO3_OFFLOAD)]


Lever = Callable[[MemorySettings], list[MemorySettings]]
#: The seed's advice for out-of-memory, made automatic, in the order it is tried.
LEVERS: tuple[Lever, ...] = (_checkpointing, _lower_rank, _smaller_batch, _four_bits, _offload)


def _walk(
    shape: ModelShape, s: MemorySettings, gpu_memory: int, levers: tuple[Lever, ...]
) -> list[tuple[Lever, Suggestion]]:
    """Pull `levers` in order until the run fits, each on top of the ones before."""
    found: list[tuple[Lever, Suggestion]] = []
    current = s
    for lever in levers:
        candidates = lever(current)
        if not candidates:
            continue
        totals = [estimate(shape, c).total for c in candidates]
        fitting = [i for i, total in enumerate(totals) if total <= gpu_memory]
        pick = fitting[0] if fitting else len(candidates) - 1
        found.append(
            (lever, Suggestion(_flag_changes(current, candidates[pick]), candidates[pick], totals[pick]))
        )
        current = candidates[pick]
        if fitting:
            break
    return found


def suggest(shape: ModelShape, s: MemorySettings, gpu_memory: int) -> list[Suggestion]:
    """Settings that bring the run into `gpu_memory` bytes, one lever at a time, in order:
    gradient checkpointing, a lower LoRA rank, a smaller per-device batch with more accumulation
    (same global batch), 4-bit QLoRA, a ZeRO config with optimizer offload.

    Each lever takes its mildest value that fits; one that does not fit anyway is applied at its
    strongest and the next is tried on top. A lever that the final fit turns out not to need
    (a lower rank before a smaller batch that fits alone) is dropped again. Empty when the run
    already fits.
    """
    if estimate(shape, s).total <= gpu_memory:
        return []
    found = _walk(shape, s, gpu_memory, LEVERS)
    for lever, _ in reversed(found[:-1]):
        if not found[-1][1].fits(gpu_memory):
            break
        used = tuple(used for used, _ in found if used is not lever)
        without = _walk(shape, s, gpu_memory, used)
        if without and without[-1][1].fits(gpu_memory):
            found = without
    return [suggestion for _, suggestion in found]
