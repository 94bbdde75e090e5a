"""A 2-process DeepSpeed ZeRO-3 run of a tiny HF Trainer job on the CPU (gloo), as the original launches it.

The test launches this same file with the ``deepspeed`` launcher; run as a script, the file is the
worker: a tiny LLaMA built under ``zero.Init`` (after ``init_deepspeed_distributed``), LoRA on
q/v, bf16, configs/zero3.json, the vidlora callbacks, checkpoints every 2 steps, then
``save_model``. DeepSpeed's shared-memory comm op is JIT-compiled once per machine (~60 s; `make
setup` does it, cached in ~/.cache/torch_extensions); a start then takes ~20-25 s.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ZERO3 = ROOT / "configs" / "zero3.json"
MAX_STEPS = 4
HIDDEN, VOCAB, RANK = 16, 64, 4


def _worker(output_dir: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from vidlora.training.callbacks import (
        LossCurveWriter,
        NonFiniteStop,
        TokenCountLogger,
        extend_logs,
        observe_micro_batch,
    )
    from vidlora.training.distributed import init_deepspeed_distributed

    class ObservingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            observe_micro_batch(self.callback_handler.callbacks, self.state, inputs, loss)
            return loss

        def log(self, logs, start_time=None):  # what VidloraTrainer.log does
            extend_logs(self.callback_handler.callbacks, self.args, self.state, logs)
            super().log(logs, start_time)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int):
            labels = self.ids[i].clone()
            labels[:4] = -100  # a "prompt" that is not trained: 12 - 4 = 8 targets per row
            return {"input_ids": self.ids[i], "labels": labels}

    args = TrainingArguments(
        output_dir=output_dir,
        deepspeed=str(ZERO3),
        use_cpu=True,
        bf16=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=MAX_STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        disable_tqdm=True,
        seed=0,
    )
    assert init_deepspeed_distributed(args.deepspeed, args.ddp_timeout)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM._from_config(config)  # partitioned at construction by zero.Init
    partitioned = model.model.embed_tokens.weight.numel() == 0
    model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    stop, tokens = NonFiniteStop(), TokenCountLogger()
    trainer = ObservingTrainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[stop, tokens, LossCurveWriter()]
    )
    trainer.train()
    stop.raise_if_failed()
    trainer.save_model(os.path.join(output_dir, "final"))
    if args.process_index == 0:
        report = {
            "partitioned_at_init": partitioned,
            "world_size": args.world_size,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "trained_tokens": [
                h["trained_tokens"] for h in trainer.state.log_history if "trained_tokens" in h
            ],
        }
        Path(output_dir, "report.json").write_text(json.dumps(report))


def test_launcher_env_is_required_before_deepspeed_starts(monkeypatch):
    from vidlora.training.distributed import (
        LauncherRequired,
        init_deepspeed_distributed,
        missing_launcher_env,
    )

    assert missing_launcher_env({}) == ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    assert (
        missing_launcher_env(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
        )
        == []
    )
    assert init_deepspeed_distributed(None) is False
    monkeypatch.setenv("RANK", "0")
    for name in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        LauncherRequired, match=r"missing environment: LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"
    ):
        init_deepspeed_distributed(str(ZERO3))


@pytest.mark.slow
def test_zero3_two_cpu_processes_train_save_and_gather(tmp_path):
    from safetensors import safe_open

    from launch import free_port, launcher, run_launch

    run_launch(
        [launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), __file__, str(tmp_path)]
    )

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["partitioned_at_init"] and report["world_size"] == 2
    assert len(report["losses"]) == MAX_STEPS and all(0 < loss < 10 for loss in report["losses"])
    # 2 ranks x batch 2 x accumulation 2 rows of 8 targets each (12 tokens, 4 prompt labels)
    assert report["trained_tokens"] == [2 * 2 * 2 * 8] * MAX_STEPS
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stage3_gather_16bit_weights_on_model_save: the adapter on disk is whole, not a rank's shard
    with safe_open(str(tmp_path / "final" / "adapter_model.safetensors"), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert len(shapes) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(shape in {(RANK, HIDDEN), (HIDDEN, RANK)} for shape in shapes.values()), shapes


if __name__ == "__main__":
    _worker(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
