"""Loss curves from a Trainer's ``log_history``, drawn with matplotlib's Agg canvas.

The figure is built with the object API (``Figure`` + ``FigureCanvasAgg``) rather than pyplot so
that no global figure registry or backend switch is touched: safe in a training process and in
worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def loss_series(log_history: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` (e.g. "loss", "eval_loss") in a Trainer log history.

    Entries without the key or without a step are ignored. Non-finite values are kept (as NaN),
    so a broken run shows a gap in the curve instead of a silently shortened one.
    """
    steps: list[int] = []
    values: list[float] = []
    for entry in log_history:
        if key in entry and "step" in entry:
            value = float(entry[key])
            steps.append(int(entry["step"]))
            values.append(value if math.isfinite(value) else math.nan)
    return steps, values


def plot_loss_curve(
    log_history: Iterable[Mapping[str, Any]], path: str | Path, title: str | None = None
) -> Path | None:
    """Write a PNG with the train loss ("loss") and eval loss ("eval_loss") against the step.

    Returns the written path, or None when the history holds no loss yet (nothing is written).
    The file is written to a temporary name and renamed, so a reader never sees half a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = list(log_history)
    train_steps, train_loss = loss_series(history, "loss")
    eval_steps, eval_loss = loss_series(history, "eval_loss")
    if not train_steps and not eval_steps:
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if train_steps:
        axes.plot(train_steps, train_loss, label="train loss", linewidth=1.2)
    if eval_steps:
        axes.plot(eval_steps, eval_loss, label="eval loss", marker="o", linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    figure.savefig(partial, format="png")
    partial.replace(path)
    return path
