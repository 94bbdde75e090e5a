"""A NaN/inf injected into a real run of the original's command stops it naming the step and the
batch's sample ids; the last good checkpoint is the one saved before, and a rerun resumes from it
with a lower learning rate.

Two injections, both through `vidlora.train.main` (exit status 1):

* a sample whose pixels are inf (the dataset hands out `train_00012`'s media as inf): its loss is
  NaN, so the message names that micro-batch, and only it;
* a backward hook writing NaN into one LoRA gradient at step 2: the loss stays finite, the
  gradient norm is NaN, and the message names the step's whole batch (its two micro-batches).

The expected ids are the grouped sampler's order for the session dataset (seed 42, per-device
batch 2 x accumulation 2: 4 samples per step), written out below; the dataset wrapper records the
order in which the samples were actually read (the DataLoader reads one micro-batch ahead), and
the two must agree. The last good checkpoint is
loaded for inference and compared with the weights the run held when it saved it (a callback
joins the run's own callbacks to record them).

Until the lead's rerun=resume lands, the rerun passes `--resume_from_checkpoint` explicitly; once
merged, the same test becomes a plain rerun of the command.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from vidlora.data.dataset import SupervisedDataset
from vidlora.infer.load import load_for_inference
from vidlora.train import main

# The grouped sampler's first four steps (epoch 0, seed 42): one modality group per step.
STEP_BATCHES = {
    1: [["train_00011", "train_00005"], ["train_00011", "train_00011"]],  # text only (padded)
    2: [["train_00013", "train_00008"], ["train_00006", "train_00001"]],
    3: [["train_00009", "train_00002"], ["train_00014", "train_00012"]],
    4: [["train_00007", "train_00015"], ["train_00010", "train_00002"]],
}
MAX_STEPS = 4
POISONED_SAMPLE, POISONED_SAMPLE_STEP = "train_00012", 3  # step 3, second micro-batch
POISONED_GRAD_STEP = 2
LEARNING_RATE, LOWER_LEARNING_RATE = 2e-4, 1e-4


def _flags(original_argv, out: Path, **overrides: str | None) -> list[str]:
    """The original's command, saving every step, no evaluation, a fixed number of steps, no warmup
    (so the cosine schedule's factors are easy to write down: 0.5 * (1 + cos(pi * (step - 1) / 4)))."""
    flags: dict[str, str | None] = {
        "evaluation_strategy": "no", "save_steps": "1", "save_total_limit": None, "max_steps": str(MAX_STEPS),
        "warmup_ratio": "0", "learning_rate": str(LEARNING_RATE), "disable_tqdm": "True",
    }  # fmt: skip
    return original_argv(out, **{**flags, **overrides})


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def _trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _assert_checkpoint_holds(directory: Path, want: dict[str, torch.Tensor]) -> None:
    """The checkpoint, loaded for inference, holds exactly ``want`` (adapter + projector, by name)."""
    loaded = dict(load_for_inference(str(directory)).model.named_parameters())
    assert want and sorted(want) == sorted(n for n in loaded if ".lora_" in n or ".mm_projector." in n)
    for name, tensor in want.items():
        assert torch.equal(loaded[name].detach(), tensor), name


class _Watch(TrainerCallback):
    """What a run did, seen from inside: the trainable parameters at each checkpoint save, the
    learning rate each optimizer step used (read from the optimizer right before it steps), and
    the final log history."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.used_lrs: dict[int, list[float]] = {}
        self.log_history: list[dict] = []

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = _trainables(model)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used_lrs[state.global_step + 1] = [group["lr"] for group in optimizer.param_groups]

    def on_train_end(self, args, state, control, **kwargs):
        self.log_history = list(state.log_history)


@dataclass
class Run:
    out: Path
    status: int
    stderr: str
    fetched: list[str]
    watch: _Watch

    @property
    def message(self) -> str:
        return next(
            line for line in self.stderr.splitlines() if line.startswith("vidlora train: training stopped")
        )

    def log(self, key: str) -> dict[int, float]:
        return {e["step"]: e[key] for e in self.watch.log_history if key in e}


def _run_main(monkeypatch: pytest.MonkeyPatch, argv: list[str], poison: str | None = None) -> Run:
    """`vidlora.train.main(argv)`, watched: a :class:`_Watch` joins the run's callbacks, the datasets
    record every item they hand out (by id), and ``poison``'s media come out as inf."""
    from vidlora.training import recipe

    watch = _Watch()
    monkeypatch.setattr(
        recipe, "build_trainer", functools.partial(recipe.build_trainer, extra_callbacks=[watch])
    )
    fetched: list[str] = []
    getitem = SupervisedDataset.__getitem__

    def recording_getitem(self, index):
        item = getitem(self, index)
        fetched.append(item["id"])
        if item["id"] == poison:
            for key in ("pixel_values_videos", "pixel_values_images"):
                if key in item:
                    item[key] = torch.full_like(item[key], math.inf)
        return item

    monkeypatch.setattr(SupervisedDataset, "__getitem__", recording_getitem)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)
    return Run(Path(argv[argv.index("--output_dir") + 1]), status, stderr.getvalue(), fetched, watch)


@pytest.fixture(scope="module")
def poisoned_sample_run(original_argv, tmp_path_factory) -> Run:
    """`vidlora train` with ``POISONED_SAMPLE``'s pixels inf."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _run_main(
            monkeypatch, _flags(original_argv, tmp_path_factory.mktemp("poisoned")), POISONED_SAMPLE
        )


def _step_ids(*steps: int) -> list[str]:
    return [i for step in steps for micro in STEP_BATCHES[step] for i in micro]


def test_a_sample_with_inf_pixels_stops_the_run_naming_its_micro_batch(poisoned_sample_run):
    run, k = poisoned_sample_run, POISONED_SAMPLE_STEP
    assert run.status == 1
    # The run read steps 1..k in the sampler's order, and the DataLoader one micro-batch ahead.
    assert run.fetched == _step_ids(*range(1, k + 1)) + STEP_BATCHES[k + 1][0]
    assert POISONED_SAMPLE in STEP_BATCHES[k][1] and POISONED_SAMPLE not in _step_ids(*range(1, k))
    assert run.message.startswith(
        f"vidlora train: training stopped at step {k}: the training loss is nan (the micro-batch held samples "
        "'train_00014', 'train_00012'). "
    )
    assert f"the latest checkpoint, checkpoint-{k - 1}, is from before the failure" in run.message
    assert _checkpoints(run.out) == [f"checkpoint-{s}" for s in range(1, k)]
    assert not (run.out / "adapter_model.safetensors").exists()  # no final save of the broken weights
    # The last good checkpoint loads, holding the weights the run had when it saved it.
    assert sorted(run.watch.saved) == list(range(1, k))
    _assert_checkpoint_holds(run.out / f"checkpoint-{k - 1}", run.watch.saved[k - 1])


def test_a_nan_gradient_stops_the_run_naming_the_steps_batch(
    original_argv, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    from vidlora.training import recipe

    k = POISONED_GRAD_STEP
    backward_calls: list[bool] = []  # one entry per backward through the hooked gradient: poisoned?
    apply = recipe.apply_training_recipe

    def apply_and_hook(*args, **kwargs):
        model = apply(*args, **kwargs)
        param = next(p for n, p in model.named_parameters() if ".lora_B." in n)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            # Micro-batches 2k-1 and 2k make step k (accumulation 2): poison its first.
            backward_calls.append(len(backward_calls) + 1 == 2 * k - 1)
            return torch.full_like(grad, math.nan) if backward_calls[-1] else grad

        param.register_hook(poison)
        return model

    monkeypatch.setattr(recipe, "apply_training_recipe", apply_and_hook)
    run = _run_main(monkeypatch, _flags(original_argv, tmp_path / "out"))

    assert run.status == 1
    assert backward_calls == [False, False, True, False]  # steps 1 and 2, then it stopped
    assert run.fetched == _step_ids(1, 2) + STEP_BATCHES[3][0]
    ids = ", ".join(repr(i) for i in _step_ids(k))
    assert run.message.startswith(
        f"vidlora train: training stopped at step {k}: the gradient norm is nan (the step's batch held "
        f"samples {ids}). "
    )
    assert _checkpoints(run.out) == ["checkpoint-1"]
    assert not (run.out / "adapter_model.safetensors").exists()
    assert sorted(run.watch.saved) == [1]
    _assert_checkpoint_holds(run.out / "checkpoint-1", run.watch.saved[1])


def test_the_rerun_resumes_from_the_last_good_checkpoint_with_a_lower_learning_rate(
    poisoned_sample_run, original_argv, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog
):
    k = POISONED_SAMPLE_STEP
    out = tmp_path / "out"
    out.mkdir()
    start = out / f"checkpoint-{k - 1}"
    shutil.copytree(poisoned_sample_run.out / start.name, start)
    argv = _flags(
        original_argv, out, learning_rate=str(LOWER_LEARNING_RATE), resume_from_checkpoint=str(start)
    )
    with caplog.at_level(logging.WARNING, logger="vidlora.training"):
        run = _run_main(monkeypatch, argv)

    assert run.status == 0
    assert run.fetched[: 2 * len(STEP_BATCHES[k][0])] == _step_ids(k)  # it went on with step k's batch
    assert _checkpoints(out) == [f"checkpoint-{s}" for s in range(k - 1, MAX_STEPS + 1)]
    assert (out / "adapter_model.safetensors").is_file()  # trained to the end and saved
    # The cosine factor at step s (no warmup, 4 steps) times the base rate: the checkpoint's steps
    # ran at 2e-4, every step of the rerun at 1e-4, the first one included (what the optimizer
    # held right before stepping, and what the log shows).
    factor = {s: 0.5 * (1 + math.cos(math.pi * (s - 1) / MAX_STEPS)) for s in range(1, MAX_STEPS + 1)}
    logged = run.log("learning_rate")
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        base = LEARNING_RATE if step < k else LOWER_LEARNING_RATE
        assert logged[step] == pytest.approx(base * factor[step], rel=1e-12), step
    assert sorted(run.watch.used_lrs) == list(range(k, MAX_STEPS + 1))
    for step, lrs in run.watch.used_lrs.items():
        assert lrs == pytest.approx([LOWER_LEARNING_RATE * factor[step]] * len(lrs), rel=1e-12), step
    assert all(math.isfinite(loss) for loss in run.log("loss").values())
    # ... and the change is reported (the stock Trainer restored the checkpoint's rate silently).
    assert f"group 0: learning rate {LEARNING_RATE} -> {LOWER_LEARNING_RATE}" in caplog.text


def test_reapply_run_settings_puts_the_runs_flags_over_a_loaded_optimizer():
    from transformers import get_cosine_schedule_with_warmup

    from vidlora.training.trainer import reapply_run_settings

    def build(lr: float, weight_decay: float):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(
            [
                {"params": [model.weight], "weight_decay": weight_decay},
                {"params": [model.bias], "lr": 10 * lr},
            ],
            lr=lr,
            weight_decay=0.0,
        )
        return model, optimizer, get_cosine_schedule_with_warmup(optimizer, 1, 4)

    model, optimizer, scheduler = build(2e-4, 0.1)
    for _ in range(2):  # two steps into the schedule: factor 0.5 * (1 + cos(pi / 3)) = 0.75
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()

    _, resumed, resumed_scheduler = build(1e-4, 0.0)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in resumed.param_groups]
    fresh_base = list(resumed_scheduler.base_lrs)
    resumed.load_state_dict(saved[0])
    resumed_scheduler.load_state_dict(saved[1])
    assert resumed_scheduler.base_lrs == [2e-4, 2e-3]  # what the stock resume leaves behind

    changes = reapply_run_settings(resumed, resumed_scheduler, fresh, fresh_base)
    assert changes == [
        "group 0: weight_decay 0.1 -> 0.0",
        "group 0: learning rate 0.0002 -> 0.0001",
        "group 1: learning rate 0.002 -> 0.001",
    ]
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([0.75e-4, 0.75e-3], rel=1e-12)
    assert resumed_scheduler.get_last_lr() == pytest.approx([0.75e-4, 0.75e-3], rel=1e-12)
    assert len(resumed.state) == 2  # the moments stay the checkpoint's
    resumed_scheduler.step()  # and the schedule goes on from the new base: factor 0.25 at step 3
    assert resumed_scheduler.get_last_lr() == pytest.approx([0.25e-4, 0.25e-3], rel=1e-12)
    assert reapply_run_settings(resumed, resumed_scheduler, fresh, fresh_base) == []


# -- several processes: every rank names the failing rank's batch ----------------------------------

RANK_BATCHES = {0: [["a1", "a2"], ["a3", "a4"]], 1: [["b1", "b2"], ["b3", "b4"]]}


def _nonfinite_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo group: step 5's second micro-batch has a NaN loss on rank 1 only;
    then, for a second watch, a logged NaN gradient norm (as DeepSpeed reports it)."""
    import json
    from types import SimpleNamespace

    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from vidlora.training.callbacks import NonFiniteStop, observe_micro_batch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    args, state = SimpleNamespace(device=torch.device("cpu")), TrainerState(global_step=4)
    outcome = {}
    for case in ("loss", "logged grad_norm"):
        stop = NonFiniteStop()
        for index, ids in enumerate(RANK_BATCHES[rank]):
            bad = case == "loss" and rank == 1 and index == 1
            observe_micro_batch([stop], state, {"ids": ids}, torch.tensor(math.nan if bad else 0.5))
        stop.on_pre_optimizer_step(args, state, TrainerControl())
        if case == "logged grad_norm":
            stop.on_log(args, TrainerState(global_step=5), TrainerControl(), logs={"grad_norm": math.nan})
        event = stop.event
        assert event is not None
        outcome[case] = {
            "step": event.step, "what": event.what, "batch": [[r, list(i)] for r, i in event.batch],
            "message": event.message(None),
        }  # fmt: skip
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_with_two_processes_every_rank_names_the_failing_ranks_micro_batch(tmp_path):
    import json
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_nonfinite_rank, args=(rank, str(tmp_path / "rendezvous"), str(tmp_path)))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)  # finishes instead of hanging in a collective
    assert [proc.exitcode for proc in procs] == [0, 0]
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert outcomes[0] == outcomes[1]  # both ranks tell the same story
    loss = outcomes[0]["loss"]
    assert (loss["step"], loss["what"], loss["batch"]) == (5, "the training loss", [[1, ["b3", "b4"]]])
    assert loss["message"].startswith(
        "training stopped at step 5: the training loss is nan (the micro-batch on process 1 of 2 held "
        "samples 'b3', 'b4'). "
    )
    logged = outcomes[0]["logged grad_norm"]
    assert (logged["step"], logged["batch"]) == (
        5,
        [[0, ["a1", "a2", "a3", "a4"]], [1, ["b1", "b2", "b3", "b4"]]],
    )
    assert logged["message"].startswith(
        "training stopped at step 5: the gradient norm is nan (the step's batch on process 0 of 2 held samples "
        "'a1', 'a2', 'a3', 'a4'; the step's batch on process 1 of 2 held samples 'b1', 'b2', 'b3', 'b4'). "
    )
