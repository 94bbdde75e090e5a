"""The original Video-LLaVA's prompt tokenization and label masking, re-stated for tests.

Written out from PKU-YuanGroup/Video-LLaVA @984e65b (``videollava/conversation.py``,
``videollava/mm_utils.py::tokenizer_image_token``, ``videollava/train/train.py::
preprocess_multimodal`` / ``preprocess_v1``) and from transformers 4.31's slow ``LlamaTokenizer``
(``tokenize`` / ``_tokenize``, both ``legacy`` branches), on top of ``sentencepiece`` alone. It
shares no code with vidlora's tokenization path on purpose: vidlora renders segments and labels
them by construction; this module renders one prompt string, cuts it at ``<image>`` and recovers
the labels by counting tokens, as the original does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sentencepiece as spm

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
SPIECE_UNDERLINE = "▁"

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEMS = {"v1": VICUNA_V1_SYSTEM, "vicuna_v1": VICUNA_V1_SYSTEM, "llava_v1": LLAVA_V1_SYSTEM}

#: ``tokenizer(text).input_ids`` of some tokenizer: BOS + the text's ids.
Encode = Callable[[str], list[int]]


class SlowLlamaTokenizer431:
    """transformers 4.31 ``LlamaTokenizer(use_fast=False)``: ``__call__(text).input_ids`` only.

    ``tokenize``: with ``legacy=False`` the text gets a leading "▁" (and inner "▁" become spaces);
    the text is split on the special tokens (``<s>``, ``</s>``, ``<unk>``: AddedTokens without
    lstrip/rstrip, so neighbouring spaces stay); each other piece goes through ``_tokenize``:
    ``sp.encode(piece)`` (which always adds SentencePiece's dummy prefix), and with
    ``legacy=False`` the "▁" of the first piece is stripped again unless the piece is the text's
    start or begins with a space. Ids of pieces come from ``sp.piece_to_id`` (``<unk>`` when absent).
    """

    def __init__(self, model_file: str, *, legacy: bool) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.legacy = legacy
        self.bos_token_id = self.sp.bos_id()
        self.specials = {
            self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        }

    def _split_on_specials(self, text: str) -> list[str]:
        pieces: list[str] = []
        start = pos = 0
        while pos < len(text):
            match = next(
                (s for s in sorted(self.specials, key=len, reverse=True) if text.startswith(s, pos)), None
            )
            if match is None:
                pos += 1
                continue
            pieces += [text[start:pos], match]
            pos += len(match)
            start = pos
        pieces.append(text[start:])
        return [p for p in pieces if p]

    def _tokenize(self, text: str) -> list[str]:
        is_first = False
        if not self.legacy:
            is_first = text.startswith(SPIECE_UNDERLINE)
            if is_first:
                text = text[1:]
        tokens = self.sp.encode(text, out_type=str)
        if (
            not self.legacy
            and not is_first
            and not text.startswith(" ")
            and tokens
            and tokens[0].startswith(SPIECE_UNDERLINE)
        ):
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for piece in self._split_on_specials(text):
            tokens += [piece] if piece in self.specials else self._tokenize(piece)
        return tokens

    def __call__(self, text: str) -> list[int]:
        ids = [
            self.specials[t] if t in self.specials else self.sp.piece_to_id(t) for t in self.tokenize(text)
        ]
        return [self.bos_token_id, *ids]


def v1_prompt(turns: Sequence[tuple[str, str]], template: str = "v1") -> str:
    """``conv_vicuna_v1`` / ``conv_llava_v1`` ``get_prompt()`` (SeparatorStyle.TWO, sep " ", sep2 "</s>")."""
    seps = (" ", "</s>")
    prompt = SYSTEMS[template] + seps[0]
    for i, (role, message) in enumerate(turns):
        name = "USER" if role == "human" else "ASSISTANT"
        prompt += f"{name}: {message}{seps[i % 2]}"
    return prompt


def expand_video(turns: Sequence[tuple[str, str]], num_frames: int) -> list[tuple[str, str]]:
    """``preprocess_multimodal``: ``<video>`` becomes ``<image>`` x num_frames (``<image>`` stays)."""
    return [(role, text.replace("<video>", "<image>" * num_frames)) for role, text in turns]


def tokenizer_image_token(prompt: str, encode: Encode, bos_token_id: int) -> list[int]:
    """Each chunk between ``<image>`` tokenized on its own; one BOS at the start; -200 per ``<image>``."""
    chunks = [encode(chunk) for chunk in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += chunk[offset:]
    return ids


@dataclass(frozen=True)
class OriginalSample:
    """What the original's ``preprocess_v1`` returns for one conversation.

    ``consistent`` is False when its count-based masking disagrees with the ids ("tokenization
    mismatch"); it then masks every label, as the original does.
    """

    prompt: str
    input_ids: list[int]
    labels: list[int]
    consistent: bool


def preprocess_v1(
    turns: Sequence[tuple[str, str]],
    encode: Encode,
    *,
    bos_token_id: int,
    pad_token_id: int,
    has_image: bool,
    template: str = "v1",
    model_max_length: int = 2048,
) -> OriginalSample:
    """``preprocess_v1``: the prompt's ids, then labels masked by token counts per round.

    The original pads with ``<unk>`` (``pad_token = unk_token``), so ``total_len`` counts the
    non-``<unk>`` ids.
    """
    prompt = v1_prompt(turns, template)

    def tokens(text: str) -> list[int]:
        return tokenizer_image_token(text, encode, bos_token_id) if has_image else encode(text)

    input_ids = tokens(prompt)
    labels = list(input_ids)
    total_len = sum(1 for i in input_ids if i != pad_token_id)
    sep = " ASSISTANT: "
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokens(rou))
        instruction_len = len(tokens(parts[0] + sep)) - 2
        end = min(cur_len + instruction_len, len(labels))
        labels[cur_len:end] = [IGNORE_INDEX] * max(0, end - cur_len)
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(0, len(labels) - cur_len)
    consistent = True
    if cur_len < model_max_length and cur_len != total_len:
        labels = [IGNORE_INDEX] * len(labels)
        consistent = False
    return OriginalSample(prompt, input_ids, labels, consistent)
