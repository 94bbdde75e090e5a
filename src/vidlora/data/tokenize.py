"""Conversation -> (input_ids, labels) by construction, with media placeholders expanded.

The template renders a conversation into segments that are trained or not
(:mod:`vidlora.data.templates`); each segment is tokenised on its own and the ids are
concatenated, so labels never depend on re-tokenising prefixes and counting (the original's
``preprocess_v1`` masking, which silently zeroed whole samples when a tokenizer's leading-space
handling changed). Labels are the ids of trained segments and ``-100`` elsewhere.

Segment-wise ids equal the ids the model's own convention gives (``prompt_tokenization``)
wherever segment boundaries are token boundaries there, which holds for every registered
template with LLaMA (SentencePiece/Metaspace) and byte-level BPE tokenizers, because boundaries
fall before a space-led word, before/after a special token, or after punctuation that the
pre-tokenizer splits off. The two conventions:

* ``split_at_media`` (the original's ``tokenizer_image_token``): the prompt is cut at every media
  placeholder and each piece tokenized as a string of its own, so text after a placeholder gets
  SentencePiece's dummy prefix (LLaMA: ``▁`` + ``\n`` after every media run). Checked against an
  independent re-statement of the original in ``tests/data/test_original_ids.py``.
* ``whole_prompt`` (transformers' processor): the whole prompt at once, placeholders as special
  tokens, so text after a placeholder is text after a special token (non-legacy LLaMA: no "▁").

Mechanics:

* The tokenizer's own prefix (``<s>`` for LLaMA; nothing for GPT-2-style) is emitted once, at the
  start, and never trained; suffixes it may add (an ``add_eos_token`` setting) are not used —
  the template's terminator (``</s>``) is the trained end of each answer.
* Text that starts a string (the prompt's start; after a placeholder with ``split_at_media``) is
  encoded as a string of its own (Metaspace prepends its "▁"; with ``split_at_media`` a piece that
  starts with a space gets SentencePiece's dummy "▁" on top, as the original's slow tokenizer does). Text after a placeholder with ``whole_prompt`` is
  encoded *behind the ``<image>`` special token*, whose id is then dropped, so the tokenizer
  treats it as text that follows a special token: Metaspace with ``prepend_scheme="first"``
  (non-legacy LLaMA) prepends no "▁", with ``"always"`` (legacy LLaMA) it does.
* Text right after other text (the next segment) is encoded together with the piece before it,
  and its ids are the tail beyond that piece's own ids. This keeps e.g. legacy LLaMA from
  prepending a "▁" to ``"Human:"`` after ``"###"`` (v0), which it would do behind a special token.
* Where it differs: if a segment boundary falls inside what the tokenizer makes one token
  (e.g. ``"ASSISTANT: "`` | ``"answer"``), the tail test fails and the piece is encoded on its
  own, so the two sides stay separate tokens — the segments, not the merge, decide. No
  registered template has such a boundary with LLaMA (both prepend schemes) or byte-level BPE
  tokenizers (tested against whole-prompt tokenisation).

Placeholders ``<image>`` / ``<video>`` become exactly ``counts.image`` / ``counts.video`` copies of
their token id, always with label ``-100``.

Lengths: ``model_max_length`` keeps the original meaning — a bound on text tokens where each
placeholder counts once (the original collator's cut); ``tokenizer_model_max_length`` bounds the
expanded sequence (the original's cut after splicing features). A cut that would remove any media
token (inside a run, or a whole placeholder) raises :class:`TokenizationError` instead of leaving
pixels without positions; so does a sample left with no trained token. The caller decides
whether that is fatal or a counted skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vidlora.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Sample
from vidlora.data.templates import (
    PLACEHOLDER_PATTERN,
    Message,
    Segment,
    Template,
    TemplateError,
    get_template,
)
from vidlora.errors import VidloraError
from vidlora.model.configuration import PROMPT_TOKENIZATIONS
from vidlora.model.tokenizer import MediaTokenIds, media_token_ids

IGNORE_INDEX = -100


class TokenizationError(VidloraError, ValueError):
    """A sample cannot be tokenised as asked (truncation would cut media, nothing left to train).

    ``text_length`` / ``full_length`` are the sample's lengths before any cut, when a length
    limit is what failed (for reports).
    """

    def __init__(
        self,
        reason: str,
        sample_id: str | None = None,
        *,
        text_length: int | None = None,
        full_length: int | None = None,
    ) -> None:
        self.sample_id = sample_id
        self.reason = reason
        self.text_length = text_length
        self.full_length = full_length
        prefix = f"sample {sample_id!r}: " if sample_id is not None else ""
        super().__init__(prefix + reason)


@dataclass(frozen=True)
class MediaTokenCounts:
    """How many positions one image and one video occupy in the expanded sequence."""

    image: int
    video: int


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids and labels of one conversation.

    Attributes:
        input_ids: ids with media placeholders expanded.
        labels: same length; ``-100`` except on trained tokens.
        num_text_tokens: tokens that are not media tokens (BOS included).
        num_trained: tokens whose label is not ``-100``.
        text_length: text tokens before any cut, each placeholder counted once (what
            ``model_max_length`` bounds).
        full_length: the expanded length before any cut (``len(input_ids)`` when nothing was cut).
    """

    input_ids: list[int]
    labels: list[int]
    num_text_tokens: int
    num_trained: int
    text_length: int
    full_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before the text on ``encode`` (``[bos]`` for LLaMA, ``[]`` for GPT-2)."""
    probe = "a"
    with_special = tokenizer.encode(probe, add_special_tokens=True)
    plain = tokenizer.encode(probe, add_special_tokens=False)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    raise ValueError("cannot locate the text inside the tokenizer's special-token template")


def tokenize_sample(
    sample_or_turns: Sample | Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: Template | str,
    counts: MediaTokenCounts,
    *,
    model_max_length: int | None = None,
    tokenizer_model_max_length: int | None = None,
    media_ids: MediaTokenIds | None = None,
    sample_id: str | None = None,
    tokenization: str,
) -> TokenizedSample:
    """Tokenise a training conversation into ids and labels (see the module docstring).

    Args:
        sample_or_turns: a :class:`Sample` (its placeholder counts are checked against its media)
            or a sequence of messages with ``role``/``value``.
        tokenizer: a tokenizer that has the media tokens (:func:`~vidlora.model.tokenizer.add_media_tokens`).
        template: a template or its registered name.
        counts: media token counts of the model.
        model_max_length: bound on text tokens, each placeholder counting once; longer text is cut.
        tokenizer_model_max_length: bound on the expanded sequence; longer sequences are cut.
        media_ids: the media token ids; read from the tokenizer when omitted.
        sample_id: id used in errors (defaults to the sample's id).
        tokenization: ``split_at_media`` or ``whole_prompt`` (see the module docstring).

    Raises:
        TokenizationError: a cut would remove media tokens; nothing trained remains; the
            conversation does not fit the template; placeholder counts differ from the media.
    """
    if isinstance(template, str):
        template = get_template(template)
    if media_ids is None:
        media_ids = media_token_ids(tokenizer)
    if isinstance(sample_or_turns, Sample):
        sample_id = sample_id if sample_id is not None else sample_or_turns.id
        turns: Sequence[Message] = sample_or_turns.conversations
    else:
        turns = sample_or_turns
    try:
        segments = template.segments(turns)
    except TemplateError as exc:
        raise TokenizationError(f"template {template.name!r}: {exc}", sample_id) from exc
    if isinstance(sample_or_turns, Sample):
        _check_media_counts(sample_or_turns, segments, template)

    # Text-level sequence: each placeholder is one entry (its id), so model_max_length applies
    # exactly as in the original collator.
    ids, labels = _encode_segments(segments, tokenizer, media_ids, tokenization)

    media = {media_ids.image: counts.image, media_ids.video: counts.video}
    text_length = len(ids)
    full_length = sum(media.get(i, 1) for i in ids)
    if model_max_length is not None and len(ids) > model_max_length:
        dropped = [i for i in ids[model_max_length:] if i in media]
        if dropped:
            raise TokenizationError(
                f"model_max_length={model_max_length} would cut {len(dropped)} media placeholder(s) "
                f"from a text of {len(ids)} tokens (placeholders counted once)",
                sample_id,
                text_length=text_length,
                full_length=full_length,
            )
        ids, labels = ids[:model_max_length], labels[:model_max_length]

    expanded_ids, expanded_labels = _expand(ids, labels, media)

    limit = tokenizer_model_max_length
    if limit is not None and len(expanded_ids) > limit:
        cut_media = sum(1 for i in expanded_ids[limit:] if i in media)
        if cut_media:
            raise TokenizationError(
                f"tokenizer_model_max_length={limit} would cut {cut_media} media token(s) from an expanded "
                f"sequence of {len(expanded_ids)} tokens (media runs are never cut)",
                sample_id,
                text_length=text_length,
                full_length=full_length,
            )
        expanded_ids, expanded_labels = expanded_ids[:limit], expanded_labels[:limit]

    num_trained = sum(1 for label in expanded_labels if label != IGNORE_INDEX)
    if num_trained == 0:
        raise TokenizationError(
            f"no trained tokens left (sequence of {len(expanded_ids)} tokens after truncation; "
            f"model_max_length={model_max_length}, tokenizer_model_max_length={tokenizer_model_max_length})",
            sample_id,
            text_length=text_length,
            full_length=full_length,
        )
    num_text = sum(1 for i in expanded_ids if i not in media)
    return TokenizedSample(expanded_ids, expanded_labels, num_text, num_trained, text_length, full_length)


def tokenize_prompt(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: Template | str,
    counts: MediaTokenCounts,
    *,
    media_ids: MediaTokenIds | None = None,
    add_generation_prompt: bool = True,
    tokenization: str,
) -> list[int]:
    """Token ids of an inference prompt, built exactly like training's (same pieces, same expansion).

    Args:
        messages: the conversation so far, normally ending with a ``human`` turn.
        tokenizer / template / counts / media_ids / tokenization: as for :func:`tokenize_sample`.
        add_generation_prompt: end with the assistant header so the model writes the answer.

    Returns:
        The ids (special prefix included, placeholders expanded). No truncation is applied.

    Raises:
        TokenizationError: the messages do not fit the template.
    """
    if isinstance(template, str):
        template = get_template(template)
    if media_ids is None:
        media_ids = media_token_ids(tokenizer)
    try:
        segments = template.prompt_segments(messages, add_generation_prompt)
    except TemplateError as exc:
        raise TokenizationError(f"template {template.name!r}: {exc}") from exc
    ids, labels = _encode_segments(segments, tokenizer, media_ids, tokenization)
    expanded, _ = _expand(ids, labels, {media_ids.image: counts.image, media_ids.video: counts.video})
    return expanded


def _encode_segments(
    segments: Sequence[Segment],
    tokenizer: PreTrainedTokenizerBase,
    media_ids: MediaTokenIds,
    tokenization: str,
) -> tuple[list[int], list[int]]:
    """Text-level ids and labels: special prefix, then each piece; a placeholder is one id."""
    if tokenization not in PROMPT_TOKENIZATIONS:
        raise ValueError(
            f"tokenization must be one of {', '.join(PROMPT_TOKENIZATIONS)}, got {tokenization!r}"
        )
    for tok_id in (media_ids.image, media_ids.video):
        added = tokenizer.added_tokens_decoder.get(tok_id)
        # A media token that strips neighbouring spaces would make piece-wise ids differ from
        # whole-prompt ids (and <image> is the anchor for later pieces), so refuse it.
        if added is not None and (added.lstrip or added.rstrip):
            raise ValueError(
                f"media token {added.content!r} strips neighbouring spaces (lstrip/rstrip); "
                "add it with vidlora.model.tokenizer.add_media_tokens instead"
            )
    ids: list[int] = list(special_prefix(tokenizer))
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    # The text piece just before the current one (None at the start or after a placeholder),
    # and whether that piece was encoded as the start of a string.
    context: tuple[str, bool] | None = None
    # Whether text here starts a string of its own: at the prompt's start, and after every
    # placeholder when the prompt is split at media.
    fresh = True
    for text, trained in segments:
        for piece in _split_placeholders(text):
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                ids.append(media_ids.image if piece == IMAGE_PLACEHOLDER else media_ids.video)
                labels.append(IGNORE_INDEX)
                context = None
                fresh = tokenization == "split_at_media"
            else:
                piece_ids = _encode_piece(
                    tokenizer, piece, fresh, context, media_ids.image, tokenization == "split_at_media"
                )
                ids.extend(piece_ids)
                labels.extend(piece_ids if trained else [IGNORE_INDEX] * len(piece_ids))
                context = (piece, fresh)
                fresh = False
    return ids, labels


def _expand(ids: list[int], labels: list[int], media: dict[int, int]) -> tuple[list[int], list[int]]:
    """Repeat each media id ``media[id]`` times (labels -100 there)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    for tok_id, label in zip(ids, labels, strict=True):
        if tok_id in media:
            out_ids.extend([tok_id] * media[tok_id])
            out_labels.extend([IGNORE_INDEX] * media[tok_id])
        else:
            out_ids.append(tok_id)
            out_labels.append(label)
    return out_ids, out_labels


def _split_placeholders(text: str) -> list[str]:
    """Split text into placeholder and non-empty text pieces, in order."""
    pieces: list[str] = []
    pos = 0
    for m in PLACEHOLDER_PATTERN.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        pieces.append(m.group())
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


def _encode_piece(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    fresh: bool,
    context: tuple[str, bool] | None,
    anchor_id: int,
    sentencepiece_starts: bool,
) -> list[int]:
    """Encode one text piece without special tokens, as it tokenises in its place in the prompt.

    ``context`` is the text piece right before this one (and whether it started a string); when
    present, the piece's ids are the tail of ``encode(context + text)`` beyond ``encode(context)``,
    provided the boundary is a token boundary there. Otherwise (after a placeholder, or when a
    token would straddle the boundary) the piece is encoded on its own: as the start of a string
    when ``fresh``, else behind ``<image>``. ``sentencepiece_starts``: a string start gets
    SentencePiece's dummy prefix even before a space (the original's slow tokenizer).
    """

    def encode(s: str, first: bool) -> list[int]:
        if first:
            if sentencepiece_starts and s[:1].isspace() and _prefix_swallows_a_space(tokenizer):
                # SentencePiece adds its dummy "▁" to every string, even one that starts with a space
                # (" What" -> "▁", "▁What"); transformers' Metaspace adds it only when the string does
                # not start with one.
                s = " " + s
            return list(tokenizer.encode(s, add_special_tokens=False))
        ids = tokenizer.encode(IMAGE_PLACEHOLDER + s, add_special_tokens=False)
        if not ids or ids[0] != anchor_id:
            raise ValueError(f"tokenizer does not keep {IMAGE_PLACEHOLDER} as one special token")
        return list(ids[1:])

    if context is not None:
        prev, prev_first = context
        base = encode(prev, prev_first)
        both = encode(prev + text, prev_first)
        if both[: len(base)] == base:
            return both[len(base) :]
    return encode(text, fresh)


def _prefix_swallows_a_space(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's word-start prefix absorbs a leading space ("a" and " a" encode alike):
    Metaspace with a prepend scheme (LLaMA in transformers), unlike SentencePiece's own dummy prefix."""
    return list(tokenizer.encode(" a", add_special_tokens=False)) == list(
        tokenizer.encode("a", add_special_tokens=False)
    )


def _check_media_counts(sample: Sample, segments: Sequence[Segment], template: Template) -> None:
    """The rendered prompt must hold one placeholder per medium (templates may not drop any)."""
    text = "".join(s.text for s in segments)
    n_video, n_image = text.count(VIDEO_PLACEHOLDER), text.count(IMAGE_PLACEHOLDER)
    want_video = int(sample.video is not None)
    if (n_video, n_image) != (want_video, len(sample.images)):
        raise TokenizationError(
            f"template {template.name!r} renders {n_video} {VIDEO_PLACEHOLDER} and {n_image} {IMAGE_PLACEHOLDER} "
            f"placeholder(s) for {want_video} video(s) and {len(sample.images)} image(s)",
            sample.id,
        )
