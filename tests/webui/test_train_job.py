"""The Train tab's pieces: the form is the seed's command, jobs outlive the page, the loss curve reader."""

from __future__ import annotations

import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import transformers

from vidlora.args import DataArguments, ModelArguments, TrainingArguments
from vidlora.training.run_dir import TRAINER_STATE, partial_dir, seal_checkpoint
from vidlora.webui.train_job import (
    JOB_FILE,
    LAUNCH_MARKER,
    Jobs,
    TrainJob,
    flags_from_form,
    form_fields,
    form_from_flags,
    launch_words,
    loss_points,
    split_launch,
)

SEED_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "finetune_lora.sh"


def seed_script_flags(cuda_available: bool) -> list[str]:
    """The flags scripts/finetune_lora.sh passes to vidlora.train, its variables at their defaults."""
    text = SEED_SCRIPT.read_text()
    variables = dict(re.findall(r"^(\w+)=\$\{\w+:-(.*)\}$", text, flags=re.M))
    block = text[text.index("exec deepspeed") :]
    words = shlex.split(block.replace("\\\n", " "))
    words = words[words.index("vidlora.train") + 1 :]
    device = ["--tf32", "True" if cuda_available else "False"]
    out: list[str] = []
    for word in words:
        if word == "${DEVICE_FLAGS[@]}":
            out += device
        elif word != "$@":
            out.append(re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], word))
    return out


def parsed(argv: list[str]) -> dict:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    namespace, leftover = parser.parse_known_args(argv)
    assert leftover == []
    return vars(namespace)


def default_form_flags(cuda_available: bool, extra: str = "") -> list[str]:
    fields = [f for section in form_fields(cuda_available=cuda_available).values() for f in section]
    return flags_from_form(fields, [f.default for f in fields], extra)


@pytest.mark.parametrize("cuda_available", [False, True])
def test_the_untouched_form_is_the_seed_command(cuda_available):
    seed = seed_script_flags(cuda_available)
    assert seed[:4] == [
        "--deepspeed",
        "configs/zero3.json",
        "--model_name_or_path",
        "LanguageBind/Video-LLaVA-7B",
    ]
    assert len(seed) == 81  # 40 flags (--X takes two values), so a change to the script is seen here
    form = default_form_flags(cuda_available)
    # Every value the parser ends up with is the same: the seed's flags, and defaults elsewhere.
    assert parsed(form) == parsed(seed)
    assert parsed(form)["lora_r"] == 128 and parsed(form)["lora_alpha"] == 256
    assert parsed(form)["tf32"] is cuda_available


def test_more_arguments_replace_the_form_value_in_place():
    flags = default_form_flags(False, "--max_steps 5 --report_to none --seed 3 --X Video")
    assert flags.count("--max_steps") == 1 and flags.count("--report_to") == 1
    assert flags[flags.index("--max_steps") + 1] == "5"
    assert flags[flags.index("--X") + 1 : flags.index("--X") + 3] == ["Video", "--cache_dir"]
    assert flags[-2:] == ["--seed", "3"]  # not in the form: appended
    values = parsed(flags)
    assert (values["max_steps"], values["report_to"], values["seed"], values["X"]) == (
        5,
        "none",
        3,
        ["Video"],
    )
    assert launch_words(flags, 2)[:5] == ["deepspeed", "--num_gpus", "2", "--module", "vidlora.train"]
    assert launch_words(flags)[:2] == ["vidlora", "train"]


def test_a_jobs_command_fills_the_form_back():
    fields = [f for section in form_fields().values() for f in section]
    extra = "--max_steps 5 --seed 3 --X Video --deepspeed configs/zero2.json --bf16 False"
    flags = flags_from_form(fields, [f.default for f in fields], extra)
    for processes in (1, 4):
        back, count = split_launch(launch_words(flags, processes))
        assert (back, count) == (flags, processes)
    values, more = form_from_flags(fields, flags)
    assert more == "--seed 3"
    assert flags_from_form(fields, values, more) == flags
    by_name = dict(zip([f.name for f in fields], values, strict=True))
    assert (by_name["max_steps"], by_name["X"], by_name["bf16"], by_name["lora_r"]) == (
        5,
        "Video",
        False,
        128,
    )
    assert by_name["eval_data_path"] == "" and by_name["mm_projector_lr"] is None  # absent: left empty


# A stand-in for `vidlora train`: prints two of the Trainer's log dicts, starts a child (the
# DeepSpeed launcher's ranks) and waits to be stopped.
FAKE_TRAIN = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[-1], "w").write(str(child.pid))
print("{'loss': '2.5', 'grad_norm': '1.0', 'epoch': '0.1'}")
print("{'loss': '2.25', 'grad_norm': '1.0', 'epoch': '0.2'}")
time.sleep(120)
"""


def _wait(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_job_is_found_again_from_its_output_dir_stopped_and_resumed(tmp_path):
    out = tmp_path / "run"
    child_file = tmp_path / "child.pid"
    words = ["python", "-c", FAKE_TRAIN, "--output_dir", str(out), "--logging_steps", "3", str(child_file)]
    launcher = Jobs()
    job = launcher.launch(words)
    assert json.loads((out / JOB_FILE).read_text())["pid"] == job.pid
    _wait(lambda: len(loss_points(out, job.log_path)) == 2)

    # A new web UI (a restarted server, a refreshed page) knows nothing but the output dir.
    found = Jobs().find(out)
    assert found is not None and found.running and found.pid == job.pid
    assert found.command == shlex.join(words) and found.state() == "running"
    assert found.loss_points() == [(3, 2.5), (6, 2.25)]
    assert "{'loss': '2.25'" in found.log_tail()
    with pytest.raises(Exception, match="is running there"):
        launcher.launch(words)

    child = int(child_file.read_text())
    assert found.stop()
    assert launcher.wait(job, timeout=20) == -signal.SIGTERM
    _wait(lambda: not _pid_alive(child))  # the whole process group got the signal
    after = Jobs().find(out)
    assert after is not None and not after.running
    assert after.state() == f"stopped (exit {-signal.SIGTERM})"
    assert not after.stop()

    again = launcher.resume(out)
    assert again.words == words and again.pid != job.pid
    _wait(
        lambda: (
            loss_points(out, again.log_path) == [(3, 2.5), (6, 2.25)] and child_file.read_text() != str(child)
        )
    )
    assert again.log_path.read_text().count(LAUNCH_MARKER) == 2
    assert again.stop()
    launcher.wait(again, timeout=20)


def test_a_dead_pid_in_the_job_file_is_not_running(tmp_path):
    job = TrainJob(str(tmp_path), ["vidlora", "train"], 2**22 - 1, 12345, time.time(), 0, 1)
    job.save()
    found = TrainJob.find(tmp_path)
    assert found is not None and not found.running and found.state() == "ended (see the log)"


def _sealed_checkpoint(run_dir: Path, step: int, history: list[dict]) -> None:
    partial = partial_dir(run_dir, step)
    partial.mkdir(parents=True)
    (partial / TRAINER_STATE).write_text(json.dumps({"global_step": step, "log_history": history}))
    seal_checkpoint(partial, run_dir / f"checkpoint-{step}", step, world_size=1)


def test_loss_points_take_saved_steps_then_the_log_since_the_last_launch(tmp_path):
    history = [
        {"loss": 3.0, "step": 2, "epoch": 0.1},
        {"loss": 2.75, "step": 4, "epoch": 0.2},
        {"eval_loss": 9.0, "step": 4},
    ]
    _sealed_checkpoint(tmp_path, 4, history)
    (tmp_path / ".partial-checkpoint-6").mkdir()  # being written: never read
    log = tmp_path / "train.log"
    log.write_text(
        f"{LAUNCH_MARKER} 0, logging every 2 steps: vidlora train --logging_steps 2\n"
        "{'loss': '3.001', 'epoch': '0.1'}\n{'loss': '2.8', 'epoch': '0.2'}\n{'loss': '2.5', 'epoch': '0.3'}\n"
        "Killed\n"
        f"{LAUNCH_MARKER} 4, logging every 2 steps: vidlora train --logging_steps 2 {{'loss': '1.0'}}\n"
        " 50%|█████     | 3/6 [00:01<00:01]\r{'loss': '2.5', 'grad_norm': '1', 'epoch': '0.3'}\n"
        " 67%|██████    | 4/6 [00:01<00:01]{'loss': '2.125', 'epoch': '0.4'}\r 83%|████ | 5/6\n"
        "{'eval_loss': '8.0', 'epoch': '0.4'}\n"
    )
    # Steps 2 and 4 exactly as saved; the resumed run's log numbers on from step 4.
    assert loss_points(tmp_path, log) == [(2, 3.0), (4, 2.75), (6, 2.5), (8, 2.125)]
    assert loss_points(tmp_path) == [(2, 3.0), (4, 2.75)]
    assert loss_points(tmp_path / "nothing", None) == []
