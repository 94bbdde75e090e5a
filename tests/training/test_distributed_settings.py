"""Multi-GPU settings: the DeepSpeed configs validate (fp32 gradient accumulation, ZeRO-3 residency
thresholds sized for a 7B LoRA), DDP skips the unused-parameter search, and ZeRO-3 on an older
DeepSpeed falls back to re-entrant checkpointing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vidlora.args import ZERO3_NON_REENTRANT_DEEPSPEED, checkpointing_kwargs, parse_train_args

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))
# What the Trainer fills in for "auto" (HfTrainerDeepSpeedConfig), with bf16 on.
AUTO = {
    "train_micro_batch_size_per_gpu": 1,
    "train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "reduce_bucket_size": 4096 * 4096,
    "stage3_prefetch_bucket_size": int(0.9 * 4096 * 4096),
    "stage3_param_persistence_threshold": 10 * 4096,
}
# Llama-7B / CLIP ViT-L sizes (reference/videollava-facts.md), counted by hand.
HIDDEN, FFN, TOWER_HIDDEN, LORA_R = 4096, 11008, 1024, 128


def _filled(config: dict) -> dict:
    config = copy.deepcopy(config)

    def fill(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                fill(value)
            elif value == "auto":
                node[key] = AUTO.get(key, False)  # fp16/bf16 "enabled": off, then bf16 on below

    fill(config)
    config["bf16"]["enabled"] = True
    return config


def test_all_four_configs_are_there():
    assert [p.name for p in CONFIGS] == [
        "zero2.json",
        "zero2_offload.json",
        "zero3.json",
        "zero3_offload.json",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_accumulates_gradients_in_fp32(path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig, DtypeEnum

    raw = json.loads(path.read_text())
    assert raw["data_types"] == {"grad_accum_dtype": "fp32"}
    config = DeepSpeedConfig(_filled(raw))
    assert config.zero_optimization_stage == raw["zero_optimization"]["stage"]
    # What the engine turns it into (DeepSpeedEngine.get_data_types), beside bf16 weights.
    assert DtypeEnum(config.grad_accum_dtype).value == torch.float32
    assert config.bfloat16_config.enabled


def test_zero3_keeps_lora_and_norms_resident_and_prefetches_a_layer():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    zero = DeepSpeedConfig(_filled(json.loads((CONFIGS[2]).read_text()))).zero_config
    threshold = zero.param_persistence_threshold
    # Resident (not partitioned): attention LoRA A/B at r=128, the norms and biases.
    assert threshold >= LORA_R * HIDDEN > HIDDEN
    # Partitioned: the towers' 1024x1024 attention matrices and every frozen LLM matrix.
    assert threshold < TOWER_HIDDEN * TOWER_HIDDEN < HIDDEN * HIDDEN
    # One 7B decoder layer (4 attention + 3 MLP matrices + 2 norms) is gathered ahead in one bucket.
    layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN
    assert layer == 202_383_360
    assert zero.prefetch_bucket_size >= layer
    assert zero.max_live_parameters >= 2 * layer


def test_ddp_skips_the_unused_parameter_search_unless_asked(original_argv, tmp_path):
    _, _, train = parse_train_args(original_argv(tmp_path / "a"), cuda_available=False)
    assert train.ddp_find_unused_parameters is False
    argv = [*original_argv(tmp_path / "b"), "--ddp_find_unused_parameters", "True"]
    _, _, train = parse_train_args(argv, cuda_available=False)
    assert train.ddp_find_unused_parameters is True


OLD = "0.18.2"


@pytest.mark.parametrize(
    ("kwargs", "stage", "version", "expected"),
    [
        (None, 3, OLD, {"use_reentrant": True}),
        ({"every_n_layers": 2}, 3, OLD, {"every_n_layers": 2, "use_reentrant": True}),
        ({"use_reentrant": False}, 3, OLD, {"use_reentrant": False}),  # the user's choice stands
        (None, 3, ZERO3_NON_REENTRANT_DEEPSPEED, None),
        (None, 3, "0.20.0", None),
        (None, 2, OLD, None),  # ZeRO-2 does not partition parameters
        (None, None, OLD, None),
        (None, 3, None, None),  # no DeepSpeed installed
    ],
)
def test_zero3_on_an_older_deepspeed_checkpoints_re_entrantly(kwargs, stage, version, expected):
    assert checkpointing_kwargs(kwargs, zero_stage=stage, deepspeed_version=version) == expected


def test_fsdp_is_refused_before_anything_loads(original_argv, tmp_path):
    from vidlora.args import ArgumentProblems

    argv = [*original_argv(tmp_path / "out"), "--fsdp", "full_shard auto_wrap"]
    with pytest.raises(ArgumentProblems) as caught:
        parse_train_args(argv, cuda_available=False)
    assert caught.value.problems == [
        "--fsdp 'full_shard auto_wrap' is not supported yet; use --deepspeed configs/zero3.json (parameters "
        "sharded across GPUs, tested) or configs/zero2.json."
    ]
