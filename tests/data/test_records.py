"""Records: JSON/JSONL loading, validation errors that name file/index/id/field, media paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vidlora.data.records import RecordError, Sample, Turn, load_records, read_records, resolve_media

GOOD = [
    {
        "id": "v1",
        "video": "clips/a.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat is the man doing?"},
            {"from": "gpt", "value": "He is juggling."},
        ],
    },
    {
        "id": 7,
        "image": "coco/0001.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the bus?"},
            {"from": "gpt", "value": "White and red."},
            {"from": "human", "value": "Any people?"},
            {"from": "gpt", "value": "No."},
        ],
    },
    {"id": "t1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {
        "id": "vi",
        "video": ["clips/b.mp4"],
        "image": ["x.jpg", "y.jpg"],
        "conversations": [
            {"from": "human", "value": "<video>\n<image>\n<image>\nCompare."},
            {"from": "gpt", "value": "Same."},
        ],
    },
]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def write_jsonl(path: Path, data) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in data))
    return path


def key(s: Sample):
    return (s.id, s.video, s.images, s.conversations, s.index)


def test_json_and_jsonl_load_equal(tmp_path):
    a = load_records([write_json(tmp_path / "a.json", GOOD)])
    b = load_records(write_jsonl(tmp_path / "b.jsonl", GOOD))
    assert [key(s) for s in a] == [key(s) for s in b]
    assert [s.id for s in a] == ["v1", "7", "t1", "vi"]
    assert a[0].video == "clips/a.mp4" and a[0].images == ()
    assert a[1].images == ("coco/0001.jpg",) and len(a[1].conversations) == 4
    assert a[3].video == "clips/b.mp4" and a[3].images == ("x.jpg", "y.jpg")
    assert a[2].has_media is False and a[3].has_media is True
    assert a[1].conversations[2] == Turn("human", "Any people?")
    assert a[1].raw == GOOD[1] and a[1].source == tmp_path / "a.json"


def test_several_files_concatenate_in_order(tmp_path):
    f1 = write_json(tmp_path / "one.json", GOOD[:2])
    f2 = write_jsonl(tmp_path / "two.jsonl", GOOD[2:])
    samples = load_records([f1, str(f2)])
    assert [(s.source.name, s.index, s.id) for s in samples] == [
        ("one.json", 0, "v1"),
        ("one.json", 1, "7"),
        ("two.jsonl", 0, "t1"),
        ("two.jsonl", 1, "vi"),
    ]


def test_jsonl_blank_lines_and_bom(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\ufeff" + json.dumps(GOOD[0]) + "\n\n   \n" + json.dumps(GOOD[2]) + "\n", encoding="utf-8")
    assert [s.id for s in load_records(p)] == ["v1", "t1"]
    assert [s.index for s in load_records(p)] == [0, 1]


def test_missing_placeholder_is_prepended(tmp_path):
    rec = {
        "id": "np",
        "video": "v.mp4",
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "human", "value": "Describe."},
            {"from": "gpt", "value": "x"},
            {"from": "human", "value": "More?"},
            {"from": "gpt", "value": "y"},
        ],
    }
    (s,) = load_records(write_json(tmp_path / "p.json", [rec]))
    assert s.conversations[0] == Turn("human", "<video>\n<image>\n<image>\nDescribe.")
    assert s.conversations[2] == Turn("human", "More?")
    assert s.raw["conversations"][0]["value"] == "Describe."  # raw record untouched
    # Only the missing modality is prepended.
    rec2 = dict(
        rec, conversations=[{"from": "human", "value": "<video> then?"}, {"from": "gpt", "value": "x"}]
    )
    (s2,) = load_records(write_json(tmp_path / "p2.json", [rec2]))
    assert s2.conversations[0].value == "<image>\n<image>\n<video> then?"


def test_leading_system_turn_and_missing_id(tmp_path):
    rec = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    (s,) = load_records(write_jsonl(tmp_path / "sys.jsonl", [rec]))
    assert s.id == "sys.jsonl:0"
    assert s.conversations[0] == Turn("system", "Be brief.")


def _sample(**kw):
    base = {"id": "bad", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    base.update(kw)
    return base


def conv(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


BAD_CASES = {
    "missing_conversations": ({"id": "bad", "video": "a.mp4"}, "conversations", "missing"),
    "empty_conversations": (_sample(conversations=[]), "conversations", "non-empty list"),
    "conversations_not_list": (_sample(conversations="hi"), "conversations", "non-empty list"),
    "turn_not_object": (_sample(conversations=["hi"]), "conversations[0]", "expected an object"),
    "wrong_role": (
        _sample(conversations=conv(("user", "Q"), ("gpt", "A"))),
        "conversations[0].from",
        "'user'",
    ),
    "starts_with_gpt": (
        _sample(conversations=conv(("gpt", "A"), ("human", "Q"))),
        "conversations[0].from",
        "expected 'human'",
    ),
    "two_humans": (
        _sample(conversations=conv(("human", "Q"), ("human", "Q"), ("gpt", "A"))),
        "conversations[1].from",
        "alternate",
    ),
    "system_not_first": (
        _sample(conversations=conv(("human", "Q"), ("system", "S"), ("gpt", "A"))),
        "conversations[1].from",
        "'system'",
    ),
    "ends_with_human": (
        _sample(conversations=conv(("human", "Q"), ("gpt", "A"), ("human", "Q2"))),
        "conversations",
        "last turn",
    ),
    "value_not_string": (
        _sample(conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]),
        "conversations[0].value",
        "must be a string, got int",
    ),
    "value_missing": (
        _sample(conversations=[{"from": "human"}, {"from": "gpt", "value": "A"}]),
        "conversations[0].value",
        "got NoneType",
    ),
    "value_empty": (
        _sample(conversations=conv(("human", "Q"), ("gpt", ""))),
        "conversations[1].value",
        "empty",
    ),
    "image_count_wrong": (
        _sample(image=["a.jpg", "b.jpg"], conversations=conv(("human", "<image>\nQ"), ("gpt", "A"))),
        "conversations",
        "1 <image> placeholder(s) but 2 image(s)",
    ),
    "image_placeholder_without_image": (
        _sample(conversations=conv(("human", "<image>\nQ"), ("gpt", "A"))),
        "conversations",
        "1 <image> placeholder(s) but 0 image(s)",
    ),
    "video_placeholder_without_video": (
        _sample(conversations=conv(("human", "<video>\nQ"), ("gpt", "A"))),
        "conversations",
        "no video is given",
    ),
    "two_video_placeholders": (
        _sample(video="a.mp4", conversations=conv(("human", "<video><video>\nQ"), ("gpt", "A"))),
        "conversations",
        "2 <video> placeholder(s) but the sample has one video",
    ),
    "placeholder_in_answer": (
        _sample(image="a.jpg", conversations=conv(("human", "<image>\nQ"), ("gpt", "<image>"))),
        "conversations[1].value",
        "only appear in human turns",
    ),
    "more_than_one_video": (_sample(video=["a.mp4", "b.mp4"]), "video", "more than one video"),
    "video_not_string": (_sample(video=5), "video", "non-empty string"),
    "image_empty_list": (_sample(image=[]), "image", "non-empty list"),
    "image_item_not_string": (_sample(image=["a.jpg", 3]), "image[1]", "non-empty string"),
}


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_error_names_file_index_id_field(tmp_path, fmt, case):
    record, field, reason = BAD_CASES[case]
    data = [GOOD[2], record]
    path = (write_json if fmt == "json" else write_jsonl)(tmp_path / f"data.{fmt}", data)
    with pytest.raises(RecordError) as info:
        load_records([path])
    err = info.value
    assert (err.file, err.index, err.sample_id, err.field) == (path, 1, "bad", field)
    msg = str(err)
    assert msg.startswith(f"{path}: sample 1 (id 'bad'): field {field!r}: ")
    assert reason in msg


def test_bad_id_type(tmp_path):
    path = write_json(tmp_path / "d.json", [_sample(id=["x"])])
    with pytest.raises(
        RecordError, match=r"sample 0: field 'id': id must be a string or an integer, got list"
    ):
        load_records(path)


def test_sample_not_object(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD[0], "oops"])
    with pytest.raises(
        RecordError, match=r"d.json: sample 1: sample is a JSON str, expected an object"
    ) as info:
        load_records(path)
    assert info.value.index == 1


def test_malformed_json_names_line_and_column(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n')
    with pytest.raises(
        RecordError, match=r"broken.json: malformed JSON at line 3, column 22: Expecting value"
    ):
        load_records(p)
    q = tmp_path / "broken.jsonl"
    q.write_text(json.dumps(GOOD[0]) + "\n" + '{"id": "b", "conversations": [\n')
    with pytest.raises(RecordError, match=r"broken.jsonl: malformed JSON at line 2, column 31"):
        load_records(q)


def test_non_list_top_level(tmp_path):
    p = write_json(tmp_path / "obj.json", {"data": GOOD})  # pretty-printed single object
    with pytest.raises(RecordError, match=r"obj.json: top level is a JSON dict, expected a list"):
        load_records(p)
    n = tmp_path / "num.json"
    n.write_text("42\n")
    with pytest.raises(RecordError, match=r"num.json: top level is a JSON int"):
        load_records(n)
    e = tmp_path / "empty.json"
    e.write_text("  \n")
    with pytest.raises(RecordError, match=r"empty.json: file is empty"):
        load_records(e)
    with pytest.raises(RecordError, match=r"missing.json: cannot read"):
        load_records(tmp_path / "missing.json")


def test_duplicate_ids_warn_or_error(tmp_path):
    f1 = write_json(tmp_path / "a.json", [GOOD[0], GOOD[2]])
    f2 = write_json(tmp_path / "b.json", [GOOD[2]])
    with pytest.warns(
        UserWarning, match=r"1 duplicate sample id\(s\), first: id 't1' at .*a.json:1 and .*b.json:0"
    ):
        samples = load_records([f1, f2])
    assert len(samples) == 3
    with pytest.raises(RecordError) as info:
        load_records([f1, f2], duplicate_ids="error")
    assert (info.value.file, info.value.index, info.value.sample_id, info.value.field) == (f2, 0, "t1", "id")


def test_require_answer_false_accepts_open_question(tmp_path):
    rec = {"id": "q", "conversations": [{"from": "human", "value": "Q?"}]}
    (s,) = load_records(write_json(tmp_path / "q.json", [rec]), require_answer=False)
    assert s.conversations == (Turn("human", "Q?"),)


# -- media paths ---------------------------------------------------------------------------------


@pytest.fixture
def media_tree(tmp_path):
    videos = tmp_path / "videos"
    images = tmp_path / "images"
    outside = tmp_path / "outside"
    for d in (videos / "sub", images, outside):
        d.mkdir(parents=True)
    (outside / "secret.mp4").write_bytes(b"x")
    (videos / "sub" / "a.mp4").write_bytes(b"x")
    os.symlink(outside / "secret.mp4", videos / "link_out.mp4")
    os.symlink(videos / "sub" / "a.mp4", videos / "link_in.mp4")
    return tmp_path


def make_sample(tmp_path: Path, video: str | None = None, images: tuple[str, ...] = ()) -> Sample:
    turns = (Turn("human", "Q"), Turn("gpt", "A"))
    return Sample("s9", video, images, turns, tmp_path / "d.json", 4, {})


def test_resolve_inside_folder(media_tree):
    s = make_sample(media_tree, "sub/a.mp4", ("x.jpg", "d/y.png"))
    video, images = resolve_media(s, media_tree / "videos", str(media_tree / "images"))
    assert video == media_tree / "videos" / "sub" / "a.mp4"
    assert images == [media_tree / "images" / "x.jpg", media_tree / "images" / "d" / "y.png"]
    # A symlink that stays inside the folder is fine; so is a ".." that comes back inside.
    assert resolve_media(make_sample(media_tree, "link_in.mp4"), media_tree / "videos", None)[0] is not None
    assert (
        resolve_media(make_sample(media_tree, "sub/../sub/a.mp4"), media_tree / "videos", None)[0] is not None
    )


@pytest.mark.parametrize(
    ("video", "reason"),
    [
        ("ABS", "absolute path"),
        ("../outside/secret.mp4", "outside the folder"),
        ("sub/../../outside/secret.mp4", "outside the folder"),
        ("link_out.mp4", "outside the folder"),
    ],
)
def test_resolve_refuses_escapes_unless_allowed(media_tree, video, reason):
    if video == "ABS":
        video = str(media_tree / "outside" / "secret.mp4")
    s = make_sample(media_tree, video)
    with pytest.raises(RecordError) as info:
        resolve_media(s, media_tree / "videos", media_tree / "images")
    err = info.value
    assert (err.file, err.index, err.sample_id, err.field) == (media_tree / "d.json", 4, "s9", "video")
    assert reason in str(err)
    allowed, _ = resolve_media(s, media_tree / "videos", media_tree / "images", allow_outside=True)
    assert allowed is not None and allowed.resolve() == (media_tree / "outside" / "secret.mp4").resolve()


def test_resolve_image_escape_names_image_index(media_tree):
    s = make_sample(media_tree, None, ("ok.jpg", "../outside/x.jpg"))
    with pytest.raises(RecordError, match=r"field 'image\[1\]'.*outside the folder"):
        resolve_media(s, None, media_tree / "images")


def test_resolve_without_folder(media_tree):
    with pytest.raises(RecordError, match=r"field 'video': 'a.mp4' is relative but no video folder"):
        resolve_media(make_sample(media_tree, "a.mp4"), None, None)


def test_read_records_collects_every_problem_with_kinds(tmp_path):
    good = write_json(tmp_path / "good.json", [GOOD[0], GOOD[2]])
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            GOOD[1],
            _sample(conversations=conv(("gpt", "A"))),
            _sample(id="p", image="a.jpg", conversations=conv(("human", "<image><image>"), ("gpt", "A"))),
            dict(GOOD[2], id="v1"),
        ],
    )
    samples, errors = read_records([good, broken, mixed], duplicate_ids="error")
    assert [s.id for s in samples] == ["v1", "t1", "7"]
    assert [(e.file.name, e.index, e.sample_id, e.kind) for e in errors] == [
        ("broken.json", None, None, "invalid_file"),
        ("mixed.jsonl", 1, "bad", "invalid_record"),
        ("mixed.jsonl", 2, "p", "placeholder_mismatch"),
        ("mixed.jsonl", 3, "v1", "duplicate_id"),
    ]
    # load_records raises the first of them.
    with pytest.raises(RecordError, match=r"broken\.json: malformed JSON"):
        load_records([good, broken, mixed], duplicate_ids="error")


def test_resolve_error_kind_is_bad_path(media_tree):
    with pytest.raises(RecordError) as info:
        resolve_media(make_sample(media_tree, "../x.mp4"), media_tree / "videos", None)
    assert info.value.kind == "bad_path"
