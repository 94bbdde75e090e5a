"""Two nodes, simulated on one machine: two torchrun agents (`--nnodes 2 --node_rank 0|1`, one process
each) meeting at one c10d rendezvous on the loopback interface, as two machines meet at rank 0's
address. Both write to one shared `--output_dir` (rank 0 saves), as a cluster's shared file system.

The run trains exactly as one process with accumulation 2 does (the same 2 samples per step; see
test_zero3_original_command.py for why a multi-process run equals one process), and a rerun of both
nodes from its step-2 checkpoint replays it to the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launch import DDP_FLAGS, assert_same_training, free_port, saved_history, started_launch, torchrun_command

pytestmark = pytest.mark.slow
NODE_TIMEOUT_S = 600


def _launch_two_nodes(argv: list[str], logs: Path) -> None:
    """Both nodes' torchrun, concurrently; fails the test unless both exit 0."""
    port = free_port()
    nodes = [torchrun_command(argv, nproc=1, nnodes=2, node_rank=n, port=port) for n in (0, 1)]
    with (
        started_launch(nodes[0], logs / "node0.log") as node0,
        started_launch(nodes[1], logs / "node1.log") as node1,
    ):
        for n, proc in enumerate((node0, node1)):
            proc.wait(timeout=NODE_TIMEOUT_S)
            assert proc.returncode == 0, (logs / f"node{n}.log").read_text()[-6000:]


@pytest.fixture(scope="module")
def runs(original_argv, train_in_process, tmp_path_factory):
    """(two-node output dir, one-process output dir, one-process Trainer, step count)."""
    single_dir = tmp_path_factory.mktemp("one_process")
    single = train_in_process(original_argv(single_dir, **{**DDP_FLAGS, "gradient_accumulation_steps": "2"}))
    nodes_dir = tmp_path_factory.mktemp("two_nodes")
    _launch_two_nodes(original_argv(nodes_dir / "out", **DDP_FLAGS), nodes_dir)
    steps = len([e for e in single.state.log_history if "loss" in e])
    return nodes_dir / "out", single_dir, single, steps


def test_two_nodes_train_as_one_process(runs):
    out, single_dir, single, steps = runs
    assert steps >= 6  # 16 samples, 2 per step, grouped by modality (each group padded to even)
    assert_same_training(out, single.state.log_history, single_dir, steps=steps)
    # Rank 0 saved every checkpoint into the shared directory (save_steps 2, all kept).
    want = [f"checkpoint-{s}" for s in range(2, steps + 1, 2)] + (
        [f"checkpoint-{steps}"] if steps % 2 else []
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(want)


def test_both_nodes_rerun_from_a_checkpoint_and_replay_the_run(runs, original_argv, tmp_path):
    out, _, _, steps = runs
    resumed = tmp_path / "out"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    # Explicit for now; the plain rerun of the same command resumes once rerun-resumes lands.
    argv = original_argv(resumed, **DDP_FLAGS, resume_from_checkpoint=str(resumed / "checkpoint-2"))
    _launch_two_nodes(argv, tmp_path)
    assert_same_training(resumed, saved_history(out), out, steps=steps)
