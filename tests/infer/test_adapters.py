"""Several adapters on one loaded base answer exactly as each checkpoint loaded alone."""

from __future__ import annotations

import json

import pytest

from lora_checkpoints import perturbed_lora_model, save_adapter
from vidlora.checkpoint import RECORD_FILE
from vidlora.data.records import Turn
from vidlora.data.synthetic import generate_dataset
from vidlora.errors import UsageError
from vidlora.infer.adapters import BASE_NAME, ModelSet, parse_adapters
from vidlora.infer.generate import Generator, Request, Sampling
from vidlora.infer.load import load_base, load_for_inference


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    first = save_adapter(*perturbed_lora_model(seed=1), root / "train")
    second = save_adapter(*perturbed_lora_model(seed=2, r=4), root / "second")
    return first, second


@pytest.fixture(scope="module")
def requests_(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 4, 4, seed=5)
    return [
        Request("v", [Turn("human", "<video>\nWhat moves?")], sorted(out.rglob("*.mp4"))[0]),
        Request("i", [Turn("human", "<image>\nWhich color?")], None, [sorted(out.rglob("*.png"))[0]]),
        Request("t", [Turn("human", "hello")]),
    ]


def _copy(checkpoint, to, *, leave_out=None):
    """A copy of a checkpoint directory to edit, without the file ``leave_out``."""
    to.mkdir()
    for file in checkpoint.iterdir():
        if file.name != leave_out:
            (to / file.name).write_bytes(file.read_bytes())
    return to


def _answers(generator, requests):
    return [c.text for c in generator.complete(requests, Sampling(max_new_tokens=8))]


def test_each_served_model_answers_as_its_checkpoint_alone(checkpoints, requests_):
    first, second = checkpoints
    models = ModelSet.load(str(first), adapters={"b": str(second)}, device="cpu", dtype="float32")
    assert models.names == ["train", BASE_NAME, "b"]
    alone = {
        "train": _answers(Generator(load_for_inference(str(first))), requests_),
        "b": _answers(Generator(load_for_inference(str(second))), requests_),
        BASE_NAME: _answers(Generator(load_base(str(first))), requests_),
    }
    assert len({tuple(a) for a in alone.values()}) == 3  # the three models differ
    # In an order that switches every time, and back again.
    for name in ["b", "train", BASE_NAME, "b", BASE_NAME, "train"]:
        with models.use(name) as generator:
            assert _answers(generator, requests_) == alone[name], name


def test_a_base_model_path_serves_adapters_on_it(checkpoints, requests_):
    first, _ = checkpoints
    models = ModelSet.load("tiny", adapters={"a": str(first)}, device="cpu", dtype="float32")
    assert models.names == ["tiny", "a"]
    with models.use("a") as generator:
        assert _answers(generator, requests_) == _answers(
            Generator(load_for_inference(str(first))), requests_
        )
    with models.use("tiny") as generator:
        assert _answers(generator, requests_) == _answers(Generator(load_for_inference("tiny")), requests_)


def test_unknown_names_and_bad_adapter_flags_are_user_errors(checkpoints, tmp_path):
    first, second = checkpoints
    models = ModelSet.load(str(first), device="cpu", dtype="float32")
    with pytest.raises(UsageError, match="unknown model 'nope': serving train, base"), models.use("nope"):
        pass
    assert parse_adapters(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    for spec in (["a"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(UsageError, match="--adapters"):
            parse_adapters(spec)
    with pytest.raises(UsageError, match="not a LoRA checkpoint"):
        ModelSet.load(str(first), adapters={"x": str(tmp_path)}, device="cpu", dtype="float32")
    with pytest.raises(UsageError, match="must differ"):
        ModelSet.load(str(first), adapters={BASE_NAME: str(second)}, device="cpu", dtype="float32")


def test_an_adapter_of_another_base_is_refused(checkpoints, tmp_path):
    first, second = checkpoints
    other = _copy(second, tmp_path / "other")
    record = json.loads((other / RECORD_FILE).read_text())
    record["base"]["model_name_or_path"] = "someone/else-7B"
    record["base"]["attn_implementation"] = "eager"  # a kernel choice alone does not matter
    (other / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(
        UsageError,
        match=r"another base.*model_name_or_path someone/else-7B vs tiny.*one server shares one base",
    ):
        ModelSet.load(str(first), adapters={"o": str(other)}, device="cpu", dtype="float32")


def test_a_base_model_alone_is_served_without_peft(requests_):
    models = ModelSet.load("tiny", device="cpu", dtype="float32")
    assert models.names == ["tiny"] and models.parent_of("tiny") is None
    with models.use("tiny") as generator:
        assert _answers(generator, requests_) == _answers(Generator(load_for_inference("tiny")), requests_)


def test_bases_recorded_with_other_kernels_or_projector_defaults_are_one_base(checkpoints, tmp_path):
    first, second = checkpoints
    other = _copy(second, tmp_path / "other")
    record = json.loads((other / RECORD_FILE).read_text())
    record["base"] |= {"attn_implementation": "eager", "mm_projector_type": "mlp2x_gelu", "cache_dir": "/x"}
    (other / RECORD_FILE).write_text(json.dumps(record))
    assert (
        ModelSet.load(str(first), adapters={"o": str(other)}, device="cpu", dtype="float32").names[-1] == "o"
    )


def test_a_base_loaded_without_its_projector_file_is_not_served(checkpoints, tmp_path):
    first, second = checkpoints
    recipe = _copy(first, tmp_path / "recipe")
    record = json.loads((recipe / RECORD_FILE).read_text())
    record["base"]["pretrain_mm_mlp_adapter"] = str(tmp_path / "mm_projector.bin")  # never read: replaced
    (recipe / RECORD_FILE).write_text(json.dumps(record))
    models = ModelSet.load(str(recipe), adapters={"b": str(second)}, device="cpu", dtype="float32")
    assert models.names == ["recipe", "b"]  # no "base": its projector would be untrained
    frozen = _copy(second, tmp_path / "frozen", leave_out="non_lora_trainables.safetensors")
    with pytest.raises(UsageError, match="no projector of their own"):
        ModelSet.load(str(recipe), adapters={"f": str(frozen)}, device="cpu", dtype="float32")
