"""Prompt templates as immutable values that render a conversation into (text, trained) segments.

The strings follow PKU-YuanGroup/Video-LLaVA ``videollava/conversation.py``: concatenating the
segment texts gives exactly ``Conversation.get_prompt()`` for the same messages. What is trained
is decided here, by construction, instead of being recovered afterwards by re-tokenising prefixes
(the original's ``preprocess_v1`` masking, which breaks when a tokenizer treats a leading space
differently): each assistant answer together with its terminator (``</s>`` for v1/llava_v1,
``###`` for v0, `` </s>`` for llama_2, ``\\n`` for plain) is a trained segment, everything else
(system prompt, role names, user turns, media placeholders) is untrained.

Where the split falls: the space between the assistant role and the answer belongs to the answer
(``"... ASSISTANT:"`` | ``" answer</s>"``), because both LLaMA's SentencePiece (``"▁answer"``) and
byte-level BPE (``"Ġanswer"``) attach a word's leading space to the word; splitting after the
space would leave a lone space token that whole-prompt tokenisation never produces.

Registry (names as in the original's ``conv_templates``, with two documented differences):
``v1`` = ``vicuna_v1`` (training's ``--version v1``), ``llava_v1`` (the original's inference),
``v0`` = ``llava_v0`` (the original maps ``v0`` to ``conv_vicuna_v0``, which carries two canned
example messages and trains through a different ``### Human:``/newline formatter; we use the
plain ``conv_llava_v0`` for both names), ``plain`` = ``v0_plain``, ``llama_2`` (generic Llama-2
system prompt, as the original) and ``llava_llama_2`` (the vision-assistant system prompt).

``plain`` follows the original's ``preprocess_plain`` rather than ``get_prompt`` (which fails for
PLAIN with an assistant message): the user turn is reduced to its media placeholders and the
answer plus ``"\\n"`` is trained; it accepts exactly one user/assistant pair, as the original.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import NamedTuple, Protocol

from vidlora.errors import VidloraError

#: Media placeholders that may appear in user turns (kept as text; expanded at tokenisation).
PLACEHOLDER_PATTERN = re.compile(r"<image>|<video>")


class TemplateError(VidloraError, ValueError):
    """A conversation cannot be rendered with a template (bad roles, order, empty text)."""


class SeparatorStyle(Enum):
    """How a template joins turns (the original's ``SeparatorStyle``; MPT is not supported)."""

    SINGLE = "single"
    TWO = "two"
    LLAMA_2 = "llama_2"
    PLAIN = "plain"


class Message(Protocol):
    """Anything with a ``role`` ("system" | "human" | "gpt") and a string ``value``."""

    @property
    def role(self) -> str: ...

    @property
    def value(self) -> str: ...


class Segment(NamedTuple):
    """A piece of the rendered prompt and whether its tokens are trained (get labels)."""

    text: str
    trained: bool


@dataclass(frozen=True)
class Template:
    """A chat template: fixed strings plus the separator style that joins turns.

    Attributes:
        name: canonical name (aliases live in the registry).
        system: default system prompt; a leading ``system`` message overrides it.
        roles: display names of the user and the assistant.
        style: how turns are joined.
        sep: separator after user turns (TWO), after every turn (SINGLE), before ``[INST]``
            (LLAMA_2) or after the answer (PLAIN).
        sep2: separator after assistant turns (TWO, LLAMA_2); ``None`` otherwise.
        version: the original's ``version`` string, informational.
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: SeparatorStyle
    sep: str
    sep2: str | None = None
    version: str = ""

    @property
    def stop_str(self) -> str:
        """The string that ends an assistant answer (a stop criterion for generation)."""
        if self.style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2):
            assert self.sep2 is not None
            return self.sep2
        return self.sep

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        """Render a training conversation (ending with an assistant turn) into segments.

        Args:
            messages: optional leading ``system`` message, then alternating ``human``/``gpt``
                turns starting with ``human`` and ending with ``gpt``.

        Returns:
            Segments in order; ``"".join(s.text for s in segments)`` equals the original's
            ``get_prompt()``. Adjacent segments always differ in ``trained``.

        Raises:
            TemplateError: wrong roles/order, empty values, or a conversation ending with a user
                turn (use :meth:`render_prompt` for that).
        """
        system, turns = self._split(messages)
        if len(turns) % 2:
            raise TemplateError("a training conversation must end with a 'gpt' turn")
        return self._render(system, turns, generation=False)

    def prompt_segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[Segment]:
        """Render a conversation for inference into segments (like :meth:`segments`).

        Args:
            messages: as for :meth:`segments`, but may end with a ``human`` turn.
            add_generation_prompt: append the assistant's header (``"ASSISTANT:"`` for v1) after a
                final user turn, exactly as the original's ``append_message(roles[1], None)``.

        Returns:
            Segments whose texts concatenate to the original's ``get_prompt()``.
        """
        system, turns = self._split(messages)
        generation = add_generation_prompt and len(turns) % 2 == 1
        return self._render(system, turns, generation=generation)

    def render_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation as one string (placeholders not expanded); see :meth:`prompt_segments`."""
        return "".join(s.text for s in self.prompt_segments(messages, add_generation_prompt))

    # -- internals -------------------------------------------------------------------------

    def _split(self, messages: Sequence[Message]) -> tuple[str, list[tuple[str, str]]]:
        """Validate roles/order and return (system prompt, [(role, value), ...])."""
        system = self.system
        items = [(m.role, m.value) for m in messages]
        if items and items[0][0] == "system":
            system = items[0][1]
            if not isinstance(system, str):
                raise TemplateError("the system message must be a string")
            items = items[1:]
        if not items:
            raise TemplateError("the conversation has no human/gpt turns")
        for i, (role, value) in enumerate(items):
            expected = "human" if i % 2 == 0 else "gpt"
            if role != expected:
                raise TemplateError(
                    f"turn {i} has role {role!r}, expected {expected!r} (turns alternate human/gpt from human)"
                )
            if not isinstance(value, str) or not value:
                raise TemplateError(f"turn {i} ({role}) must be a non-empty string")
        if self.style is SeparatorStyle.PLAIN and len(items) > 2:
            raise TemplateError("the 'plain' template takes exactly one human/gpt pair (as the original)")
        return system, items

    def _render(self, system: str, turns: list[tuple[str, str]], generation: bool) -> list[Segment]:
        """Produce merged segments; ``generation`` appends the assistant header after a user turn."""
        user, assistant = self.roles
        out: list[Segment] = []

        def add(text: str, trained: bool) -> None:
            if not text:
                return
            if out and out[-1].trained == trained:
                out[-1] = Segment(out[-1].text + text, trained)
            else:
                out.append(Segment(text, trained))

        style = self.style
        for k in range(0, len(turns), 2):
            question = turns[k][1]
            answer = turns[k + 1][1] if k + 1 < len(turns) else None
            header = answer is not None or generation
            if style is SeparatorStyle.TWO:
                add((system + self.sep if k == 0 else "") + f"{user}: {question}{self.sep}", False)
                if header:
                    add(f"{assistant}:", False)
                if answer is not None:
                    add(f" {answer}{self.sep2}", True)
            elif style is SeparatorStyle.SINGLE:
                add((system + self.sep if k == 0 else "") + f"{user}: {question}{self.sep}", False)
                if header:
                    add(f"{assistant}:", False)
                if answer is not None:
                    add(f" {answer}{self.sep}", True)
            elif style is SeparatorStyle.LLAMA_2:
                if k == 0:
                    question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
                # The original prefixes every [INST] with sep ("<s>") and lstrips it once at the
                # very start, so only the second and later rounds carry it.
                add(("" if k == 0 else self.sep) + f"[INST] {question} [/INST]", False)
                if answer is not None:
                    add(f" {answer} {self.sep2}", True)
            elif style is SeparatorStyle.PLAIN:
                placeholders = "".join(PLACEHOLDER_PATTERN.findall(question))
                add((system if k == 0 else "") + placeholders, False)
                if answer is not None:
                    add(f"{answer}{self.sep}", True)
            else:  # pragma: no cover - exhaustive over SeparatorStyle
                raise TemplateError(f"unsupported separator style {style}")
        return out


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

VICUNA_V1 = Template(
    "vicuna_v1", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>", "v1"
)
LLAVA_V1 = Template("llava_v1", _HUMAN_SYSTEM, ("USER", "ASSISTANT"), SeparatorStyle.TWO, " ", "</s>", "v1")
LLAVA_V0 = Template(
    "llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), SeparatorStyle.SINGLE, "###", None, "v0"
)
PLAIN = Template("plain", "", ("", ""), SeparatorStyle.PLAIN, "\n", None, "plain")
LLAMA_2 = Template(
    "llama_2", _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), SeparatorStyle.LLAMA_2, "<s>", "</s>", "llama_v2"
)
LLAVA_LLAMA_2 = Template(
    "llava_llama_2",
    _LLAVA_LLAMA_2_SYSTEM,
    ("USER", "ASSISTANT"),
    SeparatorStyle.LLAMA_2,
    "<s>",
    "</s>",
    "llama_v2",
)

#: Read-only registry: name or alias -> template.
TEMPLATES: Mapping[str, Template] = MappingProxyType(
    {
        "v1": VICUNA_V1,
        "vicuna_v1": VICUNA_V1,
        "llava_v1": LLAVA_V1,
        "v0": LLAVA_V0,
        "llava_v0": LLAVA_V0,
        "plain": PLAIN,
        "v0_plain": PLAIN,
        "llama_2": LLAMA_2,
        "llava_llama_2": LLAVA_LLAMA_2,
    }
)


def template_names() -> list[str]:
    """All registered names and aliases, sorted."""
    return sorted(TEMPLATES)


def get_template(name: str) -> Template:
    """Return the template registered under ``name``.

    Raises:
        TemplateError: unknown name; the message lists the known names.
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; known: {', '.join(template_names())}") from None
