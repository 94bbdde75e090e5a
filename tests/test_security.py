"""What vidlora executes and reads from files it is given (SECURITY.md): no pickle without
``weights_only=True``, no remote code unless asked, no eval/exec, and every safetensors header
checked before a tensor is read.

The source scan reads the package, the benchmarks and the scripts with ``ast``, so a call can't hide
in a string or a comment, and its checker is itself shown to catch each pattern it forbids. The
safetensors files are written byte by byte, each with one lie in its header.
"""

from __future__ import annotations

import ast
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vidlora.checkpoint import ADAPTER_WEIGHTS, NON_LORA_FILE, load_trainables
from vidlora.errors import UsageError
from vidlora.model.hub import keys_of, read_tensors
from vidlora.model.safetensors_check import (
    MAX_HEADER_BYTES,
    SafetensorsHeaderError,
    TensorEntry,
    check_safetensors,
)

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "src" / "vidlora", ROOT / "benchmarks", ROOT / "scripts"]

# -- the source scan -------------------------------------------------------------------------------

#: Calls that unpickle (or run) whatever bytes they are given.
UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
    "dill.loads", "marshal.load", "marshal.loads", "joblib.load", "torch.jit.load", "eval", "exec",
    "builtins.eval", "builtins.exec", "shelve.open",
}  # fmt: skip


def _dotted(node: ast.expr) -> str:
    """``torch.load`` for ``torch.load``, ``eval`` for ``eval``; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems_in(source: str, where: str) -> tuple[list[str], int]:
    """What the security rules forbid in one file's source, and how many ``torch.load`` calls it has."""
    problems: list[str] = []
    torch_loads = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            at = f"{where}:{node.lineno}"
            if name in UNSAFE_CALLS:
                problems.append(f"{at}: {name}(...)")
            if name == "torch.load":
                torch_loads += 1
                if any(k.arg is None for k in node.keywords):
                    problems.append(f"{at}: torch.load(**...) may hide weights_only")
                if not any(k.arg == "weights_only" and _is_true(k.value) for k in node.keywords):
                    problems.append(f"{at}: torch.load without a literal weights_only=True")
            if name in ("numpy.load", "np.load") and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                problems.append(f"{at}: {name}(allow_pickle=...)")
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and _is_true(keyword.value):
                    problems.append(f"{at}: trust_remote_code=True")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    problems.append(f"{where}:{node.lineno}: {{'trust_remote_code': True}}")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(alias.name == "load" for alias in node.names)
        ):
            problems.append(f"{where}:{node.lineno}: `from torch import load` hides torch.load calls")
    # In line order (ast.walk goes breadth first).
    return sorted(problems, key=lambda p: int(p.split(":")[1])), torch_loads


def _sources() -> list[Path]:
    return sorted(p for folder in SCANNED if folder.is_dir() for p in folder.rglob("*.py"))


def test_the_checker_catches_every_forbidden_pattern():
    bad = """
import pickle, torch
torch.load(p)
torch.load(p, weights_only=False)
torch.load(p, **options)
torch.load(p, weights_only=flag)
pickle.loads(blob)
eval(text)
exec(text)
AutoTokenizer.from_pretrained(p, trust_remote_code=True)
kwargs = {"trust_remote_code": True}
np.load(p, allow_pickle=True)
from torch import load
"""
    problems, loads = problems_in(bad, "bad.py")
    assert loads == 4
    assert [p.split(": ", 1)[1] for p in problems] == [
        "torch.load without a literal weights_only=True",
        "torch.load without a literal weights_only=True",
        "torch.load(**...) may hide weights_only",
        "torch.load without a literal weights_only=True",
        "torch.load without a literal weights_only=True",
        "pickle.loads(...)",
        "eval(...)",
        "exec(...)",
        "trust_remote_code=True",
        "{'trust_remote_code': True}",
        "np.load(allow_pickle=...)",
        "`from torch import load` hides torch.load calls",
    ]
    fine = """
torch.load(p, map_location="cpu", weights_only=True, mmap=True)
model.eval()
ast.literal_eval(text)
AutoTokenizer.from_pretrained(p, trust_remote_code=args.trust_remote_code)
AutoConfig.from_pretrained(p, trust_remote_code=False)
"""
    assert problems_in(fine, "fine.py") == ([], 1)


def test_the_package_benchmarks_and_scripts_unpickle_nothing_and_run_no_remote_code():
    files = _sources()
    assert ROOT / "src" / "vidlora" / "model" / "hub.py" in files and len(files) > 50
    problems: list[str] = []
    torch_loads = 0
    for path in files:
        found, loads = problems_in(path.read_text(), str(path.relative_to(ROOT)))
        problems += found
        torch_loads += loads
    # The decode watchdog exchanges pickled messages with the child process it started itself
    # (pipes it owns, never bytes from a file or the network): the one allowed unpickling.
    ipc = [
        p
        for p in problems
        if p.startswith("src/vidlora/data/watchdog.py:") and p.endswith("pickle.loads(...)")
    ]
    assert ipc and [p for p in problems if p not in ipc] == []
    assert torch_loads >= 1  # the legacy .bin reader (model/hub.py): the scan sees real calls


def _mentions_training_args(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id == "TRAINING_ARGS_NAME")
        or (isinstance(n, ast.Constant) and n.value == "training_args.bin")
        for n in ast.walk(node)
    )


def test_training_args_bin_is_written_but_never_read_back():
    # The Trainer (and our projector-only save) pickle TrainingArguments into training_args.bin;
    # nothing in vidlora reads it back (resume reads trainer_state.json and weights-only .pt files).
    writers, others = [], []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                _mentions_training_args(a) for a in [*node.args, *(k.value for k in node.keywords)]
            ):
                name = _dotted(node.func)
                if name in ("os.path.join", "Path"):
                    continue  # building the path; its use is the enclosing call
                (writers if name == "torch.save" else others).append(f"{path.name}:{node.lineno} {name}")
    assert others == []
    assert [w.split(":")[0] for w in writers] == ["trainer.py"]


# -- safetensors headers ---------------------------------------------------------------------------


def _write(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file: 8-byte length (``length`` overrides the true one), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


MALICIOUS = {
    "header_length_2_60": (dict(header={}, length=2**60), f"header length {2**60} is over the {MAX_HEADER_BYTES}"),
    "header_past_eof": (dict(header={}, length=4096), r"header length 4096 runs past the end of the file \(10 bytes\)"),
    "offsets_past_eof": (
        dict(header={"w": _f32([4], 0, 16)}, data=bytes(8)),
        r"tensor 'w': data_offsets \[0, 16\] lie outside the 8 data bytes",
    ),
    "huge_offsets": (
        dict(header={"w": _f32([2**40], 0, 2**42)}, data=bytes(16)),
        r"tensor 'w': data_offsets \[0, 4398046511104\] lie outside the 16 data bytes",
    ),
    "overlap": (
        dict(header={"a": _f32([4], 0, 16), "b": _f32([4], 8, 24)}, data=bytes(24)),
        r"tensors 'a' and 'b' overlap \(bytes 8..16\)",
    ),
    "shape_mismatch": (
        dict(header={"w": _f32([5], 0, 16)}, data=bytes(16)),
        r"tensor 'w': shape \[5\] of F32 needs 20 bytes, its offsets span 16",
    ),
    "gap": (
        dict(header={"a": _f32([1], 0, 4), "b": _f32([1], 8, 12)}, data=bytes(12)),
        r"data bytes 4..8 \(before 'b'\) belong to no tensor",
    ),
    "trailing_bytes": (
        dict(header={"a": _f32([1], 0, 4)}, data=bytes(64)),
        r"data bytes 4..64 \(after the last tensor\) belong to no tensor",
    ),
    "unknown_dtype": (
        dict(header={"w": {"dtype": "F4", "shape": [8], "data_offsets": [0, 4]}}, data=bytes(4)),
        "tensor 'w': dtype 'F4' is not one vidlora reads",
    ),
    "negative_shape": (
        dict(header={"w": _f32([-1, 4], 0, 0)}),
        r"tensor 'w': shape \[-1, 4\] is not a list of non-negative integers",
    ),
    "boolean_offsets": (
        dict(header={"w": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, data=bytes(1)),
        r"tensor 'w': data_offsets \[False, True\] is not \[begin, end\]",
    ),
    "not_json": (dict(header=b"{not json"), "the header is not JSON"),
    "not_utf8": (dict(header=b'{"\xff": 1}'), "the header is not UTF-8"),
    "a_list": (dict(header=[1, 2]), "the header is a JSON list, not an object"),
    "deeply_nested": (dict(header=b"[" * 200_000 + b"]" * 200_000), "nested too deeply"),
    "duplicate_name": (
        dict(header=b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": 1}', data=bytes(1)),
        "the header names 'w' twice",
    ),
    "bad_metadata": (dict(header={"__metadata__": {"format": 1}}), "'__metadata__' must be an object of strings"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_a_malicious_safetensors_header_is_refused_with_the_file_and_the_reason(tmp_path, case):
    spec, reason = MALICIOUS[case]
    path = _write(tmp_path / f"{case}.safetensors", **spec)
    started = time.monotonic()
    with pytest.raises(SafetensorsHeaderError, match=reason) as caught:
        check_safetensors(path)
    assert str(caught.value).startswith(f"{path}: not a valid safetensors file: ")
    assert isinstance(caught.value, UsageError)  # the CLI's one error policy: one line, exit 2
    assert time.monotonic() - started < 30  # bounded: a check, not an allocation of 2^60 bytes


def test_a_file_shorter_than_the_length_prefix_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsHeaderError, match="2 bytes, shorter than the 8-byte header length"):
        check_safetensors(path)


def test_files_safetensors_writes_pass_and_their_entries_are_listed(tmp_path):
    tensors = {
        "empty": torch.zeros(0, 3),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "ids": torch.arange(5),
        "mask": torch.zeros(2, dtype=torch.bool),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    entries = check_safetensors(path)
    assert entries == {
        "ids": TensorEntry("I64", (5,), 0, 40),
        "empty": TensorEntry("F32", (0, 3), 40, 40),
        "half": TensorEntry("BF16", (3,), 40, 46),
        "mask": TensorEntry("BOOL", (2,), 46, 48),
    }
    save_file({}, str(tmp_path / "none.safetensors"))
    assert check_safetensors(tmp_path / "none.safetensors") == {}


def test_safetensors_own_reader_refuses_the_same_files_but_names_no_file(tmp_path):
    # Why the check: the library refuses these too, with an error of its own type naming no file.
    path = _write(tmp_path / "overlap.safetensors", {"a": _f32([4], 0, 16), "b": _f32([4], 8, 24)}, bytes(24))
    with pytest.raises(SafetensorError) as caught:
        load_file(str(path))
    assert str(path) not in str(caught.value)


@pytest.fixture
def hostile(tmp_path) -> Path:
    return _write(tmp_path / "hostile.safetensors", {}, length=2**60)


def test_every_safetensors_reader_of_vidlora_checks_the_header_first(hostile):
    with pytest.raises(SafetensorsHeaderError, match=r"hostile\.safetensors"):
        read_tensors(hostile)  # model shards, --pretrain_mm_mlp_adapter
    with pytest.raises(SafetensorsHeaderError, match=r"hostile\.safetensors"):
        keys_of([hostile])  # layout detection, "does this checkpoint hold a projector"
    with pytest.raises(SafetensorsHeaderError, match=r"hostile\.safetensors"):
        load_trainables(torch.nn.Linear(1, 1), hostile)  # non_lora_trainables (resume, inference)


@pytest.fixture(scope="module")
def adapter_checkpoint(tmp_path_factory) -> Path:
    """A vidlora LoRA checkpoint of the tiny model, written as training writes one."""
    from vidlora.checkpoint import BaseModel, RunRecord, write_record, write_trainables
    from vidlora.data.processor import Processor
    from vidlora.model.loading import load_pretrained
    from vidlora.model.lora import apply_recipe, build_lora_config

    loaded = load_pretrained("tiny")
    model = apply_recipe(loaded.model, build_lora_config(loaded.model, 8, 16, dropout=0.0))
    out = tmp_path_factory.mktemp("adapter") / "checkpoint-3"
    out.mkdir()
    model.save_pretrained(out)
    write_trainables(model, out)
    write_record(out, RunRecord(BaseModel("tiny"), Processor.for_model(model.get_base_model().config), {}))
    loaded.tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("victim", [ADAPTER_WEIGHTS, NON_LORA_FILE])
def test_loading_a_checkpoint_with_a_hostile_file_stops_at_its_header(adapter_checkpoint, tmp_path, victim):
    from vidlora.infer.load import load_for_inference

    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(adapter_checkpoint, checkpoint)
    assert sorted(load_file(str(checkpoint / victim)))  # a real file first
    _write(checkpoint / victim, {"w": _f32([4], 0, 16)}, bytes(8))
    with pytest.raises(
        SafetensorsHeaderError, match=rf"{victim}: not a valid .* lie outside the 8 data bytes"
    ):
        load_for_inference(str(checkpoint))


def test_resuming_from_a_checkpoint_with_a_hostile_adapter_is_a_usage_error(
    adapter_checkpoint, tmp_path, capsys
):
    from vidlora.cli import main
    from vidlora.data.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, 4, 0, seed=0)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    shutil.copytree(adapter_checkpoint, checkpoint)
    _write(checkpoint / ADAPTER_WEIGHTS, {}, length=2**60)
    argv = [
        "train", "--model_name_or_path", "tiny", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--data_path", str(data / "train.json"), "--video_folder", str(data), "--image_folder", str(data),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--per_device_train_batch_size", "1",
        "--resume_from_checkpoint", str(checkpoint), "--tf32", "False", "--report_to", "none",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    # The rerun decision refuses it before any tensor is read: it is not a sealed training checkpoint
    # (a sealed one whose file is replaced fails its size marker the same way); the header check
    # itself is the loader's last line (the test above).
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"vidlora train: error: --resume_from_checkpoint {checkpoint}: not a checkpoint directory" in err


# -- remote code -----------------------------------------------------------------------------------


def test_a_tokenizer_that_asks_for_its_own_code_is_refused_without_running_it(tmp_path, monkeypatch):
    from vidlora.errors import NotFoundError
    from vidlora.model.tokenizer import build_tiny_tokenizer, load_tokenizer

    directory = tmp_path / "tokenizer"
    build_tiny_tokenizer().save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # A class transformers does not have, and the code that would provide it.
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    config_file.write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    asked: list[str] = []

    def prompt(question: str = "") -> str:
        # Left to its default (None), transformers asks at the terminal, and "y" runs evil.py.
        asked.append(question)
        return "n"

    monkeypatch.setattr("builtins.input", prompt)
    with pytest.raises(NotFoundError, match="custom code"):
        load_tokenizer(directory)
    assert asked == []
    assert not marker.exists()
