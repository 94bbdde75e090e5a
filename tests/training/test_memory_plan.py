"""`vidlora plan`'s memory estimate: against the measured peak of real training steps, and pinned
for Video-LLaVA-7B with hand-checked terms."""

from __future__ import annotations

import functools
import json
import math
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vidlora.cli import main as cli_main
from vidlora.model.loading import load_pretrained
from vidlora.model.lora import apply_recipe, build_lora_config
from vidlora.model.presets import build_preset
from vidlora.training.memory import (
    GIB,
    MemorySettings,
    ZeroSettings,
    estimate,
    read_model_shape,
    read_zero_config,
    suggest,
)

MIB = 2**20
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages while active.

    Every tensor an aten op returns is recorded by its storage (views share one), with a
    finalizer that subtracts its bytes when the storage dies; tensors that exist before (weights,
    optimizer states, the batch) are recorded at the start. This counts exactly what the caching
    allocator would have to hold on a GPU, without the allocator's rounding and reserve (which the
    plan keeps as its separate CUDA-overhead term) and without the CPU's RSS noise.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        for tensor in existing:
            self._track(tensor)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def _track(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()  # one Python object per storage (PyObject preservation)
        key = id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._track(tensor)
        return out


# Large enough that activations, logits and weights are each megabytes (not noise), small enough
# for a CPU step in about a second: LLaMA 128 x 4 layers, FFN 352, vocab 2048, tiny towers.
_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
}


def measure_step(settings: MemorySettings, answer_tokens: int | None = None) -> tuple[int, int, torch.Tensor]:
    """(peak live tensor bytes of the second training step, bytes of the model and optimizer before
    it, the batch's labels) for the tiny preset with `_TEXT` trained under `settings` (fp32 or bf16
    autocast, one video per sample, every text token used).

    Labelled: every text token after a 5-token prompt and the video, or with `answer_tokens` only
    the last that many. The second step is measured so that AdamW's states exist, as in every step
    of a run but the first. The step is the Trainer's: forward with labels, backward, fused AdamW,
    zero_grad(None).
    """
    model, _ = build_preset("tiny", text_config=_TEXT)
    if settings.precision == "bf16":
        model.to(torch.bfloat16)  # the recipe's load dtype under --bf16
    config = model.config
    lora = build_lora_config(model, settings.lora_r, 2 * settings.lora_r, settings.lora_dropout)
    trained = apply_recipe(model, lora)
    for param in trained.parameters():  # what set_trainable_dtype does without DeepSpeed
        if param.requires_grad:
            param.data = param.data.float()
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    trained.train()
    b = settings.per_device_train_batch_size
    media = config.video_seq_length
    length = settings.model_max_length - 1 + media
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (b, length), generator=generator)
    ids[:, 5 : 5 + media] = config.video_token_id
    labels = ids.clone()
    labels[:, : 5 + media if answer_tokens is None else length - answer_tokens] = -100
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(b, config.num_frames, 3, 64, 64, generator=generator),
    }
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> None:
        # The Trainer's mixed precision on the CPU under --bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
            loss = trained(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    states = [t for state in optimizer.state.values() for t in state.values()]
    existing = [*trained.parameters(), *trained.buffers(), *batch.values(), *states]
    with LiveTensorBytes(existing) as tracker:
        before = tracker.current
        step()
    return tracker.peak, before - sum(t.untyped_storage().nbytes() for t in batch.values()), labels


def labelled_per_sample(labels: torch.Tensor) -> int:
    """Positions per sample that take a loss, counted from the labels: position t is scored against
    label t + 1, so a label counts unless it is -100 or the first (every sample has the same count)."""
    counts = (labels[:, 1:] != -100).sum(dim=1).tolist()
    assert len(set(counts)) == 1, counts
    return counts[0]


def _tiny_shape():
    model, _ = build_preset("tiny", device="meta", text_config=_TEXT)
    return read_model_shape(model)


@functools.cache
def measured(settings: MemorySettings, answer_tokens: int | None = None) -> tuple[int, int, int]:
    """`measure_step` once per arguments: (peak, bytes before, labelled positions per sample counted
    from the batch's labels)."""
    peak, before, labels = measure_step(settings, answer_tokens)
    return peak, before, labelled_per_sample(labels)


def _tiny_settings(**changes) -> MemorySettings:
    """The measured runs: LoRA r 8 with dropout, on the CPU (its dropout keeps a noise tensor where
    CUDA keeps a 1-byte mask: ``device="cpu"`` says so)."""
    return MemorySettings(**{"lora_r": 8, "device": "cpu", "per_device_train_batch_size": 2, **changes})


@pytest.mark.parametrize(
    ("precision", "checkpointing", "batch", "text_tokens"),
    [
        ("fp32", False, 2, 200),
        ("bf16", True, 2, 200),
        pytest.param("bf16", False, 2, 400, marks=pytest.mark.slow),
        pytest.param("fp32", True, 2, 400, marks=pytest.mark.slow),
        pytest.param("fp32", True, 1, 200, marks=pytest.mark.slow),
    ],
    ids=["fp32", "bf16-checkpointing", "bf16", "fp32-checkpointing", "fp32-checkpointing-short"],
)
def test_prediction_matches_the_measured_peak_of_a_training_step(
    precision, checkpointing, batch, text_tokens
):
    """Within 10 % with the batch's own labelled count (dropping the activation terms would miss
    it); 10 % leaves room for op-level changes in torch/transformers/peft."""
    settings = _tiny_settings(
        precision=precision,
        per_device_train_batch_size=batch,
        model_max_length=text_tokens,
        gradient_checkpointing=checkpointing,
    )
    peak, before, labelled = measured(settings)
    assert labelled == text_tokens - 6  # after the 5-token prompt and the video; the last scores nothing
    predicted = estimate(_tiny_shape(), replace(settings, labelled_tokens=labelled))
    # Before the step: weights, trainables and AdamW states (autocast's copies come in the forward).
    autocast_copies = predicted.trainable // 3 if precision == "bf16" else 0
    assert predicted.weights + predicted.trainable - autocast_copies + predicted.optimizer == pytest.approx(
        before, rel=0.02
    )
    assert predicted.tensors == pytest.approx(peak, rel=0.10), (predicted, peak / MIB)
    # The test can tell: without the activation terms the prediction would miss the 10 %.
    activation_terms = predicted.activations + max(predicted.logits, predicted.layer_backward)
    assert predicted.tensors - activation_terms < 0.9 * peak


def test_the_labelled_count_changes_the_measured_peak_as_predicted():
    """The same batch with every answer token labelled, and with only the last 100: the loss runs on
    the labelled positions only, so the peak (at the start of backward: three fp32 [N, vocab]
    tensors) drops by 3 x 4 B x vocab per unlabelled position, counted by hand."""
    settings = _tiny_settings(precision="fp32", model_max_length=200)
    shape = _tiny_shape()
    full, _, labelled_full = measured(settings)
    fewer, _, labelled_fewer = measured(settings, answer_tokens=100)
    assert (labelled_full, labelled_fewer) == (194, 100)
    by_hand = 2 * (194 - 100) * 3 * 4 * 2048  # batch 2, vocab 2048
    assert full - fewer == pytest.approx(by_hand, rel=0.10)
    predicted = [estimate(shape, replace(settings, labelled_tokens=n)) for n in (194, 100)]
    assert predicted[0].logits - predicted[1].logits == by_hand
    assert predicted[0].tensors - predicted[1].tensors == by_hand  # the loss is the peak in both
    assert predicted[1].tensors == pytest.approx(fewer, rel=0.10)
    # Charged for every position instead (the full [B, L, vocab] logits), it would miss the 10 %.
    tokens = 2 * predicted[0].sequence_length
    assert predicted[1].tensors + (tokens - 2 * 100) * 3 * 4 * 2048 > 1.10 * fewer


def test_the_default_labels_every_text_token():
    """Without a count, every text token of the sample takes a loss (the media never do): the upper
    bound; a count above it cannot be."""
    shape = _tiny_shape()
    e = estimate(shape, _tiny_settings(model_max_length=200))
    assert (e.sequence_length, e.media_tokens, e.labelled_tokens) == (199 + 136, 136, 199)
    assert e.logits == 2 * 335 * 128 * 4 + 2 * 199 * 2048 * 12  # final norm's fp32 input + the loss
    # The LLM trained in full: the head trains, so it also saves its gathered fp32 input [N, hidden].
    full = estimate(shape, _tiny_settings(model_max_length=200, lora_enable=False, precision="fp32"))
    assert full.logits == e.logits + 2 * 199 * 128 * 4
    with pytest.raises(ValueError, match="--labelled_tokens 200: a sample has only 199 text tokens"):
        estimate(shape, _tiny_settings(model_max_length=200, labelled_tokens=200))
    with pytest.raises(ValueError, match="--labelled_tokens -1"):
        estimate(shape, _tiny_settings(labelled_tokens=-1))


@pytest.mark.slow
def test_the_batch_changes_the_measured_peak_as_predicted():
    """The difference between two batch sizes (weights cancel out) follows the prediction too."""
    shape = _tiny_shape()
    base = _tiny_settings(precision="fp32", model_max_length=400)
    variant = replace(base, per_device_train_batch_size=1)
    (peak_base, _, labelled), (peak_variant, _, _) = measured(base), measured(variant)
    predicted = [estimate(shape, replace(s, labelled_tokens=labelled)).tensors for s in (base, variant)]
    assert predicted[0] - predicted[1] == pytest.approx(peak_base - peak_variant, rel=0.10)


# ---- videollava-7b, the seed's settings ----------------------------------------------------------


@pytest.fixture(scope="module")
def shape_7b():
    return read_model_shape(load_pretrained("videollava-7b", device="meta").model)


SEED = MemorySettings(
    lora_enable=True,
    lora_r=128,
    precision="bf16",
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    model_max_length=2048,
    gradient_checkpointing=True,
)
N_LORA_128 = 319_815_680  # `vidlora info --lora_r 128`
PROJECTOR = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu, with biases


def test_7b_seed_settings_on_one_gpu_hand_checked(shape_7b):
    e = estimate(shape_7b, SEED)
    assert shape_7b.lora_per_rank * 128 == N_LORA_128
    assert shape_7b.parts["mm_projector"] == PROJECTOR
    frozen = shape_7b.base_params - PROJECTOR
    assert e.weights == frozen * 2  # bf16
    trainable = N_LORA_128 + PROJECTOR
    assert e.trainable == trainable * (4 + 2)  # fp32 + autocast's bf16 copy
    assert e.gradients == trainable * 4
    assert e.optimizer == trainable * 8  # two fp32 moments; the fp32 parameter is the master
    assert e.sequence_length == 2047 + 8 * 257 and e.media_tokens == 2056
    tokens = 4103
    assert e.activations == 32 * tokens * 4096 * 2 + 2056 * (1024 + 4096 + 4096) * 2
    # The final norm's fp32 input at every position; the loss's three fp32 [N, vocab] tensors at the
    # labelled positions only: by default every text token (2047; the video's 2056 take no loss).
    assert e.labelled_tokens == 2047
    assert e.logits == tokens * 4096 * 4 + 2047 * 32003 * 12 == 853_345_244
    assert e.cuda_overhead == GIB
    # The whole breakdown, pinned (GB = 2**30 bytes).
    assert e.breakdown_gb() == {
        "weights": 13.87,
        "gathered_weights": 0.0,
        "trainable": 1.9,
        "gradients": 1.27,
        "optimizer": 2.54,
        "activations": 1.04,
        "layer_backward": 1.15,
        "logits": 0.79,
        "towers": 0.16,
        "cuda_overhead": 1.0,
    }
    # One layer's backward (1.15) now outweighs the loss (0.79) at the peak.
    assert e.total == e.persistent + e.activations + e.layer_backward + GIB
    assert round(e.total / GIB, 2) == 22.77
    # Answers of ~100 tokens: the loss shrinks, the peak stays (the layer backward decides it).
    short = estimate(shape_7b, replace(SEED, labelled_tokens=100))
    assert short.logits == tokens * 4096 * 4 + 100 * 32003 * 12
    assert short.total == e.total


def test_7b_zero3_on_8_gpus_partitions_weights_and_states(shape_7b):
    zero = read_zero_config(CONFIGS / "zero3.json")
    assert (zero.stage, zero.offload_optimizer, zero.offload_param, zero.max_live_parameters) == (
        3,
        False,
        False,
        1e9,
    )
    assert (zero.param_persistence_threshold, zero.prefetch_bucket_size) == (1e6, 2.5e8)
    s = MemorySettings(**{**SEED.__dict__, "num_gpus": 8, "zero": zero})
    e = estimate(shape_7b, s)
    trainable = N_LORA_128 + PROJECTOR
    shard = math.ceil(trainable / 8)
    assert e.optimizer == shard * 12
    assert e.trainable == shard * 2
    assert e.gradients == shard * (2 + 4) + 4096**2 * 2  # + one reduce bucket (auto: hidden**2)
    persistent = sum(n for n in shape_7b.param_sizes if n < 1e6)  # the config's threshold
    assert e.weights == (((shape_7b.base_params - PROJECTOR) * 2 - persistent * 2) // 8) + persistent * 2
    decoder_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert shape_7b.largest_block == decoder_layer
    assert e.gathered_weights == (decoder_layer + 250_000_000) * 2  # + the config's prefetch bucket
    assert e.total < estimate(shape_7b, SEED).total


def test_4bit_weights_count_nf4_with_double_quant(shape_7b):
    s = MemorySettings(**{**SEED.__dict__, "bits": 4})
    e = estimate(shape_7b, s)
    q = shape_7b.quantizable
    assert q == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    llm = shape_7b.parts["language_model"]
    towers = shape_7b.base_params - llm - PROJECTOR
    # 7B layers: every size a multiple of 64 * 256; per layer 1 + 256 + 16 fp32 constants.
    nf4 = q // 2 + q // 64 + 4 * q // (64 * 256) + 32 * 7 * 4 * (256 + 1 + 16)
    assert e.weights == towers * 2 + nf4 + (llm - q) * 4  # embeddings, norms, lm_head in fp32
    assert e.activations == 32 * 4103 * 4096 * 4 + 2056 * (1024 + 4096 + 4096) * 2  # fp32 residual stream
    assert e.total < estimate(shape_7b, SEED).total - 6 * GIB


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_match_what_bitsandbytes_allocates(bits):
    """The LLM quantized by the recipe's own quantizer on the CPU: every stored tensor (packed
    weights with absmax, double-quant constants and codes, or int8 weights with their row scales;
    fp32 embeddings/norms/head; bf16 towers and projector) counted once, against the weights term
    (+ the bf16 projector, which trains)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from vidlora.model.quantize import quantize_language_model

    model, _ = build_preset("tiny", text_config=_TEXT)
    model.to(torch.bfloat16)
    shape = read_model_shape(model)
    quantize_language_model(model, bits=bits, compute_dtype=torch.bfloat16, double_quant=True, device="cpu")
    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        elif isinstance(module, bnb.nn.Linear8bitLt):
            tensors.append(module.weight.SCB)
    storages = {id(x.untyped_storage()): x.untyped_storage().nbytes() for x in tensors}
    predicted = estimate(shape, MemorySettings(lora_r=8, bits=bits)).weights + shape.parts["mm_projector"] * 2
    assert predicted == sum(storages.values())


def test_suggestions_follow_the_seeds_advice_in_order(shape_7b):
    s = MemorySettings(**{**SEED.__dict__, "gradient_checkpointing": False, "per_device_train_batch_size": 4})
    first = suggest(shape_7b, s, 40 * GIB)
    assert [x.flags for x in first] == ["--gradient_checkpointing True"]
    assert first[0].fits(40 * GIB) and first[0].total == estimate(shape_7b, first[0].settings).total
    # 12 GB: nothing before 4 bits is enough; each lever applies on top of the previous ones,
    # and the global batch stays 4 x 8.
    steps = suggest(shape_7b, s, 12 * GIB)
    assert [x.flags.split()[0] for x in steps] == [
        "--gradient_checkpointing",
        "--lora_r",
        "--per_device_train_batch_size",
        "--bits",
    ]
    assert steps[1].settings.lora_r == 8 and not steps[1].fits(12 * GIB)
    assert steps[2].flags == "--per_device_train_batch_size 1 --gradient_accumulation_steps 32"
    assert steps[2].settings.global_batch == s.global_batch
    assert steps[-1].fits(12 * GIB)
    totals = [x.total for x in steps]
    assert totals == sorted(totals, reverse=True)
    assert suggest(shape_7b, SEED, 80 * GIB) == []


def test_a_lever_the_fit_does_not_need_is_dropped(shape_7b):
    """Batch 8 on 24 GB: checkpointing is not enough and the rank goes down to 8 on the way, but the
    smaller batch then fits at rank 128 too, so the rank stays."""
    s = MemorySettings(**{**SEED.__dict__, "gradient_checkpointing": False, "per_device_train_batch_size": 8,
                          "gradient_accumulation_steps": 1})  # fmt: skip
    steps = suggest(shape_7b, s, 24 * GIB)
    assert [x.flags for x in steps] == [
        "--gradient_checkpointing True",
        "--per_device_train_batch_size 1 --gradient_accumulation_steps 8",
    ]
    assert steps[-1].settings.lora_r == 128 and steps[-1].fits(24 * GIB)
    # Batch 2 at rank 8 would fit too; at rank 128 it does not, which is why batch 1 is picked.
    rank_8_batch_2 = MemorySettings(
        **{**steps[0].settings.__dict__, "lora_r": 8, "per_device_train_batch_size": 2}
    )
    rank_128_batch_2 = MemorySettings(**{**steps[0].settings.__dict__, "per_device_train_batch_size": 2})
    assert estimate(shape_7b, rank_8_batch_2).total <= 24 * GIB < estimate(shape_7b, rank_128_batch_2).total


def test_zero_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(ValueError, match=r"ds\.json.*stage must be"):
        read_zero_config(bad)
    bad.write_text('{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "many"}}')
    with pytest.raises(ValueError, match=r"ds\.json.*stage3_max_live_parameters"):
        read_zero_config(bad)
    offload = CONFIGS / "zero3_offload.json"
    assert read_zero_config(offload) == ZeroSettings(
        stage=3, offload_optimizer=True, offload_param=True, source=str(offload)
    )


# ---- the command ---------------------------------------------------------------------------------


def test_plan_command_json(capsys):
    flags = ["--model_name_or_path", "videollava-7b", "--lora_enable", "True", "--lora_r", "128"]
    flags += ["--lora_alpha", "256", "--bf16", "True", "--gradient_checkpointing", "True", "--tf32", "True"]
    flags += ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8"]
    assert cli_main(["plan", *flags, "--gpu_memory", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"settings", "breakdown", "total_gb", "gpu_memory_gb", "fits", "suggestions"}
    assert out["total_gb"] == 22.77 and out["fits"] is True and out["suggestions"] == []
    assert out["settings"]["lora_r"] == 128 and out["settings"]["sequence_length"] == 4103
    assert out["breakdown"]["weights"] == 13.87
    assert out["settings"]["labelled_tokens"] == 2047 and out["settings"]["labelled_tokens_upper_bound"]
    assert cli_main(["plan", *flags, "--labelled_tokens", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["labelled_tokens"] == 100 and not out["settings"]["labelled_tokens_upper_bound"]
    assert out["breakdown"]["logits"] == round((4103 * 4096 * 4 + 100 * 32003 * 12) / GIB, 2) == 0.1


def test_plan_command_table_for_tiny_and_errors(capsys):
    assert cli_main(["plan", "--gpu_memory", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: LLM trained in full, fp32") and "| **peak per GPU** |" in out
    assert "does NOT fit" in out  # 1 GB: the CUDA overhead alone takes it
    assert "2047 of them labelled (every text token: an upper bound, --labelled_tokens N to set)" in out
    assert cli_main(["plan", "--labelled_tokens", "2048"]) == 2
    assert "--labelled_tokens 2048: a sample has only 2047 text tokens" in capsys.readouterr().err
    assert cli_main(["plan", "--labelled_tokens", "-1"]) == 2
    assert "--labelled_tokens -1: must be at least 0" in capsys.readouterr().err
    assert cli_main(["plan", "--lora_r", "8", "--no_such_flag", "1", "--num_gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert "unknown argument '--no_such_flag'" in err and "--num_gpus 0" in err
    assert (
        cli_main(["plan", "--bits", "4", "--lora_enable", "True", "--deepspeed", str(CONFIGS / "zero3.json")])
        == 2
    )
    assert "ZeRO-3" in capsys.readouterr().err
    assert cli_main(["plan", "--modality", "image", "--X", "Video"]) == 2
    assert "--X Video does not enable it" in capsys.readouterr().err
    assert cli_main(["plan", "--X", "Image", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["media_tokens"] == 16  # (64 // 16) ** 2


def test_plan_takes_the_seed_command_as_pasted(original_argv, tmp_path, capsys):
    """Every flag of the original's command (here on the tiny model) is accepted; nothing is written."""
    out = tmp_path / "out"
    assert cli_main(["plan", *original_argv(out), "--num_gpus", "2", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["lora_r"] == 8 and settings["gradient_checkpointing"] is True
    assert settings["global_batch"] == 2 * 2 * 2 and settings["modality"] == "video"
    assert not out.exists()


def test_ddp_buckets_and_invalid_settings(shape_7b):
    one = estimate(shape_7b, SEED)
    ddp = estimate(shape_7b, MemorySettings(**{**SEED.__dict__, "num_gpus": 8}))
    assert ddp.gradients == 2 * one.gradients == (N_LORA_128 + PROJECTOR) * 8
    assert ddp.total - one.total == one.gradients
    with pytest.raises(ValueError, match="--bits 4 with ZeRO-3"):
        estimate(shape_7b, MemorySettings(bits=4, zero=ZeroSettings(stage=3)))
