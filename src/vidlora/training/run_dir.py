"""A run's output directory: which checkpoints in it are complete, whose run it holds, where a rerun goes on.

Rerunning the same command continues the run, as the original Video-LLaVA does: the latest
*complete* checkpoint is resumed (``--resume_from_checkpoint latest`` says so explicitly, a path
picks one), a finished run is left alone, and an output directory holding another run (other
data, model or recipe) is refused with the difference named; ``--overwrite_output_dir`` starts over.

A checkpoint is written as ``.partial-checkpoint-N`` and renamed to ``checkpoint-N`` once every
rank's files are on disk and :data:`COMPLETE_MARKER` (the file list with sizes) is written, so a
``checkpoint-N`` without a valid marker was not written by this code path (or was damaged later):
it is reported and never picked. Rotation (``save_total_limit``) counts complete checkpoints only
and never deletes the newest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vidlora.checkpoint import RECORD_FILE
from vidlora.errors import AlreadyExistsError, NotFoundError, UsageError, VidloraError
from vidlora.jsonl import write_text_atomic
from vidlora.model.lora import ALL_LINEAR

CHECKPOINT_PREFIX = PREFIX_CHECKPOINT_DIR
PARTIAL_PREFIX = ".partial-"
COMPLETE_MARKER = "vidlora_complete.json"
FINISHED_FILE = "vidlora_finished.json"
TRAINER_STATE = "trainer_state.json"
#: The run's resolved flags as YAML (`vidlora train <output_dir>/config.yaml` runs it again).
CONFIG_FILE = "config.yaml"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

# What may change between a run and its rerun (reported), by argument group; everything else in
# model_args, the LoRA/quantization recipe and the data decides *which* run it is (refused).
MODEL_ARGS_ALLOWED = frozenset({"attn_implementation", "cache_dir"})
DATA_ARGS_ALLOWED = frozenset(
    {
        "data_path",  # compared by content (DATA_FILES), not by path
        "eval_data_path",
        "video_folder",  # a moved data set is still the data set: reported
        "image_folder",
        "lazy_preprocess",
        "skip_bad_samples",
        "max_bad_sample_fraction",
        "allow_media_outside_folder",
        "decode_timeout",
        "frame_cache",
    }
)
RECIPE_TRAINING_ARGS = (
    "lora_enable",
    "lora_r",
    "lora_alpha",
    "lora_bias",
    "bits",
    "quant_type",
    "double_quant",
    "freeze_mm_mlp_adapter",
)
# Recipe arguments added later, part of the identity only when not at their default (the default
# is what every earlier run did), so a run recorded before them still resumes.
RECIPE_TRAINING_DEFAULTS: dict[str, Any] = {
    "use_dora": False,
    "use_rslora": False,
    "lora_target": [ALL_LINEAR],
}
# Training arguments that say where and how a process runs, not how the model trains.
TRAINING_ARGS_IGNORED = frozenset(
    {
        "output_dir",
        "logging_dir",
        "run_name",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "local_rank",
        "disable_tqdm",
        "report_to",
        "hub_token",
        "push_to_hub",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_pin_memory",
        "log_level",
        "log_level_replica",
        "ddp_timeout",
        "use_cpu",
    }
)


class RunMismatchError(VidloraError, ValueError):
    """The output directory holds checkpoints of another run; the message names what differs."""


# -- fingerprints ---------------------------------------------------------------------------------


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Name, size and SHA-256 of a record file: the data a run trains on, wherever it is mounted."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise NotFoundError(f"{path}: cannot read the record file ({err.strerror or err})") from err
    return {"name": Path(path).name, "size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def run_identity(
    model_args: dict[str, Any], data_args: dict[str, Any], training_args: dict[str, Any]
) -> dict:
    """What makes two runs the same run: the model, the data (record files by content) and the recipe.

    Takes the argument groups as dicts (``asdict``/``to_dict``), as a checkpoint records them.
    """

    def files(paths: list[str] | None) -> list[dict[str, Any]]:
        return [file_fingerprint(p) for p in paths or []]

    return {
        "model": {k: v for k, v in model_args.items() if k not in MODEL_ARGS_ALLOWED},
        "data": {
            **{k: v for k, v in data_args.items() if k not in DATA_ARGS_ALLOWED},
            "data_files": files(data_args.get("data_path")),
            "eval_files": files(data_args.get("eval_data_path")),
        },
        "recipe": {
            **{k: training_args.get(k) for k in RECIPE_TRAINING_ARGS},
            **{
                k: training_args[k]
                for k, default in RECIPE_TRAINING_DEFAULTS.items()
                if training_args.get(k, default) != default
            },
        },
    }


def _differences(prefix: str, old: Any, new: Any) -> list[str]:
    """Human-readable differences between two JSON-like values, one line per leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(f"{prefix}.{key}" if prefix else str(key), old.get(key), new.get(key))
        return out
    if old == new:
        return []
    return [f"{prefix}: {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's run and this one without making it another run: the
    training hyperparameters, moved media folders, decode policy... (allowed, and reported).

    ``old`` and ``new`` are run records' ``training`` dicts (``model_args``, ``data_args``,
    ``training_args``).
    """
    allowed = {
        "model_args": MODEL_ARGS_ALLOWED,
        "data_args": DATA_ARGS_ALLOWED - {"data_path", "eval_data_path"},
        "training_args": None,
    }
    out = []
    for group, keys in allowed.items():
        before, after = old.get(group) or {}, new.get(group) or {}
        if keys is None:
            names = (set(before) | set(after)) - TRAINING_ARGS_IGNORED - set(RECIPE_TRAINING_ARGS)
            names -= set(RECIPE_TRAINING_DEFAULTS)
            keys = frozenset(k for k in names if not k.startswith("_"))
        out += [
            f"--{k}: {_short(before.get(k))} -> {_short(after.get(k))}"
            for k in sorted(keys)
            if before.get(k) != after.get(k)
        ]
    return out


# -- checkpoints on disk ------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """N for a directory named ``checkpoint-N``, else None."""
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def partial_dir(run_dir: Path, step: int) -> Path:
    """Where ``checkpoint-<step>`` is written before it is complete."""
    return run_dir / f"{PARTIAL_PREFIX}{CHECKPOINT_PREFIX}-{step}"


def _listing(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def _fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory`` to disk (a power loss keeps what a rename said)."""
    for path in [*sorted(directory.rglob("*")), directory]:
        _fsync(path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def seal_checkpoint(partial: Path, final: Path, step: int, world_size: int) -> None:
    """Mark ``partial`` complete and rename it to ``final`` (main process, after every rank wrote).

    An existing ``final`` (a checkpoint of the same step left by an earlier attempt) is replaced
    only once the new one is complete.
    """
    files = _listing(partial)
    marker = {"step": step, "world_size": world_size, "files": files}
    write_text_atomic(partial / COMPLETE_MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
    _fsync_tree(partial)
    if final.exists():
        stale = final.with_name(f"{PARTIAL_PREFIX}replaced-{final.name}")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(final)
    _fsync(final.parent)


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or None when it is one."""
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (not completely written)"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


@dataclass(frozen=True)
class CheckpointScan:
    """The checkpoints of an output directory: complete ones by step, and the rest with the reason."""

    complete: list[Path] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def latest(self) -> Path | None:
        return self.complete[-1] if self.complete else None


def scan_checkpoints(run_dir: Path) -> CheckpointScan:
    """Every ``checkpoint-N`` and ``.partial-checkpoint-N`` in ``run_dir``, sorted by step."""
    complete: list[tuple[int, Path]] = []
    incomplete: list[tuple[Path, str]] = []
    if not run_dir.is_dir():
        return CheckpointScan()
    for path in sorted(run_dir.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(PARTIAL_PREFIX):
            incomplete.append((path, "a checkpoint that was being written when the run stopped"))
            continue
        step = checkpoint_step(path)
        if step is None:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append((step, path))
        else:
            incomplete.append((path, problem))
    return CheckpointScan([p for _, p in sorted(complete)], incomplete)


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: list[Path]) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit``; returns what was deleted.

    The newest complete checkpoint and ``keep`` (the best one) are never deleted; incomplete
    directories are neither counted nor touched (a rerun reports them).
    """
    if limit is None or limit <= 0:
        return []
    complete = scan_checkpoints(run_dir).complete
    protected = {p.resolve() for p in keep if p.exists()}
    if complete:
        protected.add(complete[-1].resolve())
    deleted = []
    excess = len(complete) - max(limit, len(protected))
    for path in complete:
        if excess <= 0:
            break
        if path.resolve() in protected:
            continue
        shutil.rmtree(path)
        deleted.append(path)
        excess -= 1
    return deleted


# -- the rerun decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    """What a (re)run does: resume from ``checkpoint`` (None: from step 0) or nothing (``finished``)."""

    checkpoint: str | None
    finished: bool
    messages: list[str]


def _record_training(directory: Path) -> dict[str, Any] | None:
    """The ``training`` part of a directory's run record (None when it has no record)."""
    path = directory / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: unreadable run record ({err})") from err
    training = data.get("training") if isinstance(data, dict) else None
    return training if isinstance(training, dict) else None


def _same_run_record(directory: Path, current: dict[str, Any], where: str) -> dict[str, Any]:
    """The run record of ``directory`` if it is this run's; else :class:`RunMismatchError` naming the difference."""
    training = _record_training(directory)
    if training is None or "identity" not in training:
        raise RunMismatchError(
            f"{where} was not written by this version of vidlora's training (its {RECORD_FILE} records no "
            "run identity), so it cannot be told whether it is this run; pass --overwrite_output_dir True "
            "to start over, or choose another --output_dir"
        )
    differences = _differences("", training["identity"], current["identity"])
    if differences:
        listed = "\n".join(f"  - {d}" for d in differences[:20])
        raise RunMismatchError(
            f"{where} holds checkpoints of a different run; what differs (checkpoint -> this command):\n"
            f"{listed}\nPass --overwrite_output_dir True to delete them and start over, or choose another "
            "--output_dir."
        )
    return training


def plan_resume(
    output_dir: Path,
    *,
    resume_from_checkpoint: str | None,
    overwrite_output_dir: bool,
    current: dict[str, Any],
) -> ResumePlan:
    """Decide where this run starts. Main process only: it deletes partial checkpoints (and, with
    ``overwrite_output_dir``, the whole earlier run). ``current`` is this run's record ``training``
    dict, its ``identity`` included (:func:`run_identity`).

    Raises:
        RunMismatchError: the checkpoint to resume belongs to another run.
        NotFoundError: ``--resume_from_checkpoint`` names nothing usable.
        AlreadyExistsError / UsageError: contradictory flags and contents.
    """
    messages: list[str] = []
    wanted = resume_from_checkpoint
    explicit_fresh = wanted is not None and wanted.lower() in ("false", "none", "")
    if explicit_fresh:
        wanted = None
    if overwrite_output_dir:
        if wanted is not None:
            raise UsageError(
                "--overwrite_output_dir True starts over; it cannot be combined with --resume_from_checkpoint"
            )
        removed = clear_run(output_dir)
        if removed:
            messages.append(f"--overwrite_output_dir: deleted {', '.join(removed)}; starting from step 0")
        return ResumePlan(None, False, messages)

    scan = scan_checkpoints(output_dir)
    for path, why in scan.incomplete:
        if path.name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            messages.append(f"removed {path.name}: {why}")
        else:
            messages.append(f"ignoring {path.name}: {why}")

    if wanted is not None and wanted.lower() != "latest":
        checkpoint = Path(wanted)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise NotFoundError(
                f"--resume_from_checkpoint {wanted}: not a checkpoint directory (no {TRAINER_STATE})"
            )
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise NotFoundError(f"--resume_from_checkpoint {wanted}: incomplete checkpoint ({problem})")
        previous = _same_run_record(checkpoint, current, str(checkpoint))
        return ResumePlan(str(checkpoint), False, [*messages, *_resume_notes(checkpoint, previous, current)])

    latest = scan.latest
    finished = (output_dir / FINISHED_FILE).is_file()
    if latest is None:
        if wanted is not None:
            raise NotFoundError(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint")
        if not finished or explicit_fresh:
            return ResumePlan(None, False, messages)
        # A finished run that kept no checkpoint (--save_strategy no): its final output decides.
        previous = _same_run_record(output_dir, current, str(output_dir))
        if not changed_settings(previous, current):
            return ResumePlan(None, True, [*messages, _finished_note(output_dir)])
        raise AlreadyExistsError(
            f"{output_dir} holds a finished run and no checkpoint to continue it from; pass "
            "--overwrite_output_dir True to train it again with the new settings"
        )
    if explicit_fresh:
        raise AlreadyExistsError(
            f"--resume_from_checkpoint False, but {output_dir} holds checkpoints ({latest.name}); pass "
            "--overwrite_output_dir True to delete them and start over"
        )
    previous = _same_run_record(latest, current, str(output_dir))
    if finished and not changed_settings(previous, current):
        return ResumePlan(None, True, [*messages, _finished_note(output_dir)])
    return ResumePlan(str(latest), False, [*messages, *_resume_notes(latest, previous, current)])


def _resume_notes(checkpoint: Path, previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    notes = [f"resuming from {checkpoint} (step {_state_step(checkpoint)})"]
    changes = changed_settings(previous, current)
    if changes:
        notes.append("changed since that checkpoint (allowed): " + "; ".join(changes))
    return notes


def _state_step(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return checkpoint_step(checkpoint)


def finished_step(output_dir: Path) -> int | None:
    """The step a finished run in ``output_dir`` ended at (None: not finished, or unreadable)."""
    try:
        return int(json.loads((output_dir / FINISHED_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished_note(output_dir: Path) -> str:
    step = finished_step(output_dir)
    return (
        f"{output_dir} holds this run, finished at step {'?' if step is None else step}: nothing to do (pass --overwrite_output_dir True "
        "to train it again, or change a setting such as --num_train_epochs to continue it)"
    )


def mark_finished(output_dir: Path, global_step: int) -> None:
    """Written last by a run that ended normally: a rerun of the same command then does nothing."""
    write_text_atomic(output_dir / FINISHED_FILE, json.dumps({"global_step": global_step}) + "\n")


def clear_run(output_dir: Path) -> list[str]:
    """Delete what a run leaves in ``output_dir`` (checkpoints, partial ones, the finished mark)."""
    removed: list[str] = []
    if not output_dir.is_dir():
        return removed
    for path in sorted(output_dir.iterdir()):
        if path.is_dir() and (checkpoint_step(path) is not None or path.name.startswith(PARTIAL_PREFIX)):
            shutil.rmtree(path)
            removed.append(path.name)
    if (output_dir / FINISHED_FILE).is_file():
        (output_dir / FINISHED_FILE).unlink()
        removed.append(FINISHED_FILE)
    return removed
