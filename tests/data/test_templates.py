"""Templates: segments concatenate to the original's get_prompt(); trained parts are the answers."""

from __future__ import annotations

import dataclasses

import pytest

from vidlora.data.records import Turn
from vidlora.data.templates import (
    TEMPLATES,
    SeparatorStyle,
    Template,
    TemplateError,
    get_template,
    template_names,
)

# -- an independent transcription of the original's Conversation.get_prompt -------------------
# (PKU-YuanGroup/Video-LLaVA videollava/conversation.py; messages are [role, text-or-None])


def original_get_prompt(t: Template, messages: list[tuple[str, str | None]]) -> str:
    if t.style is SeparatorStyle.SINGLE:
        ret = t.system + t.sep
        for role, message in messages:
            ret += role + ": " + message + t.sep if message else role + ":"
        return ret
    if t.style is SeparatorStyle.TWO:
        seps = [t.sep, t.sep2]
        ret = t.system + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        return ret
    if t.style is SeparatorStyle.LLAMA_2:
        ret = ""
        for i, (_role, message) in enumerate(messages):
            if message:
                if i == 0:
                    message = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" + message
                if i % 2 == 0:
                    ret += t.sep + f"[INST] {message} [/INST]"
                else:
                    ret += " " + message + " " + t.sep2
        return ret.lstrip(t.sep)
    raise AssertionError(t.style)


def original_plain(question: str, answer: str) -> str:
    # preprocess_plain: the human value is replaced by the image token; caption + sep.
    assert "<image>" in question
    return "<image>" + answer + "\n"


QA = [
    ("<video>\nWhat color is the circle?", "It is red."),
    ("And the square?", "Blue."),
    ("How many <image> shapes?", "Two"),
]


def turns_for(n: int) -> list[Turn]:
    out: list[Turn] = []
    for q, a in QA[:n]:
        out += [Turn("human", q), Turn("gpt", a)]
    return out


def messages_for(t: Template, n: int, generation_question: str | None = None) -> list[tuple[str, str | None]]:
    msgs: list[tuple[str, str | None]] = []
    for q, a in QA[:n]:
        msgs += [(t.roles[0], q), (t.roles[1], a)]
    if generation_question is not None:
        msgs += [(t.roles[0], generation_question), (t.roles[1], None)]
    return msgs


@pytest.mark.parametrize(
    "name", ["v1", "vicuna_v1", "llava_v1", "v0", "llava_v0", "llama_2", "llava_llama_2"]
)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_segments_concatenate_to_original_prompt(name, n):
    t = get_template(name)
    segs = t.segments(turns_for(n))
    assert "".join(s.text for s in segs) == original_get_prompt(t, messages_for(t, n))
    # Segments alternate untrained/trained, starting untrained, ending trained: n rounds -> 2n.
    assert [s.trained for s in segs] == [False, True] * n
    term = t.sep2 if t.style is not SeparatorStyle.SINGLE else t.sep
    expected_trained = [
        (f" {a} {term}" if t.style is SeparatorStyle.LLAMA_2 else f" {a}{term}") for _, a in QA[:n]
    ]
    assert [s.text for s in segs if s.trained] == expected_trained


@pytest.mark.parametrize("name", ["v1", "llava_v1", "v0", "llama_2"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_generation_prompt_matches_original(name, n):
    t = get_template(name)
    turns = [*turns_for(n), Turn("human", "What shape is moving?")]
    expected = original_get_prompt(t, messages_for(t, n, "What shape is moving?"))
    assert t.render_prompt(turns) == expected


def test_v1_exact_strings():
    t = get_template("v1")
    sys = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    segs = t.segments(
        [Turn("human", "<image>\nQ1"), Turn("gpt", "A1"), Turn("human", "Q2"), Turn("gpt", "A2")]
    )
    assert [tuple(s) for s in segs] == [
        (sys + " USER: <image>\nQ1 ASSISTANT:", False),
        (" A1</s>", True),
        ("USER: Q2 ASSISTANT:", False),
        (" A2</s>", True),
    ]
    gen = t.render_prompt([Turn("human", "<image>\nQ1"), Turn("gpt", "A1"), Turn("human", "Q2")])
    assert gen == sys + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    # Without the generation header the prompt ends like get_prompt() without the empty message.
    assert t.render_prompt([Turn("human", "Q")], add_generation_prompt=False) == sys + " USER: Q "


def test_llava_v1_and_v0_and_llama2_exact_strings():
    q, a = [Turn("human", "<image>\nQ1"), Turn("gpt", "A1")]
    human_sys = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    assert (
        get_template("llava_v1").render_prompt([q, a]) == human_sys + " USER: <image>\nQ1 ASSISTANT: A1</s>"
    )
    assert get_template("v0").render_prompt([q, a, Turn("human", "Q2")]) == (
        human_sys + "###Human: <image>\nQ1###Assistant: A1###Human: Q2###Assistant:"
    )
    llava_l2 = get_template("llava_llama_2")
    assert llava_l2.render_prompt([q, a, Turn("human", "Q2")]) == (
        "[INST] <<SYS>>\n" + llava_l2.system + "\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    )
    assert llava_l2.system.startswith("You are a helpful language and vision assistant.")
    assert get_template("llama_2").system.startswith("You are a helpful, respectful and honest assistant.")


@pytest.mark.parametrize("question", ["<image>\nDescribe.", "Describe <image> please", "<video><image>"])
def test_plain_matches_preprocess_plain(question):
    t = get_template("plain")
    segs = t.segments([Turn("human", question), Turn("gpt", "a red circle")])
    placeholders = "".join(p for p in ("<video>", "<image>") for _ in range(question.count(p)))
    assert [tuple(s) for s in segs] == [(placeholders, False), ("a red circle\n", True)]
    if question.count("<image>") == 1 and "<video>" not in question:
        assert "".join(s.text for s in segs) == original_plain(question, "a red circle")
    with pytest.raises(TemplateError, match="exactly one"):
        t.segments(turns_for(2))


def test_system_turn_overrides_system_prompt():
    t = get_template("v1")
    segs = t.segments([Turn("system", "Be brief."), Turn("human", "Q"), Turn("gpt", "A")])
    assert "".join(s.text for s in segs) == "Be brief. USER: Q ASSISTANT: A</s>"


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        ([Turn("gpt", "A"), Turn("human", "Q")], "turn 0 has role 'gpt'"),
        ([Turn("human", "Q"), Turn("human", "Q")], "turn 1 has role 'human'"),
        ([Turn("human", "Q")], "must end with a 'gpt' turn"),
        ([Turn("human", "Q"), Turn("gpt", "")], "turn 1 \\(gpt\\) must be a non-empty string"),
        ([Turn("system", "S")], "no human/gpt turns"),
        ([Turn("human", "Q"), Turn("user", "A")], "turn 1 has role 'user'"),
    ],
)
def test_bad_conversations_raise(turns, match):
    with pytest.raises(TemplateError, match=match):
        get_template("v1").segments(turns)


def test_registry_names_and_immutability():
    assert template_names() == sorted(
        ["v1", "vicuna_v1", "llava_v1", "v0", "llava_v0", "plain", "v0_plain", "llama_2", "llava_llama_2"]
    )
    assert get_template("v1") is get_template("vicuna_v1")
    assert get_template("v0") is get_template("llava_v0")
    with pytest.raises(TemplateError, match="unknown template 'vicuna'; known: llama_2, llava_llama_2"):
        get_template("vicuna")
    with pytest.raises(TypeError):
        TEMPLATES["mine"] = get_template("v1")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_template("v1").system = "changed"  # type: ignore[misc]


def test_stop_strings():
    assert get_template("v1").stop_str == "</s>"
    assert get_template("v0").stop_str == "###"
    assert get_template("llama_2").stop_str == "</s>"
    assert get_template("plain").stop_str == "\n"
