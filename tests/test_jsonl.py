"""JSON Lines that survive a kill: torn tails (even inside a character) are cut, every line stays valid."""

from __future__ import annotations

import json

import pytest

from vidlora.jsonl import JsonlAppender, JsonlError, read_jsonl, torn_tail, write_text_atomic

RECORDS = [{"id": "a", "text": "line\u2028separator and \u0085 next-line"}, {"id": "b", "text": "café"}]


def test_a_record_holding_line_separators_is_one_line(tmp_path):
    path = tmp_path / "x.jsonl"
    with JsonlAppender(path) as out:
        for record in RECORDS:
            out.write(record)
    assert [record for _, record in read_jsonl(path)] == RECORDS


def test_a_kill_inside_a_multibyte_character_is_cut_and_rewritten(tmp_path):
    path = tmp_path / "x.jsonl"
    whole = json.dumps(RECORDS[0], ensure_ascii=False) + "\n"
    torn = json.dumps(RECORDS[1], ensure_ascii=False).encode()
    cut = torn[: torn.index("é".encode()) + 1]  # the first of é's two bytes
    path.write_bytes(whole.encode() + cut)
    assert torn_tail(path) == len(cut)
    with pytest.raises(JsonlError, match=r"x\.jsonl:2: the last line is cut short"):
        list(read_jsonl(path))
    assert [r for _, r in read_jsonl(path, allow_torn_tail=True)] == RECORDS[:1]
    with JsonlAppender(path) as out:
        assert out.repaired == len(cut)
        out.write(RECORDS[1])
    assert [r for _, r in read_jsonl(path)] == RECORDS


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(RECORDS[0]))  # another tool's file: no final newline
    assert torn_tail(path) == 0
    with JsonlAppender(path) as out:
        out.write(RECORDS[1])
    assert [r for _, r in read_jsonl(path)] == RECORDS


def test_invalid_lines_are_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n')
    with pytest.raises(JsonlError, match=r"x\.jsonl:2: not valid JSON"):
        list(read_jsonl(path))
    path.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(JsonlError, match=r"x\.jsonl:2: not UTF-8"):
        list(read_jsonl(path))


def test_write_text_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
