"""`vidlora demo`: the whole pipeline on a laptop CPU, in minutes.

1. write a synthetic video/image QA dataset (`vidlora synth`);
2. score the untrained tiny model on the held-out questions (`vidlora predict` + exact match, and
   ranked options: the listed word it finds most likely);
3. LoRA-fine-tune it with the original's recipe, scaled down (`vidlora train`);
4. score it again;
5. print a before/after table and write ``metrics.json``, ``loss.png`` and ``examples.md``.

Every stage calls the library in-process; the training flags are the original's LoRA command with
only sizes, steps, learning rates, LoRA dropout and gradient checkpointing changed (see
`training_argv`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vidlora.data.synthetic import ANSWERS
from vidlora.errors import AlreadyExistsError
from vidlora.jsonl import read_jsonl

# Question types in the order the table shows them (motion first: it needs several frames).
QUESTION_TYPES: tuple[str, ...] = ("motion", "color", "shape", "count", "text", "compare")
DATA_DIR, TRAIN_DIR = "data", "train"
PREDS_BEFORE, PREDS_AFTER = "preds_before.jsonl", "preds_after.jsonl"
METRICS_FILE, LOSS_FILE, EXAMPLES_FILE = "metrics.json", "loss.png", "examples.md"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run.

    Attributes:
        out: output folder (data/, train/, predictions, metrics.json, loss.png, examples.md).
        n_train: synthetic training samples.
        n_eval: held-out synthetic samples (each has one or two questions).
        epochs: training epochs.
        max_steps: optimizer steps; -1 runs ``epochs`` epochs.
        seed: seed of the dataset and of training.
        lora_r: LoRA rank (the original's 128 is full rank on the tiny LLM's hidden size 128; 64
            trains as well here at 1.7x the speed, see docs/demo.md).
        lora_alpha: LoRA alpha (the original uses alpha = 2 r).
        lora_dropout: dropout on the LoRA inputs (the original's default 0.05 costs ~15% of a tiny
            step in random-mask generation and did not help on the synthetic task).
        learning_rate: learning rate of the LoRA adapters.
        mm_projector_lr: learning rate of the projector (None: ``learning_rate``).
        batch_size: samples per optimizer step.
        frames: frames per synthetic video (the model samples 8 of them).
        max_new_tokens: generation budget per answer (answers are one word).
    """

    out: Path = Path("demo_out")
    n_train: int = 6000
    n_eval: int = 150
    epochs: float = 3.0
    max_steps: int = -1
    seed: int = 0
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    learning_rate: float = 5e-4
    mm_projector_lr: float | None = None
    batch_size: int = 8
    frames: int = 16
    max_new_tokens: int = 8


def training_argv(config: DemoConfig, data_dir: Path, output_dir: Path) -> list[str]:
    """The original's LoRA command (Video-LLaVA's finetune_lora.sh) on the tiny model and the synthetic
    data; only sizes, steps, learning rates and LoRA dropout differ, plus `--gradient_checkpointing
    False`, `--tf32 False`/`--bf16 False` (CPU) and `--report_to none`."""
    argv = [
        "--model_name_or_path", "tiny",
        "--lora_enable", "True", "--lora_r", str(config.lora_r), "--lora_alpha", str(config.lora_alpha),
        "--lora_dropout", str(config.lora_dropout),
        "--version", "v1",
        "--data_path", str(data_dir / "train.json"),
        "--eval_data_path", str(data_dir / "eval.json"),
        "--video_folder", str(data_dir),
        "--image_folder", str(data_dir),
        "--X", "Video", "Image",
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_x_start_end", "False",
        "--mm_use_x_patch_token", "False",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--bf16", "False", "--tf32", "False",
        "--output_dir", str(output_dir),
        "--num_train_epochs", str(config.epochs),
        "--max_steps", str(config.max_steps),
        "--per_device_train_batch_size", str(config.batch_size),
        "--per_device_eval_batch_size", str(config.batch_size),
        "--gradient_accumulation_steps", "1",
        "--evaluation_strategy", "epoch",
        "--save_strategy", "no",
        "--learning_rate", str(config.learning_rate),
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "10",
        "--model_max_length", "2048",
        # Off: on the tiny model it only costs time (~10% per step); on or off gives the same
        # losses (tests/training/test_golden.py pins that), so the numbers stand for the original's True.
        "--gradient_checkpointing", "False",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--report_to", "none",
        "--seed", str(config.seed),
    ]  # fmt: skip
    if config.mm_projector_lr is not None:
        argv += ["--mm_projector_lr", str(config.mm_projector_lr)]
    return argv


def chance_accuracy() -> dict[str, float]:
    """Accuracy of a uniform guess among the words each question type lists."""
    return {qtype: 1.0 / len(ANSWERS[qtype]) for qtype in QUESTION_TYPES}


def overall_chance_accuracy(n_by_type: Mapping[str, int]) -> float | None:
    """Chance over all questions: each type's chance weighted by its number of questions."""
    total = sum(n_by_type.values())
    if not total:
        return None
    chance = chance_accuracy()
    return sum(n * chance[qtype] for qtype, n in n_by_type.items()) / total


def summarize(scores: Mapping[str, Any]) -> dict[str, Any]:
    """`score_predictions` output -> ``{"accuracy", "correct", "n", "by_type": {type: accuracy}}``."""
    by_type = scores.get("by_type", {})
    return {
        "accuracy": scores["accuracy"],
        "correct": scores["correct"],
        "n": scores["n"],
        "by_type": {t: by_type[t]["accuracy"] for t in QUESTION_TYPES if t in by_type},
        "n_by_type": {t: by_type[t]["n"] for t in QUESTION_TYPES if t in by_type},
    }


def _pct(value: float | None) -> str:
    return "   -" if value is None else f"{100 * value:5.1f}%"


def format_table(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """A Markdown before/after table: overall, then one row per question type.

    Exact match of the generated answer first; when both phases carry ranked-option results
    (``choice_accuracy``), two more columns show them.
    """
    chance = chance_accuracy()
    ranked = "choice_accuracy" in before and "choice_accuracy" in after
    header = "| questions | n | chance | before | after |"
    rule = "|---|---:|---:|---:|---:|"
    if ranked:
        header += " before, ranked options | after, ranked options |"
        rule += "---:|---:|"

    def extra(key: str | None) -> str:
        if not ranked:
            return ""
        if key is None:
            return f" {_pct(before['choice_accuracy'])} | {_pct(after['choice_accuracy'])} |"
        return f" {_pct(before['choice_by_type'].get(key))} | {_pct(after['choice_by_type'].get(key))} |"

    overall_chance = overall_chance_accuracy(after["n_by_type"])
    lines = [
        header,
        rule,
        f"| **all** | {after['n']} | {_pct(overall_chance)} | {_pct(before['accuracy'])} | "
        f"{_pct(after['accuracy'])} |" + extra(None),
    ]
    for qtype in QUESTION_TYPES:
        if qtype not in after["by_type"]:
            continue
        lines.append(
            f"| {qtype} | {after['n_by_type'][qtype]} | {_pct(chance[qtype])} | "
            f"{_pct(before['by_type'].get(qtype))} | {_pct(after['by_type'][qtype])} |" + extra(qtype)
        )
    return "\n".join(lines)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Records of a predictions file."""
    return [record for _, record in read_jsonl(path)]


def format_examples(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], per_type: int = 2
) -> str:
    """Markdown: ``per_type`` held-out questions of each type with the answers before and after."""
    earlier = {(r["id"], r["turn"]): r["prediction"] for r in before}
    lines = ["# vidlora demo: example answers", "", "Held-out synthetic questions; media in `data/`.", ""]
    for qtype in QUESTION_TYPES:
        chosen = [r for r in after if r.get("type") == qtype][:per_type]
        if not chosen:
            continue
        lines += [f"## {qtype}", ""]
        for record in chosen:
            question = record["question"].replace("<video>", "").replace("<image>", "").strip()
            lines += [
                f"- `{record['id']}` ({record['modality']}): {question}",
                f"  - reference: `{record['answer']}`",
                f"  - before: `{earlier.get((record['id'], record['turn']), '')}`",
                f"  - after: `{record['prediction']}`",
            ]
        lines.append("")
    return "\n".join(lines)


def _score(model_path: str, data_dir: Path, out: Path, loaded: Any, config: DemoConfig) -> dict[str, Any]:
    from vidlora.eval.score import score_predictions
    from vidlora.infer.predict import PredictOptions, predict

    # predict() resumes from an existing file; a demo run always starts from scratch.
    out.unlink(missing_ok=True)
    options = PredictOptions.from_argv(
        [
            "--model_path", model_path,
            "--data_path", str(data_dir / "eval.json"),
            "--video_folder", str(data_dir),
            "--image_folder", str(data_dir),
            "--out", str(out),
            "--batch_size", "16",
            "--max_new_tokens", str(config.max_new_tokens),
        ]
    )  # fmt: skip
    predict(options, loaded=loaded)
    return score_predictions(read_predictions(out))


def _score_choices(loaded: Any, data_dir: Path) -> dict[str, Any]:
    """Ranked-option accuracy: per question, the listed answer the model finds most likely
    (`Generator.score_options`, teacher-forced like training). Unlike exact match it does not
    need the model to produce a listed word, so an untrained model sits near chance."""
    from tqdm import tqdm

    from vidlora.data.records import load_records, resolve_media
    from vidlora.infer.generate import Generator, Request
    from vidlora.infer.predict import jobs_of, prompt_turns, sample_type

    generator = Generator(loaded)
    hits: dict[str, list[bool]] = {}
    jobs = [job for sample in load_records(data_dir / "eval.json") for job in jobs_of(sample)]
    for job in tqdm(jobs, desc="rank options"):
        qtype = sample_type(job.sample, job.turn)
        assert qtype is not None  # the demo wrote these samples itself: each has a question type
        options = ANSWERS[qtype]
        video, images = resolve_media(job.sample, data_dir, data_dir)
        request = Request(job.sample.id, prompt_turns(job), video, list(images))
        scores = generator.score_options(request, options)
        best = options[max(range(len(options)), key=scores.__getitem__)]
        hits.setdefault(qtype, []).append(best == job.answer)
    every = [hit for per_type in hits.values() for hit in per_type]
    return {
        "choice_accuracy": sum(every) / len(every),
        "choice_by_type": {t: sum(hits[t]) / len(hits[t]) for t in QUESTION_TYPES if t in hits},
    }


def _prepare_out(out: Path, overwrite: bool) -> None:
    existing = [p.name for p in (out / DATA_DIR, out / TRAIN_DIR, out / METRICS_FILE) if p.exists()]
    if existing and not overwrite:
        raise AlreadyExistsError(
            f"{out} already holds a demo run ({existing}); pass --overwrite or choose another --out"
        )
    for name in (DATA_DIR, TRAIN_DIR):
        if (out / name).exists():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(config: DemoConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the five stages (module docstring); returns the metrics also written to ``metrics.json``."""
    from vidlora.args import parse_train_args
    from vidlora.data.synthetic import generate_dataset
    from vidlora.infer.load import load_for_inference
    from vidlora.training.recipe import run

    out = Path(config.out)
    _prepare_out(out, overwrite)
    data_dir, train_dir = out / DATA_DIR, out / TRAIN_DIR
    timing: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str, began: float) -> None:
        timing[name] = round(time.perf_counter() - began, 2)
        print(f"vidlora demo: {name} done in {timing[name]:.1f} s", file=sys.stderr)

    t = time.perf_counter()
    print(f"vidlora demo: [1/4] synthetic data -> {data_dir}", file=sys.stderr)
    summary = generate_dataset(
        data_dir, config.n_train, config.n_eval, config.seed, num_frames=config.frames, progress=True
    )
    stage("synth", t)

    t = time.perf_counter()
    print("vidlora demo: [2/4] scoring the untrained tiny model", file=sys.stderr)
    untrained = load_for_inference("tiny")
    before_scores = _score("tiny", data_dir, out / PREDS_BEFORE, untrained, config)
    before_choices = _score_choices(untrained, data_dir)
    stage("score_before", t)

    t = time.perf_counter()
    print(f"vidlora demo: [3/4] LoRA fine-tuning -> {train_dir}", file=sys.stderr)
    model_args, data_args, train_args = parse_train_args(training_argv(config, data_dir, train_dir))
    trainer = run(model_args, data_args, train_args)
    assert trainer is not None  # _prepare_out emptied the training directory: nothing was finished
    stage("train", t)

    t = time.perf_counter()
    print("vidlora demo: [4/4] scoring the fine-tuned model", file=sys.stderr)
    trained = load_for_inference(str(train_dir))
    after_scores = _score(str(train_dir), data_dir, out / PREDS_AFTER, trained, config)
    after_choices = _score_choices(trained, data_dir)
    stage("score_after", t)
    timing["total"] = round(time.perf_counter() - start, 2)

    before = {**summarize(before_scores), **before_choices}
    after = {**summarize(after_scores), **after_choices}
    loss_src = train_dir / LOSS_FILE
    if not loss_src.is_file():
        raise RuntimeError(f"training wrote no loss curve at {loss_src}")
    shutil.copyfile(loss_src, out / LOSS_FILE)
    (out / EXAMPLES_FILE).write_text(
        format_examples(read_predictions(out / PREDS_BEFORE), read_predictions(out / PREDS_AFTER)),
        encoding="utf-8",
    )
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    config_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    config_record.update(
        train_questions=summary.splits["train"].num_turns,
        eval_questions=summary.splits["eval"].num_turns,
        optimizer_steps=trainer.state.global_step,
        training_argv=training_argv(config, data_dir, train_dir),
    )
    metrics = {
        "before": before,
        "after": after,
        "chance": chance_accuracy(),
        "config": config_record,
        "timing_s": timing,
        "train_loss": {
            "first": train_losses[0] if train_losses else None,
            "last": train_losses[-1] if train_losses else None,
        },
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """The `vidlora demo` argument parser (defaults from `DemoConfig`)."""
    d = DemoConfig()
    parser = argparse.ArgumentParser(prog="vidlora demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)"
    )
    parser.add_argument("--train", type=int, default=d.n_train, help="synthetic training samples")
    parser.add_argument("--eval", type=int, default=d.n_eval, help="held-out synthetic samples")
    parser.add_argument("--epochs", type=float, default=d.epochs, help="training epochs")
    parser.add_argument("--steps", type=int, default=d.max_steps, help="optimizer steps (-1: use --epochs)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data and of training")
    parser.add_argument("--lora_r", type=int, default=d.lora_r, help="LoRA rank")
    parser.add_argument(
        "--lora_alpha", type=int, default=None, help="LoRA alpha (default: 2 x rank, as the original)"
    )
    parser.add_argument(
        "--lora_dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA inputs"
    )
    parser.add_argument(
        "--lr", type=float, default=d.learning_rate, help="learning rate of the LoRA adapters"
    )
    parser.add_argument(
        "--mm_projector_lr", type=float, default=d.mm_projector_lr, help="projector learning rate"
    )
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help="samples per optimizer step")
    parser.add_argument("--frames", type=int, default=d.frames, help="frames per synthetic video")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    return parser


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """`DemoConfig` from parsed `vidlora demo` arguments."""
    return DemoConfig(
        out=args.out,
        n_train=args.train,
        n_eval=args.eval,
        epochs=args.epochs,
        max_steps=args.steps,
        seed=args.seed,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        learning_rate=args.lr,
        mm_projector_lr=args.mm_projector_lr,
        batch_size=args.batch_size,
        frames=args.frames,
    )


def main(argv: list[str] | None = None) -> int:
    """`vidlora demo`: run the pipeline, print the before/after table; returns the exit status."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    metrics = run_demo(config, overwrite=args.overwrite)
    print(format_table(metrics["before"], metrics["after"]))
    print(
        f"\nwall time {metrics['timing_s']['total']:.0f} s; wrote {config.out}/{METRICS_FILE}, "
        f"{LOSS_FILE}, {EXAMPLES_FILE}"
    )
    return 0
