"""Process groups of a launched run: started with the run's ``--ddp_timeout`` on every path, DeepSpeed's
early enough for ZeRO-3 on any device, and a lost rank reported as such.

DeepSpeed and ZeRO-3: under ZeRO-3 the Trainer's DeepSpeed config makes transformers wrap model
construction (``from_pretrained`` / ``from_config`` / ``_from_config``) in ``deepspeed.zero.Init``,
which partitions parameters across ranks as they are created and reads the world size from
DeepSpeed's own communication backend. On a GPU, accelerate starts that backend when the
TrainingArguments set up their device; with ``use_cpu=True`` accelerate takes its plain-PyTorch
path instead, DeepSpeed's backend is not up yet, ``zero.Init`` sees a world size of 1 and fails with
"train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size".
Calling :func:`init_deepspeed_distributed` after parsing the arguments and before building the
model fixes that; on a GPU it is a no-op in effect (DeepSpeed reuses an existing process group).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from vidlora.errors import VidloraError

T = TypeVar("T")

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LauncherRequired(VidloraError, RuntimeError):
    """--deepspeed was given to a process that no distributed launcher started."""


def missing_launcher_env(environ: dict[str, str] | None = None) -> list[str]:
    """The launcher variables DeepSpeed needs that are not set (empty under deepspeed/torchrun)."""
    env = os.environ if environ is None else environ
    return [name for name in LAUNCHER_ENV if name not in env]


def init_cpu_process_group(timeout_s: int, backend: str | None = None) -> bool:
    """Start a launched CPU run's process group with ``--ddp_timeout``; True if this call started it.

    accelerate starts it on the CPU without a timeout (its GPU and DeepSpeed-on-GPU paths pass
    ``--ddp_timeout``), so a rank that stops answering — hung, stopped, or on a machine that is gone
    without closing its connections — kept the others in a collective for torch's default 30 minutes.
    Started here first, accelerate and DeepSpeed reuse the group. Does nothing without a launcher
    (one plain process) or when a group is up already. The backend defaults to gloo, as accelerate's.
    """
    import torch.distributed as dist

    if missing_launcher_env() or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group(backend or "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def init_deepspeed_distributed(deepspeed_config: str | dict | None, timeout_s: int = 1800) -> bool:
    """Bring up DeepSpeed's process group when a DeepSpeed config is in use; True if it did.

    Call once per process, after the TrainingArguments exist and before the model is built.
    The backend is DeepSpeed's choice for the device (nccl on CUDA, gloo on CPU unless oneCCL is
    installed). Raises :class:`LauncherRequired` when the process was not started by a launcher:
    DeepSpeed's ZeRO-3 reads ``LOCAL_RANK`` and friends from the environment and otherwise falls
    back to MPI discovery (``No module named 'mpi4py'``), which says nothing useful.
    """
    if not deepspeed_config:
        return False
    missing = missing_launcher_env()
    if missing:
        raise LauncherRequired(
            f"--deepspeed needs a distributed launcher (missing environment: {', '.join(missing)}); "
            "run `deepspeed --num_gpus N --module vidlora.train ...` (on CPU: `deepspeed --num_gpus N` "
            "starts N CPU processes) or `torchrun --nproc_per_node N -m vidlora.train ...`, N >= 1"
        )
    import deepspeed

    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    return True


def computed_on_rank_zero(compute: Callable[[], T], *, what: str) -> T:
    """Run ``compute`` on rank 0 alone and hand its (picklable) result to every rank.

    Reading and tokenizing a large data set costs every rank the same CPU time and memory peak;
    under a launch of N processes per machine that is N identical passes. Without an initialised
    process group of several ranks this is just ``compute()``. When ``compute`` fails on rank 0,
    the other ranks raise too (instead of waiting in the collective until it times out).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    payload: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", compute())]
        except Exception as err:
            dist.broadcast_object_list([("error", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    status, value = cast("tuple[str, Any]", payload[0])
    if status == "error":
        first_line = str(value).splitlines()[0]
        raise VidloraError(f"{what} failed on rank 0 (its error is printed there): {first_line}")
    return cast("T", value)


# What gloo says when a peer is gone: its connection closed or reset (the process died), or no answer
# within the process group's timeout (it hangs, is stopped, or its machine is unreachable).
_CLOSED = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe")
# gloo puts the peer's address before or after those words: "Read error [127.0.0.1]:27051: ...".
_PEER = re.compile(r"\[([^\]\s]+)\]:(\d+)")
_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms")


class PeerLostError(RuntimeError):
    """Another rank of the run stopped taking part (it died, hangs, or its machine is gone)."""


def peer_lost_error(err: BaseException, output_dir: str | None = None) -> PeerLostError | None:
    """``err`` as a :class:`PeerLostError` naming this rank, the lost one and what to do, or None when
    ``err`` is not a lost peer. The lost rank is named when it can be known (the other rank of two);
    gloo itself names only the peer's address."""
    import torch.distributed as dist

    text = str(err)
    closed, timed_out = _CLOSED.search(text), _TIMED_OUT.search(text)
    if not (closed or timed_out) or not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    others = [r for r in range(world) if r != rank]
    lost = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
    if closed:
        peer = _PEER.search(text)
        where = f" at {peer.group(1)}:{peer.group(2)}" if peer else ""
        what = f"lost {lost}{where}: its connection closed (the process died or was killed)"
    else:
        assert timed_out is not None
        seconds = int(timed_out.group(1)) / 1000
        what = (
            f"lost {lost}: no answer within --ddp_timeout {seconds:g} s (it hangs, is stopped, or its "
            "machine is gone)"
        )
    resume = "; rerun the same command to continue from the last complete checkpoint"
    last = _last_checkpoint(output_dir)
    if last is not None:
        resume += f" ({last}, or pass --resume_from_checkpoint {last})"
    return PeerLostError(f"rank {rank} of {world} {what}; its own log says why{resume}")


def _last_checkpoint(output_dir: str | None) -> str | None:
    """The checkpoint a rerun would resume (the newest *complete* one), as the message promises."""
    from vidlora.training.run_dir import scan_checkpoints

    if not output_dir:
        return None
    latest = scan_checkpoints(Path(output_dir)).latest
    return None if latest is None else str(latest)
