"""The `vidlora eval` report: one JSON document and the table printed beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vidlora.eval.judge import JudgeResult
from vidlora.eval.score import exact_match
from vidlora.jsonl import write_text_atomic

_ITEM_FIELDS = ("id", "turn", "type", "modality", "question", "answer", "prediction")


def build_report(
    records: Sequence[Mapping[str, Any]],
    scores: Mapping[str, Any],
    judge_summary: Mapping[str, Any] | None = None,
    judge_results: Sequence[JudgeResult] | None = None,
    sources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report: sources, exact-match scores, the judge summary and one entry per record.

    Each ``items`` entry keeps the record's id/turn/type/modality/question/answer/prediction, its
    exact-match verdict and, when judged, the judge status, verdict, score and error.
    """
    items = []
    for index, record in enumerate(records):
        item: dict[str, Any] = {k: record[k] for k in _ITEM_FIELDS if record.get(k) is not None}
        item["exact_match"] = exact_match(record["prediction"], record["answer"])
        if judge_results is not None:
            result = judge_results[index]
            item["judge"] = {
                "status": result.status,
                "pred": result.judgement.pred if result.judgement else None,
                "score": result.judgement.score if result.judgement else None,
                "error": result.error,
            }
        items.append(item)
    report: dict[str, Any] = {"sources": dict(sources or {}), "exact_match": dict(scores)}
    if judge_summary is not None:
        report["judge"] = dict(judge_summary)
    report["items"] = items
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table: overall, per type and per modality, with judge columns when judged."""
    em = report["exact_match"]
    judge = report.get("judge")
    header = ["group", "name", "n", "exact"]
    if judge is not None:
        header += ["judge_acc", "judge_score", "parse_fail", "errors"]
    rows: list[list[str]] = []

    def add(group: str, name: str, em_part: Mapping[str, Any], judge_part: Mapping[str, Any] | None) -> None:
        row = [group, name, str(em_part["n"]), _pct(em_part["accuracy"])]
        if judge is not None:
            j = judge_part or {}
            row += [
                _pct(j.get("accuracy")),
                _num(j.get("mean_score")),
                str(j.get("parse_failures", 0)),
                str(j.get("errors", 0)),
            ]
        rows.append(row)

    add("overall", "all", em, judge)
    for group, label in (("by_type", "type"), ("by_modality", "modality")):
        for name, part in em[group].items():
            add(label, name, part, (judge or {}).get(group, {}).get(name))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    if judge is not None and judge.get("cached"):
        lines.append(f"(judge: {judge['cached']} of {judge['n']} verdicts from the cache)")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | Path) -> None:
    """Write the report as indented JSON, through a temporary file so a crash leaves no half report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
