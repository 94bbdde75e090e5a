"""Run `vidlora train` as a user does, and SIGKILL it at a chosen moment: the kill suite's harness.

A run is a subprocess in its own session (so a launcher and every rank it started die together,
as under a scheduler's kill); its output is read line by line while a *trigger* watches the
output and the output directory, polling every millisecond. The triggers name what the run was
doing when it was killed, and :class:`Killed` records the evidence (what the output directory
held right after the kill) so a test can prove that the kill hit that moment.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESUMED = re.compile(r"vidlora train: resuming from .*checkpoint-(\d+) \(step (\d+)\)")


@dataclass
class Progress:
    """What a run has printed so far: the step it resumed from, its training and eval log lines."""

    lines: list[str] = field(default_factory=list)
    start_step: int = 0
    train_logs: int = 0
    eval_logs: int = 0

    def add(self, line: str) -> None:
        self.lines.append(line)
        match = RESUMED.search(line)
        if match:
            self.start_step = int(match.group(2))
        logged = _logged_dict(line)
        if logged is not None:
            if "eval_loss" in logged:
                self.eval_logs += 1
            elif "loss" in logged:
                self.train_logs += 1

    @property
    def step(self) -> int:
        """Optimizer steps completed (and logged: --logging_steps 1)."""
        return self.start_step + self.train_logs


def _logged_dict(line: str) -> dict | None:
    """The Trainer prints each log entry as a Python dict literal (PrinterCallback, --disable_tqdm)."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, dict) else None


Trigger = Callable[[Progress, Path], bool]


@dataclass
class Outcome:
    """How one launch ended: killed (and where), or its exit code, with everything it printed."""

    killed: bool
    returncode: int
    output: str
    step: int
    partial_dirs: list[str]
    checkpoints: list[str]


def checkpoint_names(output_dir: Path) -> tuple[list[str], list[str]]:
    """(complete-looking ``checkpoint-N`` names, ``.partial-*`` names) in ``output_dir``, sorted."""
    if not output_dir.is_dir():
        return [], []
    names = sorted(p.name for p in output_dir.iterdir() if p.is_dir())
    return [n for n in names if n.startswith("checkpoint-")], [n for n in names if n.startswith(".partial-")]


def launch(
    command: list[str],
    output_dir: Path,
    trigger: Trigger | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> Outcome:
    """Run ``command`` until it exits, or SIGKILL its whole session the moment ``trigger`` fires."""
    full_env = dict(
        os.environ if env is None else env,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
    )
    progress = Progress()
    lock = threading.Lock()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with lock:
                progress.add(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    killed = False
    while proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{command} ran past {timeout_s} s:\n" + "".join(progress.lines[-40:]))
        with lock:
            fire = trigger is not None and trigger(progress, output_dir)
        if fire:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    # The evidence of where the kill landed, before anything else touches the directory.
    checkpoints, partial = checkpoint_names(output_dir)
    proc.wait()
    reader.join(timeout=10)
    return Outcome(killed, proc.returncode, "".join(progress.lines), progress.step, partial, checkpoints)


def train_command(argv: list[str]) -> list[str]:
    """`vidlora train ARGV` as a fresh interpreter (the installed console script's module)."""
    return [sys.executable, "-m", "vidlora.train", *argv]


# -- triggers ---------------------------------------------------------------------------------------


def after_step(step: int, delay_s: float = 0.0) -> Trigger:
    """Fire ``delay_s`` after step ``step``'s log line (a moment inside the following step, typically)."""
    seen_at: list[float] = []

    def fire(progress: Progress, output_dir: Path) -> bool:
        if progress.step < step:
            return False
        if not seen_at:
            seen_at.append(time.monotonic())
        return time.monotonic() - seen_at[0] >= delay_s

    return fire


def during_save() -> Trigger:
    """Fire while a checkpoint is being written (its ``.partial-`` directory exists)."""

    def fire(progress: Progress, output_dir: Path) -> bool:
        return bool(checkpoint_names(output_dir)[1])

    return fire


def during_eval(step: int, delay_s: float = 0.02) -> Trigger:
    """Fire ``delay_s`` after step ``step``'s training log line when ``step`` evaluates: the Trainer
    logs, then evaluates, then saves, so the kill lands in the evaluation (the test checks that
    no eval line for it was printed and no checkpoint of that step exists)."""
    return after_step(step, delay_s)


def before_training(after_s: float) -> Trigger:
    """Fire ``after_s`` seconds after launch, before the first step is logged (loading, data checks)."""
    started = time.monotonic()

    def fire(progress: Progress, output_dir: Path) -> bool:
        return progress.step == 0 and time.monotonic() - started >= after_s

    return fire
