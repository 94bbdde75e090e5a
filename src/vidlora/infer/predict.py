"""`vidlora predict`: batched generation over a dataset, sharded, resumable.

Every assistant turn of every sample becomes one prediction: the conversation up to that
question (earlier answers are the reference ones), the sample's media, and the model's answer.
Each output line carries its own id, turn, question and reference answer, so results can never be
paired with the wrong question, however the work was sharded.

Sharding: run one process per GPU with `torchrun --nproc_per_node N -m vidlora.infer.predict …`
(or pass --num_shards/--shard_index yourself). Shard k takes every N-th sample and writes
``OUT.shard-k-of-N``; under torchrun each rank loads the model on its own ``cuda:LOCAL_RANK``; when all shards are complete, shard 0 (or a later run) merges them into
``OUT`` in dataset order. Rerunning skips the (id, turn) pairs already written; a line a kill cut
short is cut off and written again (:mod:`vidlora.jsonl`), so every line stays valid.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import HfArgumentParser

from vidlora.data.media import DEFAULT_DECODE_TIMEOUT
from vidlora.data.records import Sample, Turn, load_records, resolve_media
from vidlora.errors import UsageError
from vidlora.infer.device import AUTO, DEVICE_HELP, DTYPE_HELP
from vidlora.jsonl import JsonlAppender, read_jsonl, write_text_atomic


@dataclass(frozen=True)
class Job:
    """One prediction to make: sample + which assistant turn."""

    sample: Sample
    turn: int  # index of the assistant answer within the sample (0-based)
    question: str
    answer: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.sample.id, self.turn)


def jobs_of(sample: Sample) -> list[Job]:
    """One job per assistant turn; the conversation is cut just before that answer."""
    jobs = []
    answer_index = 0
    turns = [t for t in sample.conversations if t.role != "system"]
    for position, turn in enumerate(turns):
        if turn.role == "gpt":
            question = turns[position - 1].value
            jobs.append(Job(sample, answer_index, question, turn.value))
            answer_index += 1
    return jobs


def prompt_turns(job: Job) -> list[Turn]:
    """The conversation up to (and including) the question of ``job``."""
    turns: list[Turn] = []
    answers_seen = 0
    for turn in job.sample.conversations:
        if turn.role == "gpt":
            if answers_seen == job.turn:
                break
            answers_seen += 1
        turns.append(turn)
    return turns


def sample_type(sample: Sample, turn: int) -> str | None:
    raw = sample.raw
    types = raw.get("types")
    if isinstance(types, list) and turn < len(types):
        return types[turn]
    return raw.get("type")


def read_done(path: Path) -> set[tuple[str, int]]:
    """(id, turn) pairs already in a predictions file; a torn last line (a kill mid-write) is not done."""
    if not path.exists():
        return set()
    return {
        (str(record["id"]), int(record.get("turn", 0)))
        for _, record in read_jsonl(path, allow_torn_tail=True)
    }


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def shard_from_env() -> tuple[int, int]:
    """(shard index, number of shards) from torchrun's environment, (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_path(out: Path, index: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.name}.shard-{index}-of-{count}")


def merge_shards(out: Path, count: int, order: list[tuple[str, int]]) -> bool:
    """Merge complete shard files into ``out`` in dataset order; False if a shard is incomplete.

    The merged file is written atomically, so a kill never leaves it half-written.
    """
    records: dict[tuple[str, int], Any] = {}
    for index in range(count):
        path = shard_path(out, index, count)
        if not path.exists():
            return False
        for _, record in read_jsonl(path, allow_torn_tail=True):
            records[(str(record["id"]), int(record.get("turn", 0)))] = record
    if any(key not in records for key in order):
        return False
    write_text_atomic(out, "".join(json.dumps(records[key], ensure_ascii=False) + "\n" for key in order))
    return True


@dataclass(frozen=True)
class PredictOptions:
    """What to predict, from what, and how: the flags of `vidlora predict`, one field each."""

    model_path: str = field(metadata={"help": "checkpoint, merged model or base model"})
    data_path: list[str] = field(metadata={"help": "Video-LLaVA JSON/JSONL file(s)", "nargs": "+"})
    out: str = field(metadata={"help": "predictions JSONL"})
    model_base: str | None = field(
        default=None, metadata={"help": "base of a LoRA checkpoint (default: recorded)"}
    )
    video_folder: str | None = field(default=None, metadata={"help": "folder video paths are relative to"})
    image_folder: str | None = field(default=None, metadata={"help": "folder image paths are relative to"})
    batch_size: int = field(default=8, metadata={"help": "requests per generate() call"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per answer at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    num_shards: int | None = field(default=None, metadata={"help": "default: WORLD_SIZE or 1"})
    shard_index: int | None = field(default=None, metadata={"help": "default: RANK or 0"})
    allow_media_outside_folder: bool = field(
        default=False, metadata={"help": "accept absolute/escaping paths"}
    )
    decode_timeout: float = field(
        default=DEFAULT_DECODE_TIMEOUT, metadata={"help": "seconds to read one video"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "hub cache for the base model (default: the recorded one)"}
    )
    device: str = field(default=AUTO, metadata={"help": DEVICE_HELP})
    dtype: str = field(default=AUTO, metadata={"help": DTYPE_HELP})
    frame_cache: str | None = field(
        default=None,
        metadata={
            "help": "frame cache directory (`vidlora cache`): pre-processed pixels read, or stored, there"
        },
    )

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> PredictOptions:
        """Parse `vidlora predict`'s command line."""
        # HfArgumentParser's stubs take a DataClassType protocol a frozen dataclass also satisfies.
        parser = HfArgumentParser(cls, prog="vidlora predict", description=__doc__.split("\n\n")[0])  # type: ignore[arg-type]
        (options,) = parser.parse_args_into_dataclasses(argv)
        return options


def predict(options: PredictOptions, *, loaded=None, progress: bool = True) -> Path:
    """Run predictions (see the module docstring); returns the path of the written file."""
    from vidlora.data.frame_cache import FrameCache
    from vidlora.infer.generate import Generator, Request
    from vidlora.infer.load import load_for_inference_on

    env_index, env_count = shard_from_env()
    count = options.num_shards or env_count
    index = env_index if options.shard_index is None else options.shard_index
    if not 0 <= index < count:
        raise UsageError(f"--shard_index {index} is outside 0..{count - 1}")
    samples = load_records(options.data_path)
    all_jobs = [(position, job) for position, sample in enumerate(samples) for job in jobs_of(sample)]
    order = [job.key for _, job in all_jobs]
    if len(set(order)) != len(order):
        raise UsageError("duplicate sample ids in --data_path: predictions could not be told apart")
    # Whole samples go to one shard, so a multi-turn sample's lines stay together.
    mine = [job for position, job in all_jobs if position % count == index]
    out = Path(options.out)
    path = shard_path(out, index, count)
    done = read_done(path)
    todo = [job for job in mine if job.key not in done]
    if todo:
        if loaded is None:
            loaded = load_for_inference_on(
                options.model_path,
                options.model_base,
                device=options.device,
                dtype=options.dtype,
                cache_dir=options.cache_dir,
            )
        generator = Generator(
            loaded,
            decode_timeout=options.decode_timeout,
            frame_cache=FrameCache.from_flag(options.frame_cache),
        )
        with (
            JsonlAppender(path) as handle,
            tqdm(total=len(todo), desc="predict", disable=not progress) as bar,
        ):
            for batch in batches(todo, options.batch_size):
                requests = []
                for job in batch:
                    video, images = resolve_media(
                        job.sample, options.video_folder, options.image_folder,
                        allow_outside=options.allow_media_outside_folder,
                    )  # fmt: skip
                    requests.append(Request(job.sample.id, prompt_turns(job), video, list(images)))
                answers = generator.generate(
                    requests, max_new_tokens=options.max_new_tokens, temperature=options.temperature
                )
                for job, answer in zip(batch, answers, strict=True):
                    record = {
                        "id": job.sample.id,
                        "turn": job.turn,
                        "question": job.question,
                        "answer": job.answer,
                        "prediction": answer,
                        "type": sample_type(job.sample, job.turn),
                        "modality": job.sample.modality_label,
                    }
                    handle.write(record)
                bar.update(len(batch))
    if count > 1 and index == 0:
        merge_shards(out, count, order)
    return out if count == 1 or out.exists() else path


def main(argv: list[str] | None = None) -> int:
    path = predict(PredictOptions.from_argv(argv))
    print(f"vidlora predict: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from vidlora.errors import run_command

    raise SystemExit(run_command("predict", main, sys.argv[1:]))
