"""Exact-match scoring: normalisation, the first-word rule, per-group fractions, the --data_path join."""

import json

import pytest

from vidlora.cli import main as vidlora
from vidlora.data.records import RecordError
from vidlora.eval.score import (
    EvalInputError,
    exact_match,
    join_references,
    load_predictions,
    load_references,
    normalize_answer,
    score_predictions,
)


def main(argv: list[str]) -> int:
    """`vidlora eval ARGV` through the CLI (its error policy included)."""
    return vidlora(["eval", *argv])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# 4 motion (3 right), 2 color (1 right); modalities cut across types:
# video: m1 m2 m4 c2 -> 2/4, video+image: m3 -> 1/1, image: c1 -> 1/1; overall 4/6.
def _rec(sample_id, answer, prediction, qtype, modality):
    return {"id": sample_id, "question": "q", "answer": answer, "prediction": prediction, "type": qtype,
            "modality": modality}  # fmt: skip


HAND_MADE = [
    _rec("m1", "left", "Left.", "motion", "video"),
    _rec("m2", "up", "up</s>", "motion", "video"),
    _rec("m3", "down", "Down. The shapes move down.", "motion", "video+image"),
    _rec("m4", "right", "left", "motion", "video"),
    _rec("c1", "red", "The red", "color", "image"),
    _rec("c2", "blue", "purple", "color", "video"),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Left.", "left"),
        ("left</s>", "left"),
        ("  Left. </s> </s>\n", "left"),
        ("\n\nThe Circle!\nIt moves up.", "circle"),
        ("An  apple,  a pear", "apple pear"),
        ("2", "two"),
        ("10 shapes", "ten shapes"),
        ("0", "zero"),
        ("11", "11"),
        ("Don't", "dont"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("left", "left", True),
        ("Left. The circle moves to the left.", "left", True),  # first word of a longer reply
        ("up, no, left", "left", False),  # only the first word counts
        ("2", "two", True),
        ("Three.", "3", True),
        ("red circle", "red circle", True),
        ("red circle, I think", "red circle", False),  # several-word references need equality
        ("red", "red circle", False),
        ("", "left", False),
        ("leftward", "left", False),
    ],
)
def test_exact_match(pred, ref, expected):
    assert exact_match(pred, ref) is expected


def test_score_predictions_pins_fractions():
    scores = score_predictions(HAND_MADE)
    assert (scores["correct"], scores["n"], scores["accuracy"]) == (4, 6, 4 / 6)
    assert scores["by_type"] == {
        "color": {"accuracy": 1 / 2, "correct": 1, "n": 2},
        "motion": {"accuracy": 3 / 4, "correct": 3, "n": 4},
    }
    assert scores["by_modality"] == {
        "image": {"accuracy": 1.0, "correct": 1, "n": 1},
        "video": {"accuracy": 2 / 4, "correct": 2, "n": 4},
        "video+image": {"accuracy": 1.0, "correct": 1, "n": 1},
    }


def test_score_predictions_groups_missing_fields_and_empty_input():
    scores = score_predictions([{"prediction": "yes", "answer": "no"}])
    assert scores["by_type"] == {"(none)": {"accuracy": 0.0, "correct": 0, "n": 1}}
    assert score_predictions([])["accuracy"] is None


def test_main_writes_report_and_table(tmp_path, capsys):
    preds = _write_jsonl(tmp_path / "preds.jsonl", HAND_MADE)
    out = tmp_path / "sub" / "report.json"
    assert main(["--predictions", str(preds), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    em = report["exact_match"]
    assert (em["accuracy"], em["by_type"]["motion"]["accuracy"], em["by_type"]["color"]["accuracy"]) == (
        4 / 6,
        3 / 4,
        1 / 2,
    )
    assert [item["exact_match"] for item in report["items"]] == [True, True, True, False, True, False]
    assert "judge" not in report
    table = capsys.readouterr().out
    assert "motion" in table and "75.00%" in table and "66.67%" in table


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps(HAND_MADE[0]) + "\n\n" + '{"id": "x", "prediction": \n', encoding="utf-8")
    assert main(["--predictions", str(preds), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"{preds}:3: not valid JSON" in err
    assert not (tmp_path / "r.json").exists()


def test_bad_records_are_errors(tmp_path):
    cases = {
        "[1, 2]": "expected a JSON object",
        '{"prediction": "a"}': "has no 'id'",
        '{"id": "a"}': "no string 'prediction'",
        '{"id": "a", "prediction": "x", "turn": -1}': "'turn' must be a non-negative integer",
    }
    for line, message in cases.items():
        path = tmp_path / "p.jsonl"
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(EvalInputError, match=message):
            load_predictions(path)


def test_duplicate_ids_are_errors_but_turns_are_distinct(tmp_path):
    ok = _write_jsonl(
        tmp_path / "ok.jsonl",
        [{"id": "a", "turn": 0, "prediction": "x"}, {"id": "a", "turn": 1, "prediction": "y"}],
    )
    assert len(load_predictions(ok)) == 2
    dup = _write_jsonl(tmp_path / "dup.jsonl", [HAND_MADE[0], HAND_MADE[1], HAND_MADE[0]])
    with pytest.raises(EvalInputError, match=r"dup.jsonl:3: duplicate id 'm1' \(first seen on line 1\)"):
        load_predictions(dup)


def test_missing_answer_without_data_path(tmp_path, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "left"}])
    assert main(["--predictions", str(preds), "--out", str(tmp_path / "r.json")]) == 2
    assert "has no string 'answer' (pass --data_path" in capsys.readouterr().err


# --- the join with --data_path ---------------------------------------------------------------------

DATA = [
    {
        "id": "s1",
        "image": "s1.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color? Answer with one word: red or blue."},
            {"from": "gpt", "value": "red"},
        ],
        "type": "color",
        "types": ["color"],
        "modality": "image",
    },
    {
        "id": "m1",
        "video": "m1.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhere do they move?"},
            {"from": "gpt", "value": "left"},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "three"},
        ],
        "type": "motion",
        "types": ["motion", "count"],
        "modality": "video",
    },
    {  # no type / modality fields: modality derived from the media keys
        "id": 7,
        "video": "v.mp4",
        "image": "i.png",
        "conversations": [
            {"from": "human", "value": "<video>\n<image>\nSame?"},
            {"from": "gpt", "value": "yes"},
        ],
    },
]


def test_join_fills_answers_types_by_id_and_turn(tmp_path, capsys):
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(DATA), encoding="utf-8")
    # Deliberately out of order: the join must go by (id, turn), never by position.
    preds = _write_jsonl(
        tmp_path / "preds.jsonl",
        [
            {"id": "m1", "turn": 1, "prediction": "3"},
            {"id": "7", "prediction": "no"},
            {"id": "s1", "prediction": "Red."},
            {"id": "m1", "turn": 0, "prediction": "right"},
        ],
    )
    joined = join_references(load_predictions(preds), load_references([data]))
    got = [(r["id"], r.get("turn"), r["answer"], r["type"], r["modality"], r["question"]) for r in joined]
    assert got == [
        ("m1", 1, "three", "count", "video", "How many?"),
        ("7", None, "yes", None, "video+image", "Same?"),
        ("s1", None, "red", "color", "image", "What color? Answer with one word: red or blue."),
        ("m1", 0, "left", "motion", "video", "Where do they move?"),
    ]
    out = tmp_path / "r.json"
    assert main(["--predictions", str(preds), "--data_path", str(data), "--out", str(out)]) == 0
    em = json.loads(out.read_text())["exact_match"]
    assert (em["correct"], em["n"]) == (2, 4)
    assert em["by_type"] == {
        "(none)": {"accuracy": 0.0, "correct": 0, "n": 1},
        "color": {"accuracy": 1.0, "correct": 1, "n": 1},
        "count": {"accuracy": 1.0, "correct": 1, "n": 1},
        "motion": {"accuracy": 0.0, "correct": 0, "n": 1},
    }


@pytest.mark.parametrize(
    ("preds", "message"),
    [
        (  # a prediction whose id is not in the data
            [{"id": "s1", "prediction": "red"}, {"id": "m1", "turn": 0, "prediction": "a"},
             {"id": "m1", "turn": 1, "prediction": "b"}, {"id": "7", "prediction": "c"},
             {"id": "zz", "prediction": "d"}],
            r"id 'zz' is not in --data_path",
        ),
        (  # a data turn with no prediction
            [{"id": "s1", "prediction": "red"}, {"id": "m1", "turn": 0, "prediction": "a"},
             {"id": "7", "prediction": "c"}],
            r"1 reference turn\(s\) have no prediction: id 'm1' turn 1",
        ),
        (  # a turn index past the sample's turns
            [{"id": "s1", "turn": 1, "prediction": "red"}],
            r"id 's1' turn 1 is not in --data_path",
        ),
        (  # multi-turn sample without 'turn'
            [{"id": "m1", "prediction": "a"}],
            r"id 'm1' has 2 assistant turns .* must say which with 'turn'",
        ),
        (  # the prediction carries an answer that disagrees with the data: misaligned
            [{"id": "s1", "answer": "blue", "prediction": "red"}],
            r"id 's1' turn 0 has answer 'blue' but .* says 'red' \(predictions paired with the wrong sample\?\)",
        ),
        (  # turn 0 given explicitly and also implicitly
            [{"id": "s1", "prediction": "red"}, {"id": "s1", "turn": 0, "prediction": "red"}],
            r"a second prediction for id 's1' turn 0",
        ),
    ],
)  # fmt: skip
def test_join_errors(tmp_path, preds, message):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in DATA), encoding="utf-8")
    path = _write_jsonl(tmp_path / "preds.jsonl", preds)
    with pytest.raises(EvalInputError, match=message):
        join_references(load_predictions(path), load_references([data]))


def test_data_errors(tmp_path):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([DATA[0], DATA[0]]), encoding="utf-8")
    # Training's reader: the record file, index, id and field are named.
    with pytest.raises(RecordError, match=r"a.json: sample 1 \(id 's1'\): field 'id': duplicate id"):
        load_references([data])
    bad_types = dict(DATA[1], types=["motion"])
    data.write_text(json.dumps([bad_types]), encoding="utf-8")
    with pytest.raises(EvalInputError, match=r"'types' must list one type per assistant turn \(2\)"):
        load_references([data])
    data.write_text(json.dumps({"id": "x"}), encoding="utf-8")
    with pytest.raises(RecordError, match="field 'conversations': missing"):
        load_references([data])


def test_data_path_is_read_under_training_rules(tmp_path):
    """A leading system turn (training accepts it) and JSON Lines saved as .json (training detects the
    format by content) must read the same way here."""
    records = [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Colour?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "b",
            "conversations": [{"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}],
        },
    ]
    data = tmp_path / "eval.json"  # JSON Lines in a .json file
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    preds = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "a", "turn": 0, "prediction": "Red."}, {"id": "b", "turn": 0, "prediction": "square"}],
    )
    out = tmp_path / "r.json"
    assert main(["--predictions", str(preds), "--data_path", str(data), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["exact_match"]["correct"] == 1 and report["exact_match"]["n"] == 2
    assert {item["question"] for item in report["items"]} == {"Colour?", "Shape?"}
