"""The web UI's Train tab without the UI: the form's flags, the command it runs, and the job.

The form is generated from the argument dataclasses through the parser `vidlora train` itself uses
(``HfArgumentParser`` over :mod:`vidlora.args`): type, default and help come from there, and
:data:`SEED_VALUES` puts the seed command's own values (``scripts/finetune_lora.sh``: rank 128,
alpha 256, ZeRO-3, ...) on top, so the form starts as the seed's command. A job is ``vidlora train``
in its own process group, its output in a log file inside ``--output_dir`` and its identity in
:data:`JOB_FILE` next to it: a browser refresh or a restarted web UI finds the job again from the
output directory alone. Stopping sends SIGTERM to the group (checkpoints are sealed atomically, see
docs/reliability.md); resuming reruns the same command, which continues from the latest complete
checkpoint as every rerun of `vidlora train` does.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vidlora.errors import NotFoundError, UsageError
from vidlora.jsonl import write_text_atomic

#: What the web UI writes into a run's ``--output_dir``: the job's identity and its stdout/stderr.
JOB_FILE = "vidlora_webui_job.json"
LOG_FILE = "vidlora_train.log"
#: The line written to the log before each launch; the live loss curve counts log lines after the last.
LAUNCH_MARKER = "vidlora webui: launched at step"
_LAUNCH_LINE = re.compile(re.escape(LAUNCH_MARKER) + r" (\d+), logging every (\d+) steps: [^\n]*")

#: The seed command's values (scripts/finetune_lora.sh with its variables at their defaults); the
#: form shows them instead of the dataclass defaults. ``tf32`` is the script's per-machine choice.
SEED_VALUES: Mapping[str, Any] = {
    "deepspeed": "configs/zero3.json",
    "model_name_or_path": "LanguageBind/Video-LLaVA-7B",
    "lora_enable": True,
    "lora_r": 128,
    "lora_alpha": 256,
    "version": "v1",
    "data_path": "data.json",
    "video_folder": ".",
    "image_folder": ".",
    "X": "Video Image",
    "video_tower": "LanguageBind/LanguageBind_Video_merge",
    "image_tower": "LanguageBind/LanguageBind_Image",
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_use_x_start_end": False,
    "mm_use_x_patch_token": False,
    "image_aspect_ratio": "pad",
    "group_by_modality_length": True,
    "bf16": True,
    "output_dir": "./checkpoints/Video-LLaVA-7B",
    "num_train_epochs": 2,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "evaluation_strategy": "epoch",
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 1,
    "learning_rate": 2e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "lr_scheduler_type": "cosine",
    "logging_steps": 1,
    "model_max_length": 2048,
    "gradient_checkpointing": True,
    "dataloader_num_workers": 4,
    "lazy_preprocess": True,
    "cache_dir": "./cache_dir",
    "report_to": "wandb",
}

#: The flags the form shows, by section (every other flag goes in "more arguments").
FORM_SECTIONS: Mapping[str, tuple[str, ...]] = {
    "Model": (
        "model_name_or_path", "version", "video_tower", "image_tower", "mm_projector_type",
        "mm_vision_select_layer", "X", "cache_dir",
    ),
    "Data": ("data_path", "video_folder", "image_folder", "image_aspect_ratio", "model_max_length",
             "eval_data_path", "skip_bad_samples"),
    "LoRA": ("lora_enable", "lora_r", "lora_alpha", "lora_dropout", "bits", "mm_projector_lr"),
    "Training": (
        "output_dir", "deepspeed", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
        "warmup_ratio", "lr_scheduler_type", "evaluation_strategy", "save_strategy", "save_steps",
        "save_total_limit", "logging_steps", "bf16", "tf32", "gradient_checkpointing",
        "group_by_modality_length", "dataloader_num_workers", "report_to",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class FormField:
    """One flag of the form: ``kind`` is bool, int, float, str or list (space-separated values)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"


def _train_parser():
    import transformers

    from vidlora.args import DataArguments, ModelArguments, TrainingArguments

    return transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))


def _choices() -> dict[str, tuple[str, ...]]:
    """Choices the dataclasses check in validation rather than declare (so the parser lacks them)."""
    from vidlora.args import ASPECT_RATIOS, LORA_BIASES, QUANT_BITS
    from vidlora.data.templates import template_names

    return {
        "version": tuple(template_names()),
        "image_aspect_ratio": ASPECT_RATIOS,
        "lora_bias": LORA_BIASES,
        "bits": tuple(str(b) for b in QUANT_BITS),
    }


def form_fields(*, cuda_available: bool = False) -> dict[str, list[FormField]]:
    """The form, section by section: each flag's kind, help and default (the seed's, else the parser's)."""
    from transformers.hf_argparser import string_to_bool

    actions = {action.dest: action for action in _train_parser()._actions}
    seed = {**SEED_VALUES, "tf32": cuda_available}
    choices = _choices()
    sections: dict[str, list[FormField]] = {}
    for section, names in FORM_SECTIONS.items():
        fields = []
        for name in names:
            action = actions[name]
            if action.nargs == "+":
                kind = "list"
            elif action.type is string_to_bool:
                kind = "bool"
            elif action.type in (int, float):
                kind = action.type.__name__
            else:
                kind = "str"
            default = seed.get(name, action.default)
            if kind == "list" and isinstance(default, list | tuple):
                default = " ".join(default)
            if kind == "bool":
                default = bool(default)
            listed = choices.get(name) or (tuple(action.choices) if action.choices else None)
            help_ = " ".join((action.help or "").split())
            fields.append(FormField(name, kind, default, help_, listed))
        sections[section] = fields
    return sections


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 1 or value == 0 else repr(value)
    return str(value)


def flags_from_form(fields: Sequence[FormField], values: Sequence[Any], extra: str = "") -> list[str]:
    """`vidlora train`'s arguments for the form's values: every filled field, in form order, then
    ``extra`` (shell words); a flag in ``extra`` replaces the form's value of it (like the seed script's
    appended arguments, without the duplicate)."""
    extra_words = shlex.split(extra or "")
    given: dict[str, list[str]] = {}
    order: list[str] = []
    name: str | None = None
    for word in extra_words:
        if word.startswith("--"):
            name = word[2:].replace("-", "_")
            given[name] = []
            order.append(name)
        elif name is None:
            raise UsageError(f"more arguments: {word!r} is not a --flag or its value")
        else:
            given[name].append(word)
    argv: list[str] = []
    for field, value in zip(fields, values, strict=True):
        if field.name in given:
            argv += [field.flag, *given.pop(field.name)]
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if field.kind == "list":
            argv += [field.flag, *shlex.split(str(value))]
        elif field.kind == "int":
            argv += [field.flag, str(int(value))]
        else:
            argv += [field.flag, _format(value)]
    for name in order:
        if name in given:
            argv += [f"--{name}", *given[name]]
    return argv


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The last value of ``--name`` in ``argv`` (None when absent)."""
    flag = f"--{name}"
    value = None
    for at, word in enumerate(argv[:-1]):
        if word == flag:
            value = argv[at + 1]
    return value


def launch_words(flags: Sequence[str], processes: int = 1) -> list[str]:
    """The command that runs ``flags``: `vidlora train`, or the DeepSpeed launcher (as the seed
    script does) for a ``--deepspeed`` config on more than one process."""
    if processes > 1:
        return ["deepspeed", "--num_gpus", str(processes), "--module", "vidlora.train", *flags]
    return ["vidlora", "train", *flags]


def split_launch(words: Sequence[str]) -> tuple[list[str], int]:
    """The inverse of :func:`launch_words`: the flags and the process count of a command."""
    if list(words[:2]) == ["vidlora", "train"]:
        return list(words[2:]), 1
    if words[:1] == ["deepspeed"] and "vidlora.train" in words:
        at = list(words).index("vidlora.train")
        return list(words[at + 1 :]), int(flag_value(words[:at], "num_gpus") or 1)
    raise UsageError(f"not a command the web UI builds: {shlex.join(words)}")


def form_from_flags(fields: Sequence[FormField], flags: Sequence[str]) -> tuple[list[Any], str]:
    """The inverse of :func:`flags_from_form`: each field's value in ``flags`` (empty when absent),
    and the flags the form has no field for, as "more arguments"."""
    given: dict[str, list[str]] = {}
    order: list[str] = []
    for word in flags:
        if word.startswith("--"):
            order.append(word[2:])
            given[order[-1]] = []
        elif order:
            given[order[-1]].append(word)
    values: list[Any] = []
    for field in fields:
        words = given.pop(field.name, None)
        if words is None:
            values.append(False if field.kind == "bool" else None if field.kind in ("int", "float") else "")
        elif field.kind == "bool":
            values.append(bool(words) and words[-1].lower() in ("true", "1", "yes"))
        elif field.kind in ("int", "float"):
            values.append(float(words[-1]) if field.kind == "float" else int(float(words[-1])))
        elif field.kind == "list":
            values.append(shlex.join(words))
        else:
            values.append(words[-1] if words else "")
    extra = [w for name in order if name in given for w in (f"--{name}", *given[name])]
    return values, shlex.join(extra)


def _executable(words: Sequence[str]) -> list[str]:
    """``words`` with the launcher resolved next to this interpreter (the venv the web UI runs in)."""
    here = Path(sys.executable).parent
    program = here / words[0]
    if words[0] == "vidlora" and not program.is_file():
        return [sys.executable, "-m", "vidlora", *words[1:]]
    return [str(program) if program.is_file() else words[0], *words[1:]]


# -- the job --------------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks (Linux ``/proc``), telling a pid from a later reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped by its parent
        return None
    return int(fields[19])


def _alive(pid: int, start_ticks: int | None) -> bool:
    if Path("/proc").is_dir():
        return start_ticks is not None and _start_ticks(pid) == start_ticks
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def latest_checkpoint_step(output_dir: Path) -> int:
    """The step of the latest complete checkpoint in ``output_dir`` (0 when there is none)."""
    from vidlora.training.run_dir import checkpoint_step, scan_checkpoints

    latest = scan_checkpoints(output_dir).latest
    return (checkpoint_step(latest) or 0) if latest is not None else 0


@dataclass
class TrainJob:
    """A `vidlora train` process started by the web UI, as recorded in its output dir's :data:`JOB_FILE`."""

    output_dir: str
    words: list[str]  # the command as shown (``vidlora train …``)
    pid: int
    start_ticks: int | None
    started: float
    start_step: int  # the checkpoint it resumes from (0: a fresh run)
    logging_steps: int
    returncode: int | None = None

    @property
    def command(self) -> str:
        return shlex.join(self.words)

    @property
    def log_path(self) -> Path:
        return Path(self.output_dir) / LOG_FILE

    def save(self) -> None:
        write_text_atomic(Path(self.output_dir) / JOB_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def find(cls, output_dir: str | Path) -> TrainJob | None:
        """The last job the web UI started in ``output_dir`` (running or not), or None."""
        path = Path(output_dir) / JOB_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise UsageError(f"{path}: not a job file the web UI wrote ({err})") from None

    @property
    def running(self) -> bool:
        return self.returncode is None and _alive(self.pid, self.start_ticks)

    def stop(self) -> bool:
        """SIGTERM to the job's process group (launcher and every rank); False when it was not running."""
        if not self.running:
            return False
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def finished(self) -> bool:
        """Whether the run ended normally after this job started (`vidlora train`'s finished mark)."""
        from vidlora.training.run_dir import FINISHED_FILE

        mark = Path(self.output_dir) / FINISHED_FILE
        return mark.is_file() and mark.stat().st_mtime >= self.started - 1

    def state(self) -> str:
        """running, finished, stopped (exit N) or ended (the exit status is not known to this web UI)."""
        if self.running:
            return "running"
        if self.finished():
            return "finished"
        if self.returncode is not None:
            return f"stopped (exit {self.returncode})"
        return "ended (see the log)"

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log, progress-bar redraws (``\\r``) reduced to their last state."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64_000))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
        shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        shown = [line for line in shown if line.strip()]
        return "\n".join(shown[-lines:])

    def loss_points(self) -> list[tuple[int, float]]:
        """(step, train loss) so far: see :func:`loss_points`."""
        return loss_points(Path(self.output_dir), self.log_path)


class Jobs:
    """The jobs this web UI started: launches them, and keeps their process handles so an exit is
    seen (and reaped) at once; a job found only from its output dir is followed through its pid."""

    def __init__(self) -> None:
        self._processes: dict[int, subprocess.Popen] = {}
        self.last_output_dir: str | None = None

    def launch(self, words: Sequence[str], *, env: Mapping[str, str] | None = None) -> TrainJob:
        """Start ``words`` (``vidlora train …``) in its own session, output appended to the log file.

        Raises:
            UsageError: no ``--output_dir``, or a job of this web UI is still running there.
        """
        output = flag_value(words, "output_dir")
        if not output:
            raise UsageError("--output_dir is required: the job's log and state live there")
        output_dir = Path(output).resolve()
        current = self.find(output_dir)
        if current is not None and current.running:
            raise UsageError(
                f"{output_dir}: a training job (pid {current.pid}) is running there; stop it first"
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        overwrite = (flag_value(words, "overwrite_output_dir") or "False").lower() in ("true", "1", "yes")
        start_step = 0 if overwrite else latest_checkpoint_step(output_dir)
        logging_steps = int(float(flag_value(words, "logging_steps") or 500))
        log_path = output_dir / LOG_FILE
        with open(log_path, "a", encoding="utf-8") as log:
            # One line: the live loss curve reads where the run starts and how often it logs from it.
            command = shlex.join(words).replace("\n", "\\n")
            log.write(f"\n{LAUNCH_MARKER} {start_step}, logging every {logging_steps} steps: {command}\n")
            log.flush()
            process = subprocess.Popen(
                _executable(words),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            )
        self._processes[process.pid] = process
        job = TrainJob(
            str(output_dir), list(words), process.pid, _start_ticks(process.pid), time.time(), start_step,
            logging_steps,
        )  # fmt: skip
        job.save()
        self.last_output_dir = str(output_dir)
        return job

    def find(self, output_dir: str | Path) -> TrainJob | None:
        """The job recorded in ``output_dir``, its exit status filled in when this web UI started it."""
        job = TrainJob.find(output_dir)
        if job is None:
            return None
        process = self._processes.get(job.pid)
        if process is not None and job.returncode is None and process.poll() is not None:
            job.returncode = process.returncode
            job.save()
            del self._processes[job.pid]
        return job

    def resume(self, output_dir: str | Path, *, env: Mapping[str, str] | None = None) -> TrainJob:
        """Rerun the command of the job recorded in ``output_dir`` (it continues from the latest
        complete checkpoint)."""
        job = self.find(output_dir)
        if job is None:
            raise NotFoundError(f"{output_dir}: no training job of the web UI recorded there ({JOB_FILE})")
        return self.launch(job.words, env=env)

    def wait(self, job: TrainJob, timeout: float | None = None) -> int | None:
        """Wait for a job this web UI started to exit; its exit status (None for a job it did not start)."""
        process = self._processes.get(job.pid)
        if process is None:
            return None
        code = process.wait(timeout)
        self.find(job.output_dir)
        return code


# -- the loss curve -------------------------------------------------------------------------------


def _log_losses(text: str) -> list[float]:
    """Train losses of the Trainer's printed log dicts (``{'loss': '2.31', ...}``), in order."""
    losses = []
    for line in text.replace("\r", "\n").split("\n"):
        start = line.find("{'loss'")
        if start < 0:
            continue
        try:
            entry = ast.literal_eval(line[start : line.rindex("}") + 1])
            losses.append(float(entry["loss"]))
        except (ValueError, SyntaxError, KeyError, TypeError):
            continue
    return losses


def _history(output_dir: Path) -> list[dict[str, Any]]:
    """The longest ``log_history`` among the run's trainer states (the final one, the checkpoints')."""
    from vidlora.training.run_dir import TRAINER_STATE, scan_checkpoints

    candidates = [output_dir / TRAINER_STATE]
    latest = scan_checkpoints(output_dir).latest
    if latest is not None:
        candidates.append(latest / TRAINER_STATE)
    best: list[dict[str, Any]] = []
    for path in candidates:
        try:
            history = json.loads(path.read_text())["log_history"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if len(history) > len(best):
            best = history
    return best


def loss_points(output_dir: Path, log_path: Path | None = None) -> list[tuple[int, float]]:
    """(step, train loss) of a run: the saved ``trainer_state.json`` history (exact steps), then the
    losses printed to the log since the last launch, numbered on from the step it resumed at.

    The printed dicts carry no step; the launch line records where the run started and its
    ``--logging_steps``, so the k-th printed loss after it is at ``start + k · logging_steps``.
    """
    from vidlora.training.plots import loss_series

    steps, values = loss_series(_history(output_dir), "loss")
    points = dict(zip(steps, values, strict=True))
    text = ""
    if log_path is not None and log_path.is_file():
        text = log_path.read_text(encoding="utf-8", errors="replace")
    launches = list(_LAUNCH_LINE.finditer(text))
    if launches:
        last = launches[-1]
        start, every = int(last.group(1)), int(last.group(2))
        for k, loss in enumerate(_log_losses(text[last.end() :]), start=1):
            points.setdefault(start + k * every, loss)
    return sorted(points.items())


def plot_points(points: Sequence[tuple[int, float]], path: Path) -> Path | None:
    """The loss curve PNG of ``points`` (training's own plot), or None without points."""
    from vidlora.training.plots import plot_loss_curve

    return plot_loss_curve([{"step": s, "loss": v} for s, v in points], path, title="train loss")
