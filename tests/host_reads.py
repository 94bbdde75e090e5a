"""Count device -> host reads (``.item()``, ``.tolist()``, ``int()``/``float()``/``bool()`` of a tensor):
on an accelerator each one stalls the host until the device catches up."""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...``; then ``reads.count`` and ``reads.names``."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    @property
    def count(self) -> int:
        return len(self.names)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READS:
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))
