"""Where inference and merging run, and in which precision: the one rule behind ``--device``/``--dtype``.

A 7B model in float32 is ~30 GB of host memory per process and a merge in float32 writes a model
twice the size of its bf16 base, so the defaults follow the hardware and the checkpoint:

* device ``auto``: ``cuda:LOCAL_RANK`` under torchrun (each rank on its own GPU), ``cuda`` when a GPU
  is visible, else ``cpu``;
* dtype ``auto``: for ``merge`` the checkpoint's own dtype (its config's ``torch_dtype``/``dtype``;
  float32 when it declares none), so the merged model is stored as its base was; for inference
  bfloat16 on a GPU (float16 where the GPU has no bfloat16) and float32 on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from vidlora.errors import UsageError

AUTO = "auto"
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DEVICE_HELP = "auto (cuda:LOCAL_RANK / cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N"
DTYPE_HELP = (
    "auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU, float32 on the CPU; "
    "merge: the checkpoint's dtype)"
)
Purpose = Literal["inference", "merge"]


@dataclass(frozen=True)
class Placement:
    """The device a model is loaded on and the dtype of its floating-point weights."""

    device: torch.device
    dtype: torch.dtype


def resolve_device_and_dtype(
    requested_device: str | None,
    requested_dtype: str | None,
    *,
    cuda_available: bool,
    bf16_supported: bool,
    checkpoint_dtype: torch.dtype | None,
    purpose: Purpose,
    local_rank: int | None = None,
) -> Placement:
    """The device and dtype for ``--device``/``--dtype`` (see the module docstring for the rule).

    Machine facts come in as arguments (``cuda_available``, ``bf16_supported``: the GPU's,
    ``local_rank``: torchrun's ``LOCAL_RANK``) so the choice is a pure function of them.
    """
    device = _device(requested_device or AUTO, cuda_available=cuda_available, local_rank=local_rank)
    on_gpu = device.type == "cuda"
    name = requested_dtype or AUTO
    if name == AUTO:
        if purpose == "merge":
            dtype = checkpoint_dtype or torch.float32
            if on_gpu and dtype == torch.bfloat16 and not bf16_supported:
                raise UsageError(
                    "the checkpoint is bfloat16 but this GPU has no bfloat16 support: "
                    "merge with --device cpu, or pass --dtype float16/float32"
                )
        elif on_gpu:
            dtype = torch.bfloat16 if bf16_supported else torch.float16
        else:
            dtype = torch.float32
        return Placement(device, dtype)
    if name not in DTYPES:
        raise UsageError(f"--dtype {name}: use one of {AUTO}, {', '.join(DTYPES)}")
    if on_gpu and name == "bfloat16" and not bf16_supported:
        raise UsageError("--dtype bfloat16: this GPU has no bfloat16 support; use float16 or float32")
    return Placement(device, DTYPES[name])


def _device(name: str, *, cuda_available: bool, local_rank: int | None) -> torch.device:
    if name == AUTO:
        name = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a device ({DEVICE_HELP})") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: use {DEVICE_HELP}")
    if device.type == "cuda":
        if not cuda_available:
            raise UsageError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is None and local_rank is not None:
            # One process per GPU under torchrun: a bare "cuda" would put every rank on GPU 0.
            device = torch.device("cuda", local_rank)
    return device


def detect_placement(
    requested_device: str | None,
    requested_dtype: str | None,
    *,
    checkpoint_dtype: torch.dtype | None = None,
    purpose: Purpose,
) -> Placement:
    """`resolve_device_and_dtype` with this machine's facts and torchrun's ``LOCAL_RANK``."""
    cuda = torch.cuda.is_available()
    local_rank = os.environ.get("LOCAL_RANK")
    return resolve_device_and_dtype(
        requested_device,
        requested_dtype,
        cuda_available=cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        checkpoint_dtype=checkpoint_dtype,
        purpose=purpose,
        local_rank=int(local_rank) if local_rank else None,
    )
