"""The rerun decision and checkpoint completeness, on hand-made output directories (no training).

A checkpoint here is what `VidloraTrainer._save_checkpoint` leaves: files written into
`.partial-checkpoint-N`, sealed (completeness marker) and renamed; the record's `training` dict
carries the run identity that a rerun is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vidlora.errors import AlreadyExistsError, NotFoundError, UsageError
from vidlora.training.run_dir import (
    COMPLETE_MARKER,
    FINISHED_FILE,
    RunMismatchError,
    checkpoint_problem,
    mark_finished,
    partial_dir,
    plan_resume,
    rotate_checkpoints,
    run_identity,
    scan_checkpoints,
    seal_checkpoint,
)


def _arguments(
    data_file: Path, *, lora_r: int = 8, learning_rate: float = 2e-4, video_folder: str = "/v"
) -> dict:
    model = {"model_name_or_path": "/models/tiny", "version": "v1", "attn_implementation": "sdpa"}
    data = {
        "data_path": [str(data_file)],
        "video_folder": video_folder,
        "num_frames": None,
        "decode_timeout": 30.0,
    }
    training = {"lora_enable": True, "lora_r": lora_r, "learning_rate": learning_rate, "output_dir": "/o"}
    return {
        "model_args": model,
        "data_args": data,
        "training_args": training,
        "identity": run_identity(model, data, training),
    }


def _checkpoint(run_dir: Path, step: int, arguments: dict, *, seal: bool = True) -> Path:
    partial = partial_dir(run_dir, step)
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"x" * (100 + step))
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (partial / "vidlora_config.json").write_text(json.dumps({"format": 2, "training": arguments}))
    final = run_dir / f"checkpoint-{step}"
    if seal:
        seal_checkpoint(partial, final, step, world_size=1)
        return final
    return partial


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text('[{"id": "a", "conversations": []}]')
    return path


def _plan(out: Path, current: dict, resume: str | None = None, overwrite: bool = False):
    return plan_resume(out, resume_from_checkpoint=resume, overwrite_output_dir=overwrite, current=current)


def test_a_sealed_checkpoint_is_complete_and_a_changed_file_is_not(tmp_path, data_file):
    checkpoint = _checkpoint(tmp_path / "out", 2, _arguments(data_file))
    assert checkpoint_problem(checkpoint) is None
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert marker["step"] == 2 and marker["files"]["adapter_model.safetensors"] == 102
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 10)
    assert checkpoint_problem(checkpoint) == "adapter_model.safetensors has 10 bytes, 102 were written"
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 102)
    (checkpoint / "trainer_state.json").unlink()
    assert checkpoint_problem(checkpoint) == "trainer_state.json is missing"


def test_rerun_resumes_from_the_latest_complete_checkpoint_and_drops_the_partial_one(tmp_path, data_file):
    out, arguments = tmp_path / "out", _arguments(data_file)
    _checkpoint(out, 2, arguments)
    _checkpoint(out, 4, arguments)
    _checkpoint(out, 6, arguments, seal=False)  # the kill came while step 6 was being saved
    unsealed = out / "checkpoint-8"  # e.g. copied by hand, or by an older writer: never picked
    unsealed.mkdir()
    (unsealed / "trainer_state.json").write_text("{}")
    plan = _plan(out, arguments)
    assert plan.checkpoint == str(out / "checkpoint-4") and not plan.finished
    assert plan.messages == [
        "removed .partial-checkpoint-6: a checkpoint that was being written when the run stopped",
        f"ignoring checkpoint-8: no {COMPLETE_MARKER} (not completely written)",
        f"resuming from {out / 'checkpoint-4'} (step 4)",
    ]
    assert not partial_dir(out, 6).exists() and unsealed.exists()
    # `latest` says the same explicitly; a path picks that checkpoint.
    assert _plan(out, arguments, "latest").checkpoint == str(out / "checkpoint-4")
    assert _plan(out, arguments, str(out / "checkpoint-2")).checkpoint == str(out / "checkpoint-2")


def test_an_empty_or_new_output_dir_starts_from_step_zero(tmp_path, data_file):
    assert _plan(tmp_path / "new", _arguments(data_file)) == _plan(tmp_path, _arguments(data_file))
    assert _plan(tmp_path / "new", _arguments(data_file)).checkpoint is None
    with pytest.raises(NotFoundError, match="holds no complete checkpoint"):
        _plan(tmp_path / "new", _arguments(data_file), "latest")


def test_another_run_is_refused_with_the_difference_named(tmp_path, data_file):
    out = tmp_path / "out"
    _checkpoint(out, 2, _arguments(data_file))
    with pytest.raises(RunMismatchError, match=r"recipe\.lora_r: 8 -> 16"):
        _plan(out, _arguments(data_file, lora_r=16))
    other_data = tmp_path / "other.json"
    other_data.write_text('[{"id": "b", "conversations": []}]')
    with pytest.raises(RunMismatchError, match=r"data\.data_files: .*other\.json"):
        _plan(out, _arguments(other_data))
    # Same name, other content: still other data.
    data_file.write_text('[{"id": "a2", "conversations": []}]')
    with pytest.raises(RunMismatchError, match=r"data\.data_files: .*sha256"):
        _plan(out, _arguments(data_file))
    assert (out / "checkpoint-2").is_dir()  # nothing was deleted


def test_changed_hyperparameters_and_moved_media_are_allowed_and_reported(tmp_path, data_file):
    out = tmp_path / "out"
    _checkpoint(out, 2, _arguments(data_file))
    plan = _plan(out, _arguments(data_file, learning_rate=1e-4, video_folder="/mnt/v"))
    assert plan.checkpoint == str(out / "checkpoint-2")
    assert plan.messages[-1] == (
        'changed since that checkpoint (allowed): --video_folder: "/v" -> "/mnt/v"; --learning_rate: 0.0002 -> 0.0001'
    )


def test_a_finished_run_is_left_alone_unless_a_setting_changed(tmp_path, data_file):
    out, arguments = tmp_path / "out", _arguments(data_file)
    _checkpoint(out, 5, arguments)
    mark_finished(out, 5)
    plan = _plan(out, arguments)
    assert plan.finished and plan.checkpoint is None
    assert "finished at step 5: nothing to do" in plan.messages[-1]
    # More epochs (or any hyperparameter): continue from the last checkpoint.
    longer = _arguments(data_file)
    longer["training_args"]["num_train_epochs"] = 2
    assert _plan(out, longer).checkpoint == str(out / "checkpoint-5")


def test_overwrite_deletes_the_earlier_run_and_cannot_be_combined_with_resume(tmp_path, data_file):
    out, arguments = tmp_path / "out", _arguments(data_file)
    _checkpoint(out, 2, _arguments(data_file, lora_r=4))
    _checkpoint(out, 4, arguments, seal=False)
    mark_finished(out, 2)
    (out / "adapter_model.safetensors").write_bytes(b"final")
    with pytest.raises(UsageError, match="cannot be combined"):
        _plan(out, arguments, "latest", overwrite=True)
    plan = _plan(out, arguments, overwrite=True)
    assert plan.checkpoint is None and not plan.finished
    assert plan.messages == [
        f"--overwrite_output_dir: deleted .partial-checkpoint-4, checkpoint-2, {FINISHED_FILE}; starting from step 0"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]


def test_resume_false_with_checkpoints_present_asks_for_overwrite(tmp_path, data_file):
    out = tmp_path / "out"
    _checkpoint(out, 2, _arguments(data_file))
    with pytest.raises(AlreadyExistsError, match="--overwrite_output_dir True"):
        _plan(out, _arguments(data_file), "False")


def test_an_explicit_incomplete_or_foreign_checkpoint_is_refused(tmp_path, data_file):
    out, arguments = tmp_path / "out", _arguments(data_file)
    partial = _checkpoint(out, 2, arguments, seal=False)
    with pytest.raises(NotFoundError, match="incomplete checkpoint"):
        _plan(tmp_path / "elsewhere", arguments, str(partial))
    with pytest.raises(NotFoundError, match="not a checkpoint directory"):
        _plan(tmp_path / "elsewhere", arguments, str(tmp_path / "nothing"))
    legacy = _checkpoint(tmp_path / "old", 2, {"training_args": {}})
    with pytest.raises(RunMismatchError, match="records no run identity"):
        _plan(tmp_path / "elsewhere", arguments, str(legacy))


def test_rotation_counts_complete_checkpoints_and_keeps_the_newest_and_best(tmp_path, data_file):
    out, arguments = tmp_path / "out", _arguments(data_file)
    for step in (2, 4, 6, 8):
        _checkpoint(out, step, arguments)
    _checkpoint(out, 10, arguments, seal=False)  # being written: neither counted nor touched
    deleted = rotate_checkpoints(out, 2, keep=[out / "checkpoint-2"])
    assert [p.name for p in deleted] == ["checkpoint-4", "checkpoint-6"]
    assert [p.name for p in scan_checkpoints(out).complete] == ["checkpoint-2", "checkpoint-8"]
    assert partial_dir(out, 10).is_dir()
    # A limit of 1 keeps the newest complete one, whatever sorts first by name or time.
    assert [p.name for p in rotate_checkpoints(out, 1, keep=[])] == ["checkpoint-2"]
    assert [p.name for p in scan_checkpoints(out).complete] == ["checkpoint-8"]


def test_sealing_over_an_existing_checkpoint_of_the_same_step_replaces_it(tmp_path, data_file):
    out, arguments = tmp_path / "out", _arguments(data_file)
    _checkpoint(out, 2, arguments)
    partial = _checkpoint(out, 2, _arguments(data_file, learning_rate=1.0), seal=False)
    seal_checkpoint(partial, out / "checkpoint-2", 2, world_size=1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    record = json.loads((out / "checkpoint-2" / "vidlora_config.json").read_text())
    assert record["training"]["training_args"]["learning_rate"] == 1.0
