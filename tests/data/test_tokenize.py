"""Tokenisation by construction: exact ids and labels on LLaMA-style and byte-level tokenizers."""

from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers

from vidlora.data import tokenize
from vidlora.data.records import Sample, Turn
from vidlora.data.templates import get_template
from vidlora.data.tokenize import (
    IGNORE_INDEX,
    MediaTokenCounts,
    TokenizationError,
    special_prefix,
)
from vidlora.model.tokenizer import (
    build_bytelevel_tokenizer,
    build_tiny_tokenizer,
    media_token_ids,
)

X = IGNORE_INDEX
COUNTS = MediaTokenCounts(image=2, video=3)


# These tests pin segment-wise ids against whole-prompt tokenization (`expand_whole_prompt`), so
# they run the whole-prompt convention unless a test names another; the split-at-media convention
# is pinned against the original's own algorithm in test_original_ids.py.
def tokenize_sample(*args, tokenization: str = "whole_prompt", **kwargs):
    return tokenize.tokenize_sample(*args, tokenization=tokenization, **kwargs)


def tokenize_prompt(*args, tokenization: str = "whole_prompt", **kwargs):
    return tokenize.tokenize_prompt(*args, tokenization=tokenization, **kwargs)


@pytest.fixture(scope="module")
def toks():
    legacy = build_tiny_tokenizer()
    # transformers' LlamaTokenizer with legacy=True: "▁" prepended after every special token too.
    legacy.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=False
    )
    return {"llama": build_tiny_tokenizer(), "byte": build_bytelevel_tokenizer(), "llama_legacy": legacy}


# fmt: off
# The v1 system prompt ("A chat between a curious user ... the user's questions."), tokenised.
SYSTEM_IDS = {
    "llama": [1, 411, 564, 634, 361, 629, 464, 415, 376, 628, 636, 503, 380, 441, 604, 616, 627, 415, 591, 614, 422, 360, 789, 608],
    "byte": [35, 464, 524, 265, 519, 365, 317, 281, 518, 527, 343, 16, 293, 343, 497, 410, 14, 517, 14, 317, 484, 505, 324, 266, 365, 412, 501, 16],
}
# fmt: on

VIDEO_1 = [Turn("human", "<video>\nWhat color is the circle?"), Turn("gpt", "red")]
IMAGE_2 = [
    Turn("human", "<image>\nWhat shape is it?"),
    Turn("gpt", "A square."),
    Turn("human", "How many?"),
    Turn("gpt", "two"),
]
VIDEO_IMAGES = [
    Turn("human", "<video>\n<image>\n<image>\nWhich direction is it moving?"),
    Turn("gpt", "left"),
]
TEXT = [Turn("human", "What is the man doing?"), Turn("gpt", "He is juggling.")]

# (ids after the system prompt, labels after the system prompt, tokens after the system prompt).
# LLaMA-style ids: <image>=882, <video>=883, </s>=2. Byte-level: <image>=746, <video>=747, </s>=2.
# fmt: off
EXPECTED = {
    ("llama", "video_1"): (
        [840, 353, 883, 883, 883, 13, 313, 377, 465, 362, 360, 745, 848, 813, 2],
        [*[X] * 13, 813, 2],
        ["▁USER:", "▁", "<video>", "<video>", "<video>", "<0x0A>", "W", "hat", "▁color", "▁is", "▁the", "▁circle?", "▁ASSISTANT:", "▁red", "</s>"],
    ),
    ("llama", "image_2"): (
        [840, 353, 882, 882, 13, 313, 377, 469, 362, 707, 289, 848, 411, 400, 272, 2, 311, 522, 284, 500, 505, 289, 848, 559, 2],
        [*[X] * 12, 411, 400, 272, 2, *[X] * 7, 559, 2],
        ["▁USER:", "▁", "<image>", "<image>", "<0x0A>", "W", "hat", "▁shape", "▁is", "▁it", "?", "▁ASSISTANT:", "▁A", "▁square", ".", "</s>", "U", "SER", ":", "▁How", "▁many", "?", "▁ASSISTANT:", "▁two", "</s>"],
    ),
    ("llama", "video_images"): (
        [840, 353, 883, 883, 883, 13, 882, 882, 13, 882, 882, 13, 313, 391, 472, 633, 362, 707, 462, 848, 625, 2],
        [*[X] * 20, 625, 2],
        ["▁USER:", "▁", "<video>", "<video>", "<video>", "<0x0A>", "<image>", "<image>", "<0x0A>", "<image>", "<image>", "<0x0A>", "W", "hi", "ch", "▁direction", "▁is", "▁it", "▁moving?", "▁ASSISTANT:", "▁left", "</s>"],
    ),
    ("llama", "text"): (
        [840, 402, 362, 360, 460, 879, 848, 771, 362, 859, 2],
        [*[X] * 7, 771, 362, 859, 2],
        ["▁USER:", "▁What", "▁is", "▁the", "▁man", "▁doing?", "▁ASSISTANT:", "▁He", "▁is", "▁juggling.", "</s>"],
    ),
    ("byte", "video_1"): (
        [595, 28, 223, 747, 747, 747, 201, 300, 366, 267, 266, 298, 33, 525, 28, 596, 2],
        [*[X] * 15, 596, 2],
        ["ĠUSER", ":", "Ġ", "<video>", "<video>", "<video>", "Ċ", "What", "Ġcolor", "Ġis", "Ġthe", "Ġcircle", "?", "ĠASSISTANT", ":", "Ġred", "</s>"],
    ),
    ("byte", "image_2"): (
        [595, 28, 223, 746, 746, 201, 300, 370, 267, 612, 33, 525, 28, 354, 304, 16, 2, 425, 28, 495, 406, 33, 525, 28, 457, 2],
        [*[X] * 13, 354, 304, 16, 2, *[X] * 7, 457, 2],
        ["ĠUSER", ":", "Ġ", "<image>", "<image>", "Ċ", "What", "Ġshape", "Ġis", "Ġit", "?", "ĠASSISTANT", ":", "ĠA", "Ġsquare", ".", "</s>", "USER", ":", "ĠHow", "Ġmany", "?", "ĠASSISTANT", ":", "Ġtwo", "</s>"],
    ),
    ("byte", "video_images"): (
        [595, 28, 223, 747, 747, 747, 201, 746, 746, 201, 746, 746, 201, 426, 373, 523, 267, 612, 306, 33, 525, 28, 597, 2],
        [*[X] * 22, 597, 2],
        ["ĠUSER", ":", "Ġ", "<video>", "<video>", "<video>", "Ċ", "<image>", "<image>", "Ċ", "<image>", "<image>", "Ċ", "Whi", "ch", "Ġdirection", "Ġis", "Ġit", "Ġmoving", "?", "ĠASSISTANT", ":", "Ġleft", "</s>"],
    ),
    ("byte", "text"): (
        [595, 28, 336, 267, 266, 363, 658, 33, 525, 28, 671, 267, 727, 16, 2],
        [*[X] * 10, 671, 267, 727, 16, 2],
        ["ĠUSER", ":", "ĠWhat", "Ġis", "Ġthe", "Ġman", "Ġdoing", "?", "ĠASSISTANT", ":", "ĠHe", "Ġis", "Ġjuggling", ".", "</s>"],
    ),
}
# fmt: on
CONVS = {"video_1": VIDEO_1, "image_2": IMAGE_2, "video_images": VIDEO_IMAGES, "text": TEXT}


def expand_whole_prompt(tok, text: str, counts: MediaTokenCounts) -> list[int]:
    """Independent reference: tokenise the full prompt in one call, then repeat media ids."""
    ids = media_token_ids(tok)
    reps = {ids.image: counts.image, ids.video: counts.video}
    out: list[int] = []
    for i in tok(text).input_ids:
        out.extend([i] * reps.get(i, 1))
    return out


@pytest.mark.parametrize("which", ["llama", "byte"])
@pytest.mark.parametrize("case", sorted(CONVS))
def test_v1_exact_ids_and_labels(toks, which, case):
    tok = toks[which]
    exp_ids, exp_labels, exp_tokens = EXPECTED[(which, case)]
    out = tokenize_sample(CONVS[case], tok, "v1", COUNTS)
    sys_ids = SYSTEM_IDS[which]
    assert out.input_ids == sys_ids + exp_ids
    assert out.labels == [X] * len(sys_ids) + exp_labels
    assert tok.convert_ids_to_tokens(exp_ids) == exp_tokens
    # Same ids as tokenising the whole prompt at once (exact for v1 on both tokenizers).
    prompt = get_template("v1").render_prompt(CONVS[case], add_generation_prompt=False)
    assert out.input_ids == expand_whole_prompt(tok, prompt, COUNTS)
    # Placeholder expansion counts and bookkeeping.
    media = media_token_ids(tok)
    n_video = sum(t.value.count("<video>") for t in CONVS[case])
    n_image = sum(t.value.count("<image>") for t in CONVS[case])
    assert out.input_ids.count(media.video) == 3 * n_video
    assert out.input_ids.count(media.image) == 2 * n_image
    assert out.num_text_tokens == len(out.input_ids) - 3 * n_video - 2 * n_image
    assert out.num_trained == sum(1 for v in exp_labels if v != X)


def test_v1_system_prompt_ids_pinned(toks):
    sys = get_template("v1").system
    assert toks["llama"](sys).input_ids == SYSTEM_IDS["llama"]
    assert toks["byte"](sys).input_ids == SYSTEM_IDS["byte"]
    assert special_prefix(toks["llama"]) == [1]
    assert special_prefix(toks["byte"]) == []


def test_bytelevel_with_bos_prefix_once():
    tok = build_bytelevel_tokenizer(add_bos=True)
    out = tokenize_sample(IMAGE_2, tok, "v1", COUNTS)
    plain = tokenize_sample(IMAGE_2, build_bytelevel_tokenizer(), "v1", COUNTS)
    assert out.input_ids == [1, *plain.input_ids]
    assert out.labels == [X, *plain.labels]
    assert out.input_ids.count(1) == 1


MEDIA_CONVS = [
    [Turn("human", "<video>\nWhat color is the circle?"), Turn("gpt", "It is red.")],
    [
        Turn("human", "<image>\nWhat shape?"),
        Turn("gpt", "A square."),
        Turn("human", "And <image> this one?"),
        Turn("gpt", "circle"),
    ],
    [
        Turn("human", "Hi"),
        Turn("gpt", "Hello"),
        Turn("human", "How many?"),
        Turn("gpt", "Two."),
        Turn("human", "Which way?"),
        Turn("gpt", "left"),
    ],
]


@pytest.mark.parametrize("which", ["llama", "byte", "llama_legacy"])
@pytest.mark.parametrize("name", ["v1", "llava_v1", "v0", "llama_2", "llava_llama_2", "plain"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_template_equals_whole_prompt_tokenisation(toks, which, name, k):
    tok = toks[which]
    turns = MEDIA_CONVS[k]
    if name == "plain":
        turns = turns[:2]
    t = get_template(name)
    out = tokenize_sample(turns, tok, t, COUNTS)
    segs = t.segments(turns)
    assert out.input_ids == expand_whole_prompt(tok, "".join(s.text for s in segs), COUNTS)
    # Independent labels: a whole-prompt token is trained iff its character span lies inside a
    # trained segment (a token straddling a boundary would fail here).
    text = "".join(s.text for s in segs)
    enc = tok(text, return_offsets_mapping=True)
    spans, pos = [], 0
    for seg in segs:
        if seg.trained:
            spans.append((pos, pos + len(seg.text)))
        pos += len(seg.text)
    media = media_token_ids(tok)
    reps = {media.image: COUNTS.image, media.video: COUNTS.video}
    ref_labels: list[int] = []
    for tok_id, (start, end) in zip(enc.input_ids, enc.offset_mapping, strict=True):
        inside = end > start and any(a <= start and end <= b for a, b in spans)
        straddles = end > start and any(start < a < end or start < b < end for a, b in spans)
        assert not straddles, (name, tok.convert_ids_to_tokens([tok_id]))
        ref_labels.extend([X] * reps[tok_id] if tok_id in reps else [tok_id if inside else X])
    assert out.labels == ref_labels
    assert out.num_trained == sum(1 for v in ref_labels if v != X) > 0


def original_v1_masking(tok, conversation: str) -> tuple[list[int], int, int]:
    """Transcription of the original preprocess_v1 masking (text-only branch)."""
    ids = tok(conversation).input_ids
    target = list(ids)
    target[0] = X
    sep = " ASSISTANT: "
    cur_len = 1
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tok(rou).input_ids)
        instruction_len = len(tok(parts[0]).input_ids) - 2
        for i in range(cur_len, min(cur_len + instruction_len, len(target))):
            target[i] = X
        cur_len += round_len
    for i in range(cur_len, len(target)):
        target[i] = X
    return target, cur_len, len(ids)


def test_original_masking_breaks_on_multiturn_ours_does_not(toks):
    tok = toks["llama"]
    t = get_template("v1")
    # Single turn: the original's prefix arithmetic happens to agree with construction.
    single = t.render_prompt(TEXT, add_generation_prompt=False)
    target, cur, total = original_v1_masking(tok, single)
    assert (cur, total) == (35, 35)
    assert target == tokenize_sample(TEXT, tok, t, COUNTS).labels
    # Two turns: "USER:" after "</s>" is 'U','SER',':' in context but '▁USER:' alone, so the
    # original's count drifts (42 vs 44) and it would mask the whole sample ("tokenization mismatch").
    multi = [Turn("human", "What shape is it?"), Turn("gpt", "A square."), Turn("human", "How many?")]
    multi.append(Turn("gpt", "two"))
    _, cur, total = original_v1_masking(tok, t.render_prompt(multi, add_generation_prompt=False))
    assert (cur, total) == (42, 44)
    ours = tokenize_sample(multi, tok, t, COUNTS)
    trained = [i for i, lab in zip(ours.input_ids, ours.labels, strict=True) if lab != X]
    assert tok.convert_ids_to_tokens(trained) == ["▁A", "▁square", ".", "</s>", "▁two", "</s>"]


# -- media counts ------------------------------------------------------------------------------


def test_media_token_counts_of_the_7b_model_come_from_its_towers_once():
    from vidlora.data.processor import Processor
    from vidlora.model.presets import build_config

    # 224 px / patch 14 = 16 x 16 = 256 patches per image (CLS dropped); 8 frames x (256 + 1) per video.
    processor = Processor.for_model(build_config("videollava-7b"))
    assert processor.counts == MediaTokenCounts(image=256, video=2056) and processor.num_frames == 8
    image_only = Processor.for_model(build_config("videollava-7b", video_config=None))
    assert image_only.counts == MediaTokenCounts(image=256, video=0) and image_only.num_frames is None


def test_7b_counts_expand_exactly(toks):
    tok = toks["llama"]
    counts = MediaTokenCounts(image=256, video=2056)
    out = tokenize_sample(VIDEO_IMAGES, tok, "v1", counts)
    media = media_token_ids(tok)
    assert out.input_ids.count(media.video) == 2056
    assert out.input_ids.count(media.image) == 2 * 256
    assert len(out) == len(SYSTEM_IDS["llama"]) + 22 - 3 - 4 + 2056 + 512
    # Runs are contiguous: video run first, then two image runs separated by "\n".
    start = out.input_ids.index(media.video)
    assert out.input_ids[start : start + 2056] == [media.video] * 2056
    assert out.input_ids[start + 2056] == 13
    assert all(
        lab == X for i, lab in zip(out.input_ids, out.labels, strict=True) if i in (media.video, media.image)
    )


# -- truncation -----------------------------------------------------------------------------------


def test_model_max_length_cuts_text_and_keeps_media_whole(toks):
    tok = toks["llama"]
    full = tokenize_sample(IMAGE_2, tok, "v1", COUNTS)
    n_sys = len(SYSTEM_IDS["llama"])
    # Expanded: sys(24) + 16 of round 1 + 9 of round 2 = 49; text level (placeholder once): 48.
    assert len(full) == n_sys + 25 == 49
    # Cut 3 text tokens into round 2 ('U','SER',':' kept): placeholder counted once.
    limit = n_sys + 15 + 3
    out = tokenize_sample(IMAGE_2, tok, "v1", COUNTS, model_max_length=limit)
    assert len(out) == limit - 1 + COUNTS.image
    assert out.input_ids == full.input_ids[: len(out)]
    assert out.labels == full.labels[: len(out)]
    assert out.input_ids.count(882) == 2
    assert out.num_trained == 4  # '▁A', '▁square', '.', '</s>' of round 1 only
    # The cut can also land inside an answer: that answer is partly trained ('▁A', '▁square', '.').
    out2 = tokenize_sample(IMAGE_2, tok, "v1", COUNTS, model_max_length=n_sys + 14)
    assert out2.num_trained == 3 and out2.labels[-3:] == [411, 400, 272]


def test_model_max_length_dropping_a_placeholder_raises(toks):
    tok = toks["llama"]
    turns = [Turn("human", "What shape is it?"), Turn("gpt", "A square."), Turn("human", "And <image>?")]
    turns.append(Turn("gpt", "circle"))
    with pytest.raises(
        TokenizationError, match=r"sample 's1': model_max_length=40 would cut 1 media placeholder"
    ):
        tokenize_sample(turns, tok, "v1", COUNTS, model_max_length=40, sample_id="s1")


def test_tokenizer_model_max_length(toks):
    tok = toks["llama"]
    full = tokenize_sample(IMAGE_2, tok, "v1", COUNTS)
    n_sys = len(SYSTEM_IDS["llama"])
    # Enforced exactly when the cut is in text after the media.
    out = tokenize_sample(IMAGE_2, tok, "v1", COUNTS, tokenizer_model_max_length=n_sys + 20)
    assert len(out) == n_sys + 20
    assert out.input_ids == full.input_ids[: n_sys + 20] and out.labels == full.labels[: n_sys + 20]
    # A cut inside the <image> run (positions n_sys+2, n_sys+3) raises, naming sizes.
    with pytest.raises(
        TokenizationError,
        match=r"tokenizer_model_max_length=27 would cut 1 media token\(s\) from an expanded sequence of 49",
    ):
        tokenize_sample(IMAGE_2, tok, "v1", COUNTS, tokenizer_model_max_length=n_sys + 3, sample_id="x")
    # Both bounds together: text bound first, then the expanded bound.
    both = tokenize_sample(
        IMAGE_2, tok, "v1", COUNTS, model_max_length=n_sys + 20, tokenizer_model_max_length=n_sys + 19
    )
    assert both.input_ids == full.input_ids[: n_sys + 19]


def test_zero_trained_after_truncation_raises(toks):
    tok = toks["byte"]
    with pytest.raises(
        TokenizationError, match=r"sample 'z': no trained tokens left \(sequence of 30 tokens"
    ):
        tokenize_sample(TEXT, tok, "v1", COUNTS, model_max_length=30, sample_id="z")
    with pytest.raises(TokenizationError, match="no trained tokens left"):
        tokenize_sample(TEXT, tok, "v1", COUNTS, tokenizer_model_max_length=len(SYSTEM_IDS["byte"]) + 10)
    # One more token reaches the first answer token and succeeds.
    ok = tokenize_sample(TEXT, tok, "v1", COUNTS, tokenizer_model_max_length=len(SYSTEM_IDS["byte"]) + 11)
    assert ok.num_trained == 1


# -- samples, errors, modality length ------------------------------------------------------------


def make_sample(video, images, turns) -> Sample:
    return Sample("s7", video, tuple(images), tuple(turns), None, 0, {})  # type: ignore[arg-type]


def test_sample_input_uses_its_id_and_checks_media(toks):
    tok = toks["llama"]
    good = make_sample("v.mp4", ["a.jpg", "b.jpg"], VIDEO_IMAGES)
    assert (
        tokenize_sample(good, tok, "v1", COUNTS).input_ids
        == tokenize_sample(VIDEO_IMAGES, tok, "v1", COUNTS).input_ids
    )
    bad = make_sample("v.mp4", ["a.jpg"], VIDEO_IMAGES)
    with pytest.raises(
        TokenizationError, match=r"sample 's7': template 'vicuna_v1' renders 1 <video> and 2 <image>"
    ):
        tokenize_sample(bad, tok, "v1", COUNTS)
    wrong_order = make_sample(None, [], [Turn("gpt", "x"), Turn("human", "y")])
    with pytest.raises(TokenizationError, match=r"sample 's7': template 'vicuna_v1': turn 0 has role 'gpt'"):
        tokenize_sample(wrong_order, tok, "v1", COUNTS)


def test_requires_media_tokens():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    with pytest.raises(ValueError, match="add_media_tokens"):
        tokenize_sample(TEXT, bare, "v1", COUNTS)


def test_refuses_space_stripping_media_tokens():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1, "Ġ": 2}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(
        [AddedToken("<image>", rstrip=True), AddedToken("<video>"), AddedToken("<pad>")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    with pytest.raises(ValueError, match="'<image>' strips neighbouring spaces"):
        tokenize_sample([Turn("human", "<image> a"), Turn("gpt", "a")], tok, "plain", COUNTS)


# -- inference prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "byte", "llama_legacy"])
@pytest.mark.parametrize("name", ["v1", "llava_v1", "v0", "llama_2", "plain"])
def test_tokenize_prompt_equals_whole_prompt_and_training_prefix(toks, which, name):
    tok = toks[which]
    t = get_template(name)
    question = Turn("human", "<video>\nWhat color is the circle?")
    ids = tokenize_prompt([question], tok, name, COUNTS)
    assert ids == expand_whole_prompt(tok, t.render_prompt([question]), COUNTS)
    # The inference prompt is exactly the untrained prefix training saw before the answer.
    train = tokenize_sample([question, Turn("gpt", "red")], tok, name, COUNTS)
    first_trained = next(i for i, lab in enumerate(train.labels) if lab != X)
    assert ids == train.input_ids[:first_trained]


def test_tokenize_prompt_v1_exact(toks):
    tok = toks["llama"]
    ids = tokenize_prompt(VIDEO_1[:1], tok, "v1", COUNTS)
    assert ids == SYSTEM_IDS["llama"] + [840, 353, 883, 883, 883, 13, 313, 377, 465, 362, 360, 745, 848]
    # Multi-turn history, then a new question.
    ids2 = tokenize_prompt([*IMAGE_2[:3]], tok, "v1", COUNTS)
    assert ids2 == SYSTEM_IDS["llama"] + EXPECTED[("llama", "image_2")][0][:-2]
    with pytest.raises(TokenizationError, match="turn 0 has role 'gpt'"):
        tokenize_prompt([Turn("gpt", "x")], tok, "v1", COUNTS)


def test_boundary_inside_a_token_keeps_segments_apart(toks):
    # A contrived template whose answer terminator is empty and whose user role is "d": the
    # first answer's "...re" and the next round's "d:" would merge into "▁red" in whole-prompt
    # tokenisation. Construction keeps the boundary: the answer's tokens stay the answer's.
    from vidlora.data.templates import SeparatorStyle, Template

    tok = toks["llama"]
    t = Template("contrived", "", ("d", "ASSISTANT"), SeparatorStyle.TWO, " ", "")
    turns = [Turn("human", "Q"), Turn("gpt", "The circle is re"), Turn("human", "Q"), Turn("gpt", "red")]
    prompt = "".join(s.text for s in t.segments(turns))
    assert prompt == " d: Q ASSISTANT: The circle is red: Q ASSISTANT: red"
    whole = tok(prompt).input_ids
    assert "▁red" in tok.convert_ids_to_tokens(whole[:10])  # merged across the boundary
    out = tokenize_sample(turns, tok, t, COUNTS)
    assert out.input_ids != whole
    trained = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != X]
    assert tok.convert_ids_to_tokens(trained) == ["▁The", "▁circle", "▁is", "▁re", "▁red"]
