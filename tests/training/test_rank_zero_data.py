"""One pass over the records per launch: rank 0 reads and tokenizes, the other ranks receive it.

Two real processes on a gloo process group: the computation runs once (a file counts the calls),
every rank gets rank 0's result, and a failure on rank 0 makes rank 1 raise too instead of waiting
in the collective. The dataset built from handed-over (pickled) preparations equals the dataset
that prepares its own samples.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import torch

from vidlora.data.dataset import MediaFolders, SupervisedDataset, prepare_samples, read_samples
from vidlora.data.processor import Processor
from vidlora.data.synthetic import generate_dataset
from vidlora.errors import UsageError, VidloraError
from vidlora.model.tokenizer import build_tiny_tokenizer
from vidlora.training.distributed import computed_on_rank_zero


def _compute(calls: Path, rank: int, fail: bool) -> dict[str, object]:
    with open(calls, "a") as handle:
        handle.write(f"{rank}\n")
    if fail:
        raise UsageError("records.json: not a JSON list\nsecond line")
    return {"computed_by": rank, "lengths": [2056 + rank, -17]}


def _rank(rank: int, world: int, init_file: str, out_dir: str, fail: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = Path(out_dir)
    try:
        result = computed_on_rank_zero(
            lambda: _compute(out / "calls", rank, fail), what="reading records.json"
        )
        outcome = {"result": result}
    except VidloraError as err:
        outcome = {"error": type(err).__name__, "message": str(err)}
    (out / f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def _launch(tmp_path: Path, fail: bool) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    init_file = tmp_path / "rendezvous"
    procs = [
        context.Process(target=_rank, args=(rank, 2, str(init_file), str(tmp_path), fail))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_rank_zero_computes_once_and_every_rank_gets_its_result(tmp_path):
    outcomes = _launch(tmp_path, fail=False)
    assert (tmp_path / "calls").read_text() == "0\n"
    expected = {"computed_by": 0, "lengths": [2056, -17]}
    assert outcomes == [{"result": expected}, {"result": expected}]


def test_a_failure_on_rank_zero_stops_the_other_ranks_too(tmp_path):
    rank0, rank1 = _launch(tmp_path, fail=True)
    assert (tmp_path / "calls").read_text() == "0\n"
    assert rank0 == {"error": "UsageError", "message": "records.json: not a JSON list\nsecond line"}
    assert rank1["error"] == "VidloraError"
    assert rank1["message"] == (
        "reading records.json failed on rank 0 (its error is printed there): "
        "UsageError: records.json: not a JSON list"
    )


def test_without_a_process_group_it_just_computes():
    assert computed_on_rank_zero(lambda: 41 + 1, what="x") == 42


def test_a_dataset_from_handed_over_preparations_equals_one_that_prepares(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, 6, 1, 3, size=32, num_frames=8, fps=8)
    tokenizer = build_tiny_tokenizer()
    processor = Processor(
        template="v1",
        prompt_tokenization="whole_prompt",
        image_size=32,
        image_tokens=4,
        video_tokens=16,
        num_frames=4,
        mm_vision_select_layer=-2,
    )
    folders = MediaFolders(data, data)
    samples, problems = read_samples(data / "train.json")
    own = SupervisedDataset(samples, processor=processor, tokenizer=tokenizer, folders=folders)
    # What another rank receives: the preparations after a pickle round trip.
    handed = pickle.loads(pickle.dumps(prepare_samples(samples, processor, tokenizer, folders)))
    received = SupervisedDataset(
        samples, processor=processor, tokenizer=tokenizer, folders=folders, prepared=handed
    )
    assert problems == [] and len(received) == len(own) == 6
    assert received.modality_lengths == own.modality_lengths
    for index in range(len(own)):
        a, b = own[index], received[index]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
