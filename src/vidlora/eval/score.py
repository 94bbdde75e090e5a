"""`vidlora eval`: score a predictions file by exact match (and, optionally, the judge protocol).

Input is the JSONL written by `vidlora predict`, one object per assistant turn::

    {"id": "v1", "question": "...", "answer": "left", "prediction": "Left.", "type": "motion",
     "modality": "video"}

Multi-turn samples add ``"turn": k`` (0-based index of the assistant turn in the sample's
``conversations``); ``(id, turn)`` must be unique. When the predictions lack the reference answer,
question, type or modality, ``--data_path`` (the dataset's JSON/JSONL, read as training reads it) supplies them
by joining on ``(id, turn)``. The join is strict in both directions: a prediction whose ``(id, turn)``
is not in the data, or a data turn without a prediction, is an error. Where both sides carry an
answer or a type they must agree, which catches predictions paired with the wrong sample (the
original multi-GPU eval indexed answers per chunk and scored them against the wrong questions).

Exact match (see ``normalize_answer`` and ``exact_match``) is the primary metric for the synthetic
data, whose answers are single words from closed sets.
"""

from __future__ import annotations

import argparse
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vidlora.data.records import Sample, load_records
from vidlora.errors import VidloraError
from vidlora.jsonl import JsonlError, read_jsonl

NONE_BUCKET = "(none)"
"""Group name for records without a ``type`` / ``modality`` field (shown, not dropped)."""

# Digits and number words are mapped to one form (the word) so "2" and "two" compare equal; the
# synthetic count answers are words, models often answer with digits.
_NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)  # fmt: skip
_DIGIT_TO_WORD: Mapping[str, str] = {str(i): word for i, word in enumerate(_NUMBER_WORDS)}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_EOS_SUFFIX = re.compile(r"(?:\s*</s>)+\s*$")
_MEDIA_PLACEHOLDER = re.compile(r"\s*<(?:video|image)>\s*")


class EvalInputError(VidloraError, ValueError):
    """A predictions or data file that cannot be scored; the message names the file and the item."""


# --- normalisation and matching ---------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for exact-match comparison.

    Steps, in order: drop trailing ``</s>`` end-of-sequence markers (a model may emit them as text);
    keep the first non-empty line (models often explain on later lines); lowercase; delete ASCII
    punctuation (``"Left."`` → ``"left"``, ``"don't"`` → ``"dont"``); drop the articles a/an/the;
    map the digits 0-10 to the words zero..ten (so ``"2"`` and ``"two"`` are equal); collapse
    whitespace.
    """
    text = _EOS_SUFFIX.sub("", text).strip()
    lines = text.splitlines()
    text = lines[0] if lines else ""
    words = text.lower().translate(_PUNCT_TABLE).split()
    words = [_DIGIT_TO_WORD.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, ref: str) -> bool:
    """Whether a prediction matches a reference after ``normalize_answer``.

    Besides equality, a prediction whose *first word* equals a one-word reference counts as
    correct: the synthetic questions ask for one word, and a model that answers "Left. The circle
    moves to the left." has answered "left". Only the first word is looked at, so later words cannot
    rescue a wrong answer ("up, no, left" does not match "left") and a reference of several words
    still needs full equality.
    """
    p, r = normalize_answer(pred), normalize_answer(ref)
    if p == r:
        return True
    if r and " " not in r:
        first = p.split(" ", 1)[0]
        return first == r
    return False


# --- scoring ---------------------------------------------------------------------------------


def _bucket(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return NONE_BUCKET if value is None else str(value)


def _accuracy(correct: int, n: int) -> float | None:
    return correct / n if n else None


def score_predictions(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy overall, per question type and per modality.

    Each record needs ``prediction`` and ``answer`` strings; ``type`` / ``modality`` are optional
    (records without them are grouped under ``"(none)"``). Returns
    ``{"accuracy", "correct", "n", "by_type": {type: {"accuracy", "correct", "n"}}, "by_modality": {...}}``
    with groups sorted by name; ``accuracy`` is ``None`` when there are no records.
    """
    totals = {"correct": 0, "n": 0}
    groups: dict[str, dict[str, dict[str, int]]] = {"by_type": {}, "by_modality": {}}
    for record in records:
        ok = int(exact_match(record["prediction"], record["answer"]))
        totals["correct"] += ok
        totals["n"] += 1
        for group, key in (("by_type", "type"), ("by_modality", "modality")):
            counts = groups[group].setdefault(_bucket(record, key), {"correct": 0, "n": 0})
            counts["correct"] += ok
            counts["n"] += 1
    result: dict[str, Any] = {"accuracy": _accuracy(totals["correct"], totals["n"]), **totals}
    for group, buckets in groups.items():
        result[group] = {
            name: {"accuracy": _accuracy(c["correct"], c["n"]), **c} for name, c in sorted(buckets.items())
        }
    return result


# --- reading predictions and data ----------------------------------------------------------------


def _record_key(record: Mapping[str, Any]) -> tuple[str, int | None]:
    turn = record.get("turn")
    return str(record["id"]), (None if turn is None else int(turn))


def _describe_key(key: tuple[str, int | None]) -> str:
    sample_id, turn = key
    return f"id {sample_id!r}" + ("" if turn is None else f" turn {turn}")


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a predictions JSONL file; blank lines are skipped, every other line must be an object.

    Raises ``EvalInputError`` naming the file and line for malformed JSON (a line cut short by a
    killed writer included), a non-object line, a record without ``id`` or without a string
    ``prediction``, a bad ``turn``, or a duplicate ``(id, turn)``.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such predictions file")
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, int | None], int] = {}
    try:
        lines = list(read_jsonl(path))
    except JsonlError as err:
        raise EvalInputError(str(err)) from None
    for lineno, record in lines:
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise EvalInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if record.get("id") is None:
            raise EvalInputError(f"{where}: record has no 'id'")
        if not isinstance(record.get("prediction"), str):
            raise EvalInputError(
                f"{where}: {_describe_key((str(record['id']), None))} has no string 'prediction'"
            )
        turn = record.get("turn")
        if turn is not None and (isinstance(turn, bool) or not isinstance(turn, int) or turn < 0):
            raise EvalInputError(f"{where}: 'turn' must be a non-negative integer, got {turn!r}")
        key = _record_key(record)
        if key in seen:
            raise EvalInputError(f"{where}: duplicate {_describe_key(key)} (first seen on line {seen[key]})")
        seen[key] = lineno
        record["_source"] = where
        records.append(record)
    return records


def load_references(paths: Sequence[str | Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """Reference turns from dataset files, keyed by ``(id, turn)`` (turn = 0-based assistant turn).

    The files are read by training's own reader (:func:`vidlora.data.records.load_records`: JSON or
    JSON Lines by content, a leading system turn, placeholders checked). Each entry holds
    ``answer``, ``question`` (media placeholders removed), ``type`` (from the sample's
    ``types[turn]``, else its ``type``, else ``None``), ``modality`` (the sample's field, else
    derived from its media) and ``num_turns``. Duplicate ids across the files are an error.
    """
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for sample in load_records(list(paths), duplicate_ids="error"):
        where = f"{sample.source} sample {sample.index}"
        turns = _reference_turns(sample)
        types = sample.raw.get("types")
        if types is not None and (not isinstance(types, list) or len(types) != len(turns)):
            raise EvalInputError(
                f"{where} (id {sample.id!r}): 'types' must list one type per assistant turn "
                f"({len(turns)}), got {types!r}"
            )
        modality = sample.modality_label
        for k, (question, answer) in enumerate(turns):
            refs[(sample.id, k)] = {
                "answer": answer,
                "question": question,
                "type": types[k] if types is not None else sample.raw.get("type"),
                "modality": modality,
                "num_turns": len(turns),
                "source": where,
            }
    return refs


def _reference_turns(sample: Sample) -> list[tuple[str, str]]:
    """(question, answer) per assistant turn; placeholders (and the spaces around them) dropped."""
    turns: list[tuple[str, str]] = []
    question = ""
    for turn in sample.conversations:
        if turn.role == "human":
            question = _MEDIA_PLACEHOLDER.sub(" ", turn.value).strip()
        elif turn.role == "gpt":
            turns.append((question, turn.value))
    return turns


def join_references(
    predictions: Sequence[dict[str, Any]], refs: Mapping[tuple[str, int], Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Fill ``answer``/``question``/``type``/``modality`` of each prediction from its reference turn.

    A prediction without ``turn`` matches turn 0 of a single-turn sample; for a multi-turn sample it
    is an error (which turn would be ambiguous). Errors: a prediction with no reference, a
    reference turn with no prediction, or an answer/type that both sides carry and that differ.
    """
    joined: list[dict[str, Any]] = []
    covered: set[tuple[str, int]] = set()
    for pred in predictions:
        sample_id, turn = _record_key(pred)
        where = pred.get("_source", "predictions")
        key = (sample_id, 0 if turn is None else turn)
        ref = refs.get(key)
        if ref is None:
            raise EvalInputError(f"{where}: {_describe_key((sample_id, turn))} is not in --data_path")
        if turn is None and ref["num_turns"] > 1:
            raise EvalInputError(
                f"{where}: id {sample_id!r} has {ref['num_turns']} assistant turns in {ref['source']}; "
                "the prediction must say which with 'turn'"
            )
        if key in covered:
            raise EvalInputError(f"{where}: a second prediction for {_describe_key(key)}")
        covered.add(key)
        record = dict(pred)
        for field in ("answer", "type"):
            mine, theirs = pred.get(field), ref[field]
            if mine is not None and theirs is not None and str(mine).strip() != str(theirs).strip():
                raise EvalInputError(
                    f"{where}: {_describe_key(key)} has {field} {mine!r} but {ref['source']} says "
                    f"{theirs!r} (predictions paired with the wrong sample?)"
                )
        for field in ("answer", "question", "type", "modality"):
            if record.get(field) is None:
                record[field] = ref[field]
        joined.append(record)
    missing = [key for key in refs if key not in covered]
    if missing:
        shown = ", ".join(_describe_key(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise EvalInputError(f"{len(missing)} reference turn(s) have no prediction: {shown}{more}")
    return joined


def _require_answers(records: Sequence[Mapping[str, Any]]) -> None:
    for record in records:
        if not isinstance(record.get("answer"), str):
            raise EvalInputError(
                f"{record.get('_source', 'predictions')}: {_describe_key(_record_key(record))} has no "
                "string 'answer' (pass --data_path to take answers from the dataset)"
            )


# --- command line --------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidlora eval",
        description="Score predictions by exact match, optionally also with an LLM judge "
        "(the Video-ChatGPT protocol) through an OpenAI-compatible endpoint.",
    )
    parser.add_argument("--predictions", required=True, help="preds.jsonl written by `vidlora predict`")
    parser.add_argument(
        "--data_path",
        nargs="+",
        default=None,
        help="dataset JSON/JSONL file(s) supplying answers/questions/types, joined on (id, turn)",
    )
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    judge = parser.add_argument_group("judge (optional)")
    judge.add_argument("--judge", action="store_true", help="also score with an LLM judge")
    judge.add_argument("--judge_base_url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    judge.add_argument("--judge_model", help="model name sent to the endpoint")
    judge.add_argument(
        "--judge_api_key_env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key ('' for an endpoint that needs none)",
    )
    judge.add_argument("--judge_timeout", type=float, default=60.0, help="seconds per request")
    judge.add_argument("--judge_max_retries", type=int, default=3, help="retries after a failed request")
    judge.add_argument(
        "--judge_backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)"
    )
    judge.add_argument("--judge_workers", type=int, default=4, help="concurrent requests")
    judge.add_argument(
        "--judge_cache",
        default=None,
        help="JSONL cache of judge replies (default: next to --out, <out stem>.judge_cache.jsonl)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `vidlora eval`; bad input raises (the CLI prints it, exit 2)."""
    from vidlora.eval import judge as judge_mod
    from vidlora.eval.report import build_report, format_table, write_report

    args = _build_parser().parse_args(argv)
    judge_config = judge_mod.config_from_args(args) if args.judge else None
    records = load_predictions(args.predictions)
    if not records:
        raise EvalInputError(f"{args.predictions}: no predictions")
    if args.data_path:
        records = join_references(records, load_references(args.data_path))
    _require_answers(records)

    scores = score_predictions(records)
    judge_summary = None
    judge_results = None
    if judge_config is not None:
        judge_results = judge_mod.judge_records(records, judge_config)
        judge_summary = judge_mod.summarize_judgements(records, judge_results, judge_config)
    report = build_report(
        records,
        scores,
        judge_summary=judge_summary,
        judge_results=judge_results,
        sources={"predictions": str(args.predictions), "data_path": args.data_path},
    )
    print(format_table(report))
    write_report(report, args.out)
    print(f"report written to {args.out}")
    return 0
