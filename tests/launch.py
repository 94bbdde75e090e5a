"""Start `vidlora train` under the distributed launchers, and compare a launched run with one process.

The launchers (``deepspeed``, ``torchrun``) are found next to the interpreter running the tests,
not on ``PATH``: the project's dev extra installs both into its virtual environment, so a missing
one is a broken install and fails the test instead of skipping it. Every launch runs on the CPU
(gloo), with ``src/`` first on ``PYTHONPATH`` so the processes import this checkout, and with a
timeout, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = ROOT / "configs" / "zero3.json"
NON_LORA = "non_lora_trainables.safetensors"
SAVED_TENSOR_FILES = ("adapter_model.safetensors", NON_LORA)
# fp32 sums in another order (cross-rank reduction vs local accumulation), carried through a few
# AdamW steps of at most lr = 2e-4 each: measured differences are ~1e-8.
TENSOR_TOL = 1e-6
LOSS_TOL = 1e-5
#: Overrides of the original's flags for the torchrun (DDP) runs: a step per 2 samples (per-device batch
#: 1 x 2 ranks; one process takes accumulation 2 for the same step), a checkpoint every 2 steps, no
#: dropout (nothing random), no evaluation, a 30 s --ddp_timeout.
DDP_FLAGS: dict[str, str | None] = {
    "per_device_train_batch_size": "1",
    "gradient_accumulation_steps": "1",
    "evaluation_strategy": "no",
    "lora_dropout": "0",
    "save_steps": "2",
    "save_total_limit": None,
    "ddp_timeout": "30",
    "disable_tqdm": "True",
}
#: Generous bound for one short 2-process launch on a busy 2-core machine; reaching it is a hang.
LAUNCH_TIMEOUT_S = 600


def launcher(name: str) -> str:
    """The path of launcher ``name`` in the tests' environment; fails the test when it is missing."""
    path = Path(sys.executable).parent / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"the {name!r} launcher is not installed next to {sys.executable}; the dev extra installs it "
            "(pip install -e '.[dev]', or `make setup`)"
        )
    return str(path)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: CPU accelerator, this checkout's sources first, and the
    environment's own tools first on ``PATH``.

    The last matters for time: DeepSpeed JIT-compiles its shared-memory op with whichever ``ninja`` is
    on ``PATH``, and ninja 1.11 (Debian's) and 1.13 (the venv's) hash build commands differently, so
    alternating between them rebuilds the op (~60 s) instead of loading it from the cache (~1 s).
    """
    return dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        **extra,
    )


def deepspeed_command(argv: Sequence[str], *, nproc: int = 2, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus NPROC --module vidlora.train ARGV` (NPROC CPU processes here)."""
    return [
        launcher("deepspeed"),
        "--num_gpus", str(nproc),
        "--master_port", str(port or free_port()),
        "--module", "vidlora.train",
        *argv,
    ]  # fmt: skip


def torchrun_command(
    argv: Sequence[str],
    *,
    nproc: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    port: int | None = None,
    rdzv_id: str = "vidlora-test",
) -> list[str]:
    """`torchrun -m vidlora.train ARGV` with a c10d rendezvous on the loopback interface.

    With ``nnodes > 1`` each node is its own torchrun (one call per ``node_rank``), all pointing at
    the same endpoint, as on a cluster.
    """
    return [
        launcher("torchrun"),
        "--nnodes", str(nnodes),
        "--nproc_per_node", str(nproc),
        "--node_rank", str(node_rank),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"127.0.0.1:{port or free_port()}",
        "--rdzv_id", rdzv_id,
        "-m", "vidlora.train",
        *argv,
    ]  # fmt: skip


def run_launch(command: list[str], *, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a launch to the end; fails the test (with the output's tail) on a non-zero exit."""
    done = subprocess.run(
        command, env=launch_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return done


@contextmanager
def started_launch(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Start a launch in the background (its own session, output to ``log``); on leaving, whatever of
    it still runs is killed, so a test that fails midway leaves no training processes behind."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env=launch_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    try:
        yield proc
    finally:
        # The launcher and its workers share the session's process group (workers can outlive it).
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Wait until ``path`` exists; fails if the launch ends first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the launch ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the training process of global ``rank`` under a launcher: its descendant running
    vidlora.train whose environment says ``RANK=rank`` (read from /proc, as an operator would)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = list(children.get(launcher_pid, [])), []
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"vidlora.train" in cmdline:
            found.append(pid)
    assert len(found) == 1, f"rank {rank} under launcher {launcher_pid}: processes {found}"
    return found[0]


def logged(history: list[dict], key: str) -> list[float]:
    """The values of ``key`` in a Trainer log history, in step order."""
    return [entry[key] for entry in history if key in entry]


def saved_history(output_dir: Path) -> list[dict]:
    """The log history a run saved in ``output_dir/trainer_state.json``."""
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def assert_same_training(
    got_dir: Path, want_history: list[dict], want_dir: Path, *, steps: int, tensor_tol: float = TENSOR_TOL
) -> None:
    """A launched run in ``got_dir`` trained as the reference run did: the same number of steps, the
    same trained tokens per step, the same losses, and the same saved adapter and projector."""
    history = saved_history(got_dir)
    assert len(logged(history, "loss")) == steps
    assert logged(history, "trained_tokens") == logged(want_history, "trained_tokens")
    assert logged(history, "loss") == pytest.approx(logged(want_history, "loss"), abs=LOSS_TOL)
    assert logged(history, "eval_loss") == pytest.approx(logged(want_history, "eval_loss"), abs=LOSS_TOL)
    for name in SAVED_TENSOR_FILES:
        if not (want_dir / name).is_file():
            assert not (got_dir / name).is_file(), got_dir / name
            continue
        got, want = load_file(str(got_dir / name)), load_file(str(want_dir / name))
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=tensor_tol, msg=f"{name}: {key}")
