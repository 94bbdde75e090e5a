"""`vidlora bench`: training throughput, data wait, padding and memory, against baselines in one run.

Every data mix (video-only, image-only, mixed video + image + text) is trained for the same steps
on `vidlora train`'s own loop — the Trainer :func:`~vidlora.training.recipe.build_trainer` builds,
observed by a subclass that times its batch fetch (``get_batch_samples``) — and on the baselines,
with the same data, sizes and steps, each ratio reported:

* ``decode``: every frame decoded up to the last sampled index (LLaMA-Factory's reader) vs
  :func:`~vidlora.data.media.read_video`, per video;
* ``loop``: the straightforward loop — transformers' ``VideoLlavaForConditionalGeneration`` with
  the same sizes, PEFT LoRA on the same targets, a plain shuffled ``DataLoader`` over a dataset that
  decodes every frame and pre-processes in the original order, AdamW;
* ``sampler``: random batches vs the modality-length grouped sampler (padding over a whole epoch,
  from the lengths, and measured in a timed run).

Each scenario runs in a fresh process (peak memory is that scenario's); warm-up steps are excluded.
Scenarios are a list (:func:`scenarios`): a new one is a few lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from vidlora.data.records import read_record_objects
from vidlora.errors import UsageError, VidloraError
from vidlora.jsonl import read_json_object, write_text_atomic
from vidlora.training.throughput import (
    FLOPS_FORMULA,
    StepRecorder,
    cuda_sync,
    media_flops,
    mfu,
    order_padding,
    peak_flops,
    peak_rss_bytes,
    training_flops,
)

if TYPE_CHECKING:
    from vidlora.data.dataset import SupervisedDataset

MIXES = ("video", "image", "mixed")
BASELINES = ("decode", "loop", "sampler", "cache")
DATA_KINDS = ("synthetic", "realres")
#: Frames the decode baseline samples when --num_frames is not given (both presets' towers take 8).
DEFAULT_FRAMES = 8
#: Real-resolution clip lengths, cycled (the first is the 60 s clip the decode table singles out).
REALRES_SECONDS = (60, 30, 45)
#: Still sizes of the real-resolution set: phone, camera, screenshot and web sizes.
REALRES_IMAGE_SIZES = ((1280, 720), (640, 480), (1024, 768), (1920, 1080), (800, 600), (720, 1280))


@dataclass
class BenchArguments:
    """`vidlora bench`'s settings (training sizes use `vidlora train`'s flag names)."""

    model_name_or_path: str = "tiny"
    data: str = "synthetic"
    data_path: list[str] | None = None
    video_folder: str | None = None
    image_folder: str | None = None
    data_dir: str | None = None
    num_samples: int = 48
    realres_clips: int = 6
    steps: int = 10
    warmup_steps: int = 2
    per_device_train_batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    num_frames: int | None = None
    gradient_checkpointing: bool = False
    bf16: bool = False
    attn_implementation: str = "sdpa"
    dataloader_num_workers: list[int] | None = None
    dataloader_persistent_workers: bool | None = None
    dataloader_prefetch_factor: int | None = None
    dataloader_pin_memory: bool | None = None
    modalities: list[str] = field(default_factory=lambda: list(MIXES))
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    isolate: bool = True
    seed: int = 0
    json: bool = False

    def problems(self) -> list[str]:
        found = []
        if self.data not in DATA_KINDS and not self.data_path:
            found.append(f"--data {self.data}: use synthetic or realres, or give --data_path")
        if self.steps < 1 or self.warmup_steps < 0:
            found.append("--steps must be >= 1 and --warmup_steps >= 0")
        if self.per_device_train_batch_size < 1:
            found.append("--per_device_train_batch_size must be >= 1")
        if self.num_samples < 1 or self.realres_clips < 1:
            found.append("--num_samples and --realres_clips must be >= 1")
        found += [f"--modalities {m}: use {', '.join(MIXES)}" for m in self.modalities if m not in MIXES]
        found += [
            f"--baselines {b}: use {', '.join(BASELINES)}" for b in self.baselines if b not in BASELINES
        ]
        if _random_preset(self.model_name_or_path) and not torch.cuda.is_available():
            found.append(
                f"--model_name_or_path {self.model_name_or_path}: the preset is measured with random "
                "weights on a GPU (on the CPU it would take its full float32 size in memory); none is here"
            )
        if any(w < 0 for w in self.dataloader_num_workers or ()):
            found.append("--dataloader_num_workers must be >= 0")
        return found


def _random_preset(name: str) -> bool:
    """A preset whose weights only exist as a checkpoint (`videollava-7b`): benched with random ones."""
    from vidlora.model.presets import PRESETS

    return name in PRESETS and not PRESETS[name].tiny_tokenizer


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_args(argv: Sequence[str]) -> BenchArguments:
    """Parse `vidlora bench`'s command line; every problem reported at once."""
    d = BenchArguments()
    p = argparse.ArgumentParser(prog="vidlora bench", description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", default=d.model_name_or_path, help="a preset or checkpoint")
    p.add_argument("--data", default=d.data, help="synthetic | realres (generated once into --data_dir)")
    p.add_argument("--data_path", nargs="+", help="your own records instead (with the media folders)")
    p.add_argument("--video_folder")
    p.add_argument("--image_folder")
    p.add_argument("--data_dir", help="where generated sets are kept (default ~/.cache/vidlora/bench)")
    p.add_argument("--num_samples", type=int, default=d.num_samples, help="synthetic set size")
    p.add_argument("--realres_clips", type=int, default=d.realres_clips, help="720p clips of the realres set")
    p.add_argument("--steps", type=int, default=d.steps, help="timed optimizer steps per scenario")
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps, help="untimed steps before them")
    p.add_argument("--per_device_train_batch_size", type=int, default=d.per_device_train_batch_size)
    p.add_argument("--lora_r", type=int, default=d.lora_r)
    p.add_argument("--lora_alpha", type=int, default=d.lora_alpha)
    p.add_argument("--num_frames", type=int, help="frames per video (default: the video tower's)")
    p.add_argument("--gradient_checkpointing", type=_bool, default=d.gradient_checkpointing)
    p.add_argument("--bf16", type=_bool, default=d.bf16)
    p.add_argument(
        "--attn_implementation", default=d.attn_implementation, help="sdpa | eager | flash_attention_2"
    )
    p.add_argument(
        "--dataloader_num_workers",
        type=int,
        nargs="+",
        help="vidlora train's loop with each of these worker counts (default: vidlora train's default)",
    )
    p.add_argument("--dataloader_persistent_workers", type=_bool)
    p.add_argument("--dataloader_prefetch_factor", type=int)
    p.add_argument("--dataloader_pin_memory", type=_bool)
    p.add_argument("--modalities", nargs="+", default=d.modalities, help="data mixes: video image mixed")
    p.add_argument("--baselines", nargs="*", default=d.baselines, help="decode loop sampler cache (or none)")
    p.add_argument(
        "--isolate",
        type=_bool,
        default=d.isolate,
        help="each scenario in a fresh process (peak memory per scenario); False: all in this one",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (progress on stderr)")
    args = BenchArguments(**vars(p.parse_args(list(argv))))
    problems = args.problems()
    if problems:
        raise UsageError("; ".join(problems))
    return args


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    """A data set and one record file per mix."""

    description: str
    video_folder: str | None
    image_folder: str | None
    mixes: dict[str, str]  # mix -> record file
    videos: list[str]  # every distinct video file (the decode baseline's input)
    frame_cache: str = ""  # the "train_cached" scenarios' cache, filled ahead by `vidlora cache`


def _mix_of(record: dict[str, Any]) -> set[str]:
    """The mixes a record belongs to: video-only, image-only, and every record in mixed."""
    has_video, has_image = "video" in record, "image" in record
    mixes = {"mixed"}
    if has_video and not has_image:
        mixes.add("video")
    if has_image and not has_video:
        mixes.add("image")
    return mixes


def split_mixes(records: list[dict[str, Any]], out: Path, modalities: Sequence[str]) -> dict[str, str]:
    """Write one record file per requested mix into ``out``; a mix without records is an error."""
    files = {}
    for mix in modalities:
        chosen = [r for r in records if mix in _mix_of(r)]
        if not chosen:
            raise UsageError(f"the data has no {mix} records; drop it from --modalities")
        path = out / f"{mix}.json"
        write_text_atomic(path, json.dumps(chosen, indent=1) + "\n")
        files[mix] = str(path)
    return files


def _videos(records: list[dict[str, Any]], folder: str | None) -> list[str]:
    names = sorted({r["video"] for r in records if isinstance(r.get("video"), str)})
    return [str(Path(folder or ".") / n) for n in names]


def _cached(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build(tmp)`` once: a folder holding ``done`` is complete."""
    if (folder / "done").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / "done").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def synthetic_set(folder: Path, num_samples: int, seed: int) -> None:
    """`vidlora synth`'s data (default mix: video, image, text, video+image), 64 px, 16 frames."""
    from vidlora.data.synthetic import generate_dataset

    generate_dataset(folder, num_samples, 0, seed, overwrite=True, progress=True)


_QUESTIONS = (
    "What happens in this clip?",
    "Describe the motion you see, from the first frame to the last, and say whether the pattern "
    "moves left or right.",
    "Is the checkerboard moving?",
    "Summarise the video in one sentence, mentioning the colours, the texture and the direction in "
    "which the stripes scroll over time.",
)
_ANSWERS = (
    "Stripes scroll to the right over a moving checkerboard.",
    "The ramp scrolls steadily to the right while the checkerboard flips every few frames.",
    "Yes.",
    "A grey ramp with a checkerboard scrolls right while the colours drift slowly.",
)


def realres_set(folder: Path, clips: int, seed: int) -> None:
    """Real-resolution data: ``clips`` 1280×720 25 fps h264 clips (30–60 s, libx264's default
    keyframe interval), two video QA records per clip, as many textured JPEG stills at
    phone/camera/web sizes, and a few text-only records."""
    from PIL import Image

    from vidlora.data.synthetic import texture_image, write_texture_clip

    (folder / "videos").mkdir()
    (folder / "images").mkdir()
    records: list[dict[str, Any]] = []

    def turn(question: str, answer: str, placeholder: str = "") -> list[dict[str, str]]:
        return [{"from": "human", "value": placeholder + question}, {"from": "gpt", "value": answer}]

    for k in tqdm(range(clips), desc="realres clips", unit="clip", file=sys.stderr):
        seconds = REALRES_SECONDS[k % len(REALRES_SECONDS)]
        name = f"videos/clip{k:02d}_{seconds}s_720p.mp4"
        write_texture_clip(folder / name, seconds, 1280, 720)
        for q in range(2):
            at = (2 * k + q) % len(_QUESTIONS)
            records.append(
                {
                    "id": f"v{k}_{q}",
                    "video": name,
                    "conversations": turn(_QUESTIONS[at], _ANSWERS[at], "<video>\n"),
                }
            )
    for k in range(2 * clips):
        width, height = REALRES_IMAGE_SIZES[k % len(REALRES_IMAGE_SIZES)]
        name = f"images/still{k:02d}_{width}x{height}.jpg"
        Image.fromarray(texture_image(seed + k, height, width)).save(folder / name, quality=90)
        at = k % len(_QUESTIONS)
        records.append(
            {"id": f"i{k}", "image": name, "conversations": turn(_QUESTIONS[at], _ANSWERS[at], "<image>\n")}
        )
    for k in range(max(2, clips // 2)):
        at = k % len(_QUESTIONS)
        records.append(
            {"id": f"t{k}", "conversations": turn(f"Without a picture: {_QUESTIONS[at]}", _ANSWERS[at])}
        )
    write_text_atomic(folder / "train.json", json.dumps(records, indent=1) + "\n")


def prepare_data(args: BenchArguments, work: Path) -> BenchData:
    """Generate (once) or read the data set and split it into the requested mixes under ``work``."""
    if args.data_path:
        records = [r for path in args.data_path for r in read_record_objects(Path(path))]
        mixes = split_mixes(records, work, args.modalities)
        return BenchData(
            f"{', '.join(args.data_path)}",
            args.video_folder,
            args.image_folder,
            mixes,
            _videos(records, args.video_folder),
        )
    root = Path(args.data_dir) if args.data_dir else Path.home() / ".cache" / "vidlora" / "bench"
    if args.data == "synthetic":
        folder = _cached(
            root / f"synthetic-n{args.num_samples}-s{args.seed}",
            lambda d: synthetic_set(d, args.num_samples, args.seed),
        )
        description = f"synthetic ({args.num_samples} samples, 64 px, 16 frames at 8 fps)"
    else:
        started = time.perf_counter()
        folder = _cached(
            root / f"realres-c{args.realres_clips}-s{args.seed}",
            lambda d: realres_set(d, args.realres_clips, args.seed),
        )
        took = time.perf_counter() - started
        if took > 5:
            print(f"vidlora bench: generated the realres set in {took:.0f} s ({folder})", file=sys.stderr)
        description = f"realres ({args.realres_clips} clips 1280x720 25 fps, 30-60 s, libx264 default GOP)"
    records = read_record_objects(folder / "train.json")
    mixes = split_mixes(records, work, args.modalities)
    return BenchData(description, str(folder), str(folder), mixes, _videos(records, str(folder)))


# -- scenarios ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One timed run: ``kind`` "train" (vidlora's loop) or "loop" (the straightforward one) on ``mix``,
    with extra `vidlora train` flags."""

    name: str
    mix: str
    kind: str
    flags: tuple[str, ...] = ()
    epoch_padding: bool = False  # also compute the epoch padding of the mix (once per mix)
    cached: bool = False  # read every pixel from a frame cache filled before the run


def scenarios(args: BenchArguments) -> list[Scenario]:
    """The scenario list of this invocation, in run order."""
    out = []
    workers = args.dataloader_num_workers
    for mix in args.modalities:
        if workers is None:
            out.append(Scenario("train", mix, "train", epoch_padding=True))
        else:
            for k, w in enumerate(workers):
                name = "train" if len(workers) == 1 else f"train_workers{w}"
                out.append(
                    Scenario(name, mix, "train", ("--dataloader_num_workers", str(w)), epoch_padding=k == 0)
                )
        if "loop" in args.baselines:
            out.append(Scenario("loop", mix, "loop"))
        if "cache" in args.baselines and mix in ("video", "image", "mixed"):
            out.append(Scenario("train_cached", mix, "train", cached=True))
        if "sampler" in args.baselines and mix == "mixed":
            # Timed on the mixed data only, where modalities (and lengths) differ most; the
            # epoch padding of every mix is computed from its lengths in the "train" scenario.
            out.append(Scenario("train_random", mix, "train", ("--group_by_modality_length", "False")))
    return out


def train_flags(args: BenchArguments, data: BenchData, scenario: Scenario, output_dir: str) -> list[str]:
    """The `vidlora train` command line of a scenario (the original's LoRA recipe, the bench's sizes)."""
    flags = [
        "--model_name_or_path", args.model_name_or_path,
        "--lora_enable", "True", "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha),
        "--data_path", data.mixes[scenario.mix],
        "--group_by_modality_length", "True",
        "--bf16", str(args.bf16),
        "--output_dir", output_dir,
        "--max_steps", str(args.steps + args.warmup_steps),
        "--per_device_train_batch_size", str(args.per_device_train_batch_size),
        "--gradient_accumulation_steps", "1",
        "--learning_rate", "2e-4",
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--logging_steps", str(10**6),
        "--tf32", "False",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--seed", str(args.seed),
        "--gradient_checkpointing", str(args.gradient_checkpointing),
        "--attn_implementation", args.attn_implementation,
    ]  # fmt: skip
    for name in ("video_folder", "image_folder"):
        if getattr(data, name):
            flags += [f"--{name}", str(getattr(data, name))]
    if args.num_frames is not None:
        flags += ["--num_frames", str(args.num_frames)]
    for name in ("dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_pin_memory"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    if args.dataloader_num_workers is not None and len(args.dataloader_num_workers) == 1:
        flags += ["--dataloader_num_workers", str(args.dataloader_num_workers[0])]
    if scenario.cached:
        flags += ["--frame_cache", data.frame_cache]
    return flags + list(scenario.flags)


# -- measuring one scenario -----------------------------------------------------------------------


def _parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by role, from names (vidlora's and transformers' layouts alike)."""
    counts = {"llm": 0, "lora": 0, "tower": 0, "projector": 0}
    for name, param in model.named_parameters():
        if "lora_" in name:
            counts["lora"] += param.numel()
        elif "projector" in name:
            counts["projector"] += param.numel()
        elif "tower" in name:
            counts["tower"] += param.numel()
        elif ("language_model" in name or "lm_head" in name) and "embed_tokens" not in name:
            counts["llm"] += param.numel()
    return counts


def _flops(
    model: torch.nn.Module,
    text_config: Any,
    recorder: StepRecorder,
    warmup: int,
    tower_tokens: tuple[int, int],
    feature_tokens: tuple[int, int],
    checkpointing: bool,
) -> tuple[float, float, dict[str, int]]:
    """Useful and recomputed FLOPs of the timed steps (:data:`FLOPS_FORMULA`)."""
    counts = _parameter_counts(model)
    # Both towers have the same size in every preset; per-tower counts would need the split by name.
    per_tower = counts["tower"] // 2 if counts["tower"] else 0
    useful = recomputed = 0.0
    for step in recorder.batches[warmup:]:
        for batch in step:
            media = media_flops(
                per_tower,
                batch.videos * tower_tokens[0] + batch.images * tower_tokens[1],
                counts["projector"],
                batch.videos * feature_tokens[0] + batch.images * feature_tokens[1],
            )
            u, r = training_flops(
                counts["llm"],
                counts["lora"],
                text_config.num_hidden_layers,
                text_config.hidden_size,
                batch.row_lengths,
                media_flops=media,
                checkpointing=checkpointing,
            )
            useful, recomputed = useful + u, recomputed + r
    return useful, recomputed, counts


def _finish(
    recorder: StepRecorder, warmup: int, flops: tuple[float, float, dict[str, int]], workers: int
) -> dict[str, Any]:
    result: dict[str, Any] = dict(recorder.summary(warmup))
    useful, recomputed, counts = flops
    result["useful_tflops_per_s"] = useful / result["seconds"] / 1e12
    result["recomputed_tflops_per_s"] = recomputed / result["seconds"] / 1e12
    result["parameters"] = counts
    result["dataloader_num_workers"] = workers
    if torch.cuda.is_available():
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        peak = peak_flops(torch.cuda.get_device_name())
        if peak is not None:
            result["mfu"] = mfu(useful, result["seconds"], peak)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def _epoch_padding(lengths: list[int], batch_size: int, seed: int) -> dict[str, float]:
    """Padding of one whole epoch in random order, with the grouped sampler, and with one-step
    sorting windows (the original's algorithm)."""
    from vidlora.data.sampler import modality_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    random_order = torch.randperm(len(lengths), generator=generator).tolist()
    grouped, _ = modality_grouped_indices(lengths, batch_size, 1, 1, seed, 0)
    one_step, _ = modality_grouped_indices(lengths, batch_size, 1, 1, seed, 0, window_steps=1)
    return {
        "random": order_padding(lengths, random_order, batch_size),
        "grouped": order_padding(lengths, grouped, batch_size),
        "grouped_one_step_window": order_padding(lengths, one_step, batch_size),
    }


def _bench_trainer_class(recorder: StepRecorder) -> Any:
    """VidloraTrainer timing its batch fetch, and a callback marking the end of every step."""
    from transformers import TrainerCallback

    from vidlora.training.trainer import VidloraTrainer

    class BenchTrainer(VidloraTrainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            began = recorder.now()
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            recorder.fetched(began, batches)
            return batches, num_items

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.step_end()

    return BenchTrainer, StepClock()


def random_model(args: BenchArguments) -> Any:
    """A shape-only preset with random weights initialised on the GPU (seconds for 7B, no host copy)
    and its stand-in tokenizer: what a step costs does not depend on the weights' values."""
    from vidlora.model.loading import LoadedModel
    from vidlora.model.presets import build_random
    from vidlora.model.report import LoadReport

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer = build_random(
        args.model_name_or_path,
        device="cuda",
        dtype=dtype,
        seed=args.seed,
        attn_implementation=args.attn_implementation,
    )
    report = LoadReport(layout="preset", source=args.model_name_or_path)
    report.notes.append("random weights on the GPU and a stand-in tokenizer (vidlora bench)")
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)


def fill_frame_cache(args: BenchArguments, data: BenchData, mix: str) -> dict[str, Any]:
    """Fill the frame cache for one mix with `vidlora cache` on every core, timed (its report)."""
    report_path = Path(data.frame_cache).parent / f"cache_fill_{mix}.json"
    command = [
        sys.executable, "-m", "vidlora", "cache",
        "--model_name_or_path", args.model_name_or_path,
        "--data_path", data.mixes[mix],
        "--frame_cache", data.frame_cache,
        "--workers", str(os.cpu_count() or 1),
        "--no_progress", "True",
        "--report", str(report_path),
    ]  # fmt: skip
    for name in ("video_folder", "image_folder"):
        if getattr(data, name):
            command += [f"--{name}", str(getattr(data, name))]
    if args.num_frames is not None:
        command += ["--num_frames", str(args.num_frames)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise VidloraError(f"vidlora cache failed for the {mix} mix:\n{done.stdout}{done.stderr}")
    filled = read_json_object(report_path)
    return {"seconds": seconds, "report": filled}


def run_train(args: BenchArguments, data: BenchData, scenario: Scenario, output_dir: str) -> dict[str, Any]:
    """`vidlora train`'s loop (its Trainer, sampler, collator and DataLoader settings), timed."""
    from vidlora.args import parse_train_args
    from vidlora.training.recipe import build_trainer

    model_args, data_args, train_args = parse_train_args(train_flags(args, data, scenario, output_dir))
    train_args.log_level = "warning"
    recorder = StepRecorder(sync=cuda_sync())
    trainer_cls, clock = _bench_trainer_class(recorder)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer, _ = build_trainer(
        model_args,
        data_args,
        train_args,
        trainer_cls=trainer_cls,
        extra_callbacks=[clock],
        loaded=random_model(args) if _random_preset(args.model_name_or_path) else None,
    )
    trainer.train()
    dataset = cast("SupervisedDataset", trainer.train_dataset)
    processor = dataset.processor
    model = cast(torch.nn.Module, trainer.model)
    frames = processor.num_frames or 0
    flops = _flops(
        model,
        cast(Any, trainer.accelerator.unwrap_model(model)).config.text_config,
        recorder,
        args.warmup_steps,
        (processor.video_tokens, processor.image_tokens + 1),  # the tower sees each frame's CLS too
        (processor.video_tokens, processor.image_tokens),
        bool(train_args.activation_checkpointing),
    )
    result = _finish(recorder, args.warmup_steps, flops, train_args.dataloader_num_workers)
    result["dataloader"] = {
        "persistent_workers": train_args.dataloader_persistent_workers,
        "prefetch_factor": train_args.dataloader_prefetch_factor,
        "pin_memory": train_args.dataloader_pin_memory,
        "frames": frames,
    }
    # The longest sample's sizes: what `vidlora plan` needs to predict this run's peak.
    tokenized = [processor.tokenize(sample, dataset.tokenizer) for sample in dataset.samples]
    result["sequence"] = {
        "max_tokens": max(len(t.input_ids) for t in tokenized),
        "max_text_tokens": max(t.text_length for t in tokenized),
        "max_labelled_tokens": max(sum(label != -100 for label in t.labels) for t in tokenized),
    }
    if scenario.epoch_padding:
        result["epoch_padding"] = _epoch_padding(
            dataset.modality_lengths, args.per_device_train_batch_size, args.seed
        )
    return result


# -- the straightforward loop (baseline b) ---------------------------------------------------------


def decode_to_last_sampled(path: str | Path, num_frames: int) -> np.ndarray:
    """Decode every frame in order up to the last sampled index, keeping the sampled ones as RGB
    (``frame.to_ndarray``): LLaMA-Factory's reader, the cost of any reader that cannot seek."""
    import av

    from vidlora.data.media import sample_indices

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if not stream.frames:
            raise UsageError(f"{path}: the container does not say how many frames it has")
        wanted = sample_indices(stream.frames, num_frames).tolist()
        kept: dict[int, np.ndarray] = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in kept]
    if missing:
        raise UsageError(f"{path}: frames {missing} could not be decoded")
    return np.stack([kept[i] for i in wanted])


def preprocess_video_original_order(frames: np.ndarray, image_size: int, mean: Any, std: Any) -> torch.Tensor:
    """The original's video pre-processing order: ``/255`` and normalise at full resolution, then the
    bilinear short-side resize and the centre crop (the baseline keeps its own copy of that order)."""
    from vidlora.data.transforms import video_resize_shape

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    size = video_resize_shape(x.shape[-2], x.shape[-1], image_size)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    top, left = round((size[0] - image_size) / 2), round((size[1] - image_size) / 2)
    return x[..., top : top + image_size, left : left + image_size].contiguous()


class StraightforwardDataset(Dataset):
    """The same samples and token ids as vidlora's dataset; videos decoded frame by frame up to the
    last sampled index and pre-processed in the original order; images as vidlora reads them."""

    def __init__(self, vidlora_set: Any) -> None:
        self.samples = vidlora_set.samples
        self.processor = vidlora_set.processor
        self.tokenizer = vidlora_set.tokenizer
        self.folders = vidlora_set.folders

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from vidlora.data.records import resolve_media

        sample = self.samples[index]
        tokenized = self.processor.tokenize(sample, self.tokenizer)
        item: dict[str, Any] = {
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
        }
        video, images = resolve_media(sample, self.folders.video_folder, self.folders.image_folder, True)
        spec = self.processor.pixel_spec
        if video is not None:
            frames = decode_to_last_sampled(video, self.processor.num_frames)
            item["pixel_values_videos"] = preprocess_video_original_order(
                frames, spec.image_size, spec.mean, spec.std
            ).unsqueeze(0)
        if images:
            item["pixel_values_images"] = torch.stack([self.processor.load_image(p) for p in images])
        return item


def transformers_model(vidlora_model: Any, processor: Any, seed: int) -> Any:
    """transformers' own ``VideoLlavaForConditionalGeneration`` with the vidlora model's sizes.

    transformers' class has one vision config for both towers (the presets' towers have the same
    sizes) and no LanguageBind temporal attention, so it does a little less work per video.
    """
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    config = vidlora_model.config
    tower = config.video_config or config.image_config
    vision = CLIPVisionConfig(
        **{
            k: getattr(tower, k)
            for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps", "projection_dim",
            )
        }
    )  # fmt: skip
    hf_config = VideoLlavaConfig(
        vision_config=vision,
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        video_token_index=config.video_token_id,
        vision_feature_layer=config.mm_vision_select_layer,
        image_seq_length=processor.image_tokens,
        video_seq_length=processor.video_tokens,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoLlavaForConditionalGeneration(hf_config)


def run_loop(args: BenchArguments, data: BenchData, scenario: Scenario, output_dir: str) -> dict[str, Any]:
    """The straightforward loop: transformers' model + PEFT LoRA, a shuffled DataLoader (0 workers)
    over :class:`StraightforwardDataset`, AdamW, forward / backward / step."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from vidlora.args import parse_train_args
    from vidlora.data.collate import MultimodalCollator
    from vidlora.model.lora import lora_target_module_names, quiet_peft
    from vidlora.training.recipe import load_model_and_data

    model_args, data_args, train_args = parse_train_args(train_flags(args, data, scenario, output_dir))
    torch.manual_seed(args.seed)
    loaded, processor, train_set, _ = load_model_and_data(model_args, data_args, train_args)
    device = train_args.device
    model = transformers_model(loaded.model, processor, args.seed)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in lora_target_module_names(loaded.model)})
    del loaded
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.05,
        bias="none",
        target_modules=rf"^model\.language_model\.(?:.*\.)?(?:{'|'.join(leaves)})$",
    )
    with quiet_peft():  # PEFT reads a deprecated transformers attribute while wrapping
        model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "multi_modal_projector" in name:
            param.requires_grad_(True)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    assert train_set.tokenizer.pad_token_id is not None
    loader = DataLoader(
        StraightforwardDataset(train_set),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=MultimodalCollator(pad_token_id=train_set.tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(args.seed),
    )
    recorder = StepRecorder(sync=cuda_sync())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batches = iter(loader)
    dtype = torch.bfloat16 if args.bf16 else None
    for _ in range(args.steps + args.warmup_steps):
        began = recorder.now()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        recorder.fetched(began, [batch])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recorder.step_end()
    flops = _flops(
        model,
        cast(Any, model.get_base_model()).config.text_config,
        recorder,
        args.warmup_steps,
        (processor.video_tokens, processor.image_tokens + 1),
        (processor.video_tokens, processor.image_tokens),
        args.gradient_checkpointing,
    )
    return _finish(recorder, args.warmup_steps, flops, 0)


RUNNERS: dict[str, Callable[[BenchArguments, BenchData, Scenario, str], dict[str, Any]]] = {
    "train": run_train,
    "loop": run_loop,
}


def run_scenario(args: BenchArguments, data: BenchData, scenario: Scenario) -> dict[str, Any]:
    """One scenario, in this process."""
    with tempfile.TemporaryDirectory(prefix="vidlora-bench-") as output_dir:
        return RUNNERS[scenario.kind](args, data, scenario, output_dir)


def worker_main(argv: Sequence[str]) -> int:
    """Entry of a scenario's own process: ``SPEC.json RESULT.json``."""
    spec = read_json_object(argv[0])
    result = run_scenario(
        BenchArguments(**spec["args"]),
        BenchData(**spec["data"]),
        Scenario(**{**spec["scenario"], "flags": tuple(spec["scenario"]["flags"])}),
    )
    write_text_atomic(argv[1], json.dumps(result))
    return 0


def run_isolated(args: BenchArguments, data: BenchData, scenario: Scenario, work: Path) -> dict[str, Any]:
    """One scenario in a fresh Python process (so its peak memory is its own)."""
    spec, result = (
        work / f"{scenario.mix}-{scenario.name}.spec.json",
        work / f"{scenario.mix}-{scenario.name}.json",
    )
    spec.write_text(json.dumps({"args": asdict(args), "data": asdict(data), "scenario": asdict(scenario)}))
    code = "import sys; from vidlora.bench import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(spec), str(result)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise VidloraError(
            f"scenario {scenario.mix}/{scenario.name} failed (exit {done.returncode}):\n{tail}"
        )
    return read_json_object(result)


# -- the decode baseline (a) ------------------------------------------------------------------------


def decode_baseline(videos: Sequence[str], num_frames: int, limit: int = 16) -> dict[str, Any]:
    """Per video (at most ``limit``): ``read_video`` vs decoding every frame up to the last sampled one."""
    from vidlora.data.media import read_video

    rows: list[dict[str, Any]] = []
    for path in tqdm(list(videos)[:limit], desc="decode baseline", unit="video", file=sys.stderr):
        began = time.perf_counter()
        seek, _ = read_video(path, num_frames)
        seek_s = time.perf_counter() - began
        began = time.perf_counter()
        full = decode_to_last_sampled(path, num_frames)
        full_s = time.perf_counter() - began
        rows.append(
            {
                "video": Path(path).name,
                "read_video_s": seek_s,
                "decode_all_s": full_s,
                "ratio": full_s / seek_s,
                "same_frames": bool(np.array_equal(seek, full)),
            }
        )
    read_total, full_total = sum(r["read_video_s"] for r in rows), sum(r["decode_all_s"] for r in rows)
    return {
        "videos": rows,
        "read_video_s": read_total,
        "decode_all_s": full_total,
        "ratio": full_total / read_total,
        "frames": num_frames,
    }


# -- the report -----------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compare(mix_results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The ratios of one mix: vidlora's loop over the baselines."""
    ratios: dict[str, float | None] = {}
    train = mix_results.get("train") or next(
        (v for k, v in mix_results.items() if k.startswith("train_w")), None
    )
    if train is None:
        return ratios
    if "loop" in mix_results:
        loop = mix_results["loop"]
        ratios["samples_per_s_train_over_loop"] = _ratio(train["samples_per_s"], loop["samples_per_s"])
        ratios["data_wait_loop_over_train"] = _ratio(loop["data_wait_fraction"], train["data_wait_fraction"])
    if "train_random" in mix_results:
        rand = mix_results["train_random"]
        ratios["padding_random_over_grouped"] = _ratio(rand["padding_fraction"], train["padding_fraction"])
        ratios["samples_per_s_grouped_over_random"] = _ratio(train["samples_per_s"], rand["samples_per_s"])
    if "train_cached" in mix_results:
        cached = mix_results["train_cached"]
        ratios["samples_per_s_cached_over_train"] = _ratio(cached["samples_per_s"], train["samples_per_s"])
        if "loop" in mix_results:
            ratios["samples_per_s_cached_over_loop"] = _ratio(
                cached["samples_per_s"], mix_results["loop"]["samples_per_s"]
            )
    padding = train.get("epoch_padding")
    if padding is not None:
        ratios["epoch_padding_random_over_grouped"] = _ratio(padding["random"], padding["grouped"])
    return ratios


def machine() -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines = [
        f"Data: {report['data']}; model {report['settings']['model_name_or_path']}, batch "
        f"{report['settings']['per_device_train_batch_size']}, {report['settings']['steps']} timed steps "
        f"after {report['settings']['warmup_steps']} warm-up, LoRA r {report['settings']['lora_r']}, "
        f"bf16 {report['settings']['bf16']}, gradient checkpointing {report['settings']['gradient_checkpointing']}.",
        "",
        "| mix | scenario | workers | samples/s | trained tok/s | tokens/s | data wait | padding "
        "| peak memory | useful TFLOP/s | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mix, entry in report["mixes"].items():
        for name, r in entry["scenarios"].items():
            memory = r.get("peak_cuda_bytes", r["peak_rss_bytes"]) / 2**30
            lines.append(
                f"| {mix} | {name} | {r['dataloader_num_workers']} | {r['samples_per_s']:.2f} "
                f"| {r['trained_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {_pct(r['data_wait_fraction'])} "
                f"| {_pct(r['padding_fraction'])} | {memory:.2f} GiB | {r['useful_tflops_per_s']:.4f} "
                f"| {_pct(r.get('mfu'))} |"
            )
    lines += ["", "| mix | train / loop samples/s | train, frame cache filled / loop | cached / uncached train "
              "| grouped / random samples/s | padding random / grouped (timed) "
              "| epoch padding random / grouped / grouped, one-step window |",
              "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for mix, entry in report["mixes"].items():
        ratios = entry["ratios"]
        pad = next((r["epoch_padding"] for r in entry["scenarios"].values() if "epoch_padding" in r), None)
        pads = (
            "–"
            if pad is None
            else " / ".join(_pct(pad[k]) for k in ("random", "grouped", "grouped_one_step_window"))
        )
        lines.append(
            f"| {mix} | {_times(ratios.get('samples_per_s_train_over_loop'))} "
            f"| {_times(ratios.get('samples_per_s_cached_over_loop'))} "
            f"| {_times(ratios.get('samples_per_s_cached_over_train'))} "
            f"| {_times(ratios.get('samples_per_s_grouped_over_random'))} "
            f"| {_times(ratios.get('padding_random_over_grouped'))} | {pads} |"
        )
    fills = {mix: entry["cache_fill"] for mix, entry in report["mixes"].items() if "cache_fill" in entry}
    if fills:
        lines += [
            "",
            "Frame cache, filled ahead with `vidlora cache` on every core (untimed in the runs):",
            "",
        ]
        for mix, fill in fills.items():
            entries = fill["report"]["entries"]
            sizes = ", ".join(
                f"{e['count']} {kind} entries of {e['mean_bytes'] / 2**20:.2f} MB"
                for kind, e in entries.items()
            )
            lines.append(f"- {mix}: {fill['seconds']:.1f} s; {sizes or 'no media'}")
    decode = report.get("decode")
    if decode:
        lines += [
            "",
            f"Decoding, {decode['frames']} sampled frames per video: every frame up to the last sampled one vs "
            f"`read_video`: {decode['decode_all_s']:.2f} s vs {decode['read_video_s']:.2f} s in all "
            f"({_times(decode['ratio'])}).",
            "",
            "| video | read_video s | decode-all s | ratio | same frames |",
            "|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['video']} | {r['read_video_s']:.3f} | {r['decode_all_s']:.3f} | {_times(r['ratio'])} | {r['same_frames']} |"
            for r in decode["videos"]
        ]
    lines += ["", f"FLOPs: {report['flops_formula']}."]
    return "\n".join(lines)


def bench(args: BenchArguments) -> dict[str, Any]:
    """Run every scenario of ``args``; returns the report (see ``--json``)."""
    with tempfile.TemporaryDirectory(prefix="vidlora-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(args, work)
        data = BenchData(**{**asdict(data), "frame_cache": str(work / "frame_cache")})
        report: dict[str, Any] = {
            "data": data.description,
            "settings": asdict(args),
            "machine": machine(),
            "flops_formula": FLOPS_FORMULA,
            "mixes": {mix: {"scenarios": {}, "ratios": {}} for mix in args.modalities},
        }
        if "decode" in args.baselines and data.videos:
            report["decode"] = decode_baseline(data.videos, args.num_frames or DEFAULT_FRAMES)
        todo = scenarios(args)
        for scenario in tqdm(todo, desc="bench", unit="scenario", file=sys.stderr):
            if scenario.cached:
                report["mixes"][scenario.mix]["cache_fill"] = fill_frame_cache(args, data, scenario.mix)
            if args.isolate:
                result = run_isolated(args, data, scenario, work)
            else:
                # The Trainer prints its final metrics on stdout, which --json keeps for the report.
                with contextlib.redirect_stdout(sys.stderr):
                    result = run_scenario(args, data, scenario)
            report["mixes"][scenario.mix]["scenarios"][scenario.name] = result
        for entry in report["mixes"].values():
            entry["ratios"] = compare(entry["scenarios"])
    return report


def main(argv: list[str] | None = None) -> int:
    """`vidlora bench`: print the report (markdown, or one JSON object with ``--json``)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = bench(args)
    print(json.dumps(report, indent=1) if args.json else format_markdown(report))
    return 0
