"""The multimodal projector: tower features -> LLM embedding width.

Kinds follow the original Video-LLaVA `build_vision_projector`: `linear`, `mlp{N}x_gelu`
(Linear, GELU, Linear, ... with N Linear layers, so state-dict keys are `0.*`, `2.*`, ...) and
`identity`.
"""

from __future__ import annotations

import re

from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
ACCEPTED_KINDS = "'linear', 'mlp{N}x_gelu' (N >= 1, e.g. 'mlp2x_gelu') or 'identity'"


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the projector named `kind` mapping `[..., in_dim]` to `[..., out_dim]`.

    Raises:
        ValueError: unknown kind, `mlp0x_gelu`, or `identity` with `in_dim != out_dim`.
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"projector 'identity' needs equal tower and LLM widths, got in_dim={in_dim}, out_dim={out_dim}"
            )
        return nn.Identity()
    match = _MLP_GELU.match(kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(
                f"projector {kind!r} needs at least one Linear layer; accepted: {ACCEPTED_KINDS}"
            )
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            # nn.GELU() is the exact (erf) GELU, as in the original.
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector type {kind!r}; accepted: {ACCEPTED_KINDS}")
