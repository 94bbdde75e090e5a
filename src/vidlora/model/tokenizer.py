"""Offline tokenizers for tests and the tiny preset, and the media special tokens.

Nothing can be downloaded from a model hub on the machines this project is built on, so the tiny
preset needs tokenizers that are built locally, deterministically and in milliseconds:

* :func:`build_tiny_tokenizer` — LLaMA-style: a BPE model with ``byte_fallback`` (the 256
  ``<0xNN>`` byte pieces at ids 3..258), a ``Metaspace("▁", prepend_scheme="first")``
  pre-tokenizer, ``<unk>``=0, ``<s>``=1, ``</s>``=2, and ``<s>`` prepended on encode. This is the
  layout of transformers' ``LlamaTokenizerFast`` (non-legacy), i.e. the kind of tokenizer whose
  leading-"▁" behaviour broke the original Video-LLaVA label masking.
* :func:`build_bytelevel_tokenizer` — GPT-2 style byte-level BPE with the same three special tokens
  at the same ids; it adds no BOS by default (like GPT-2 / Qwen), so callers are exercised on a
  tokenizer that does not.

Both are trained with the ``tokenizers`` library on an embedded corpus (:data:`TINY_CORPUS`) and
then get the media tokens via :func:`add_media_tokens`. They save and load with
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` without network access.

:func:`load_tokenizer` reads a checkpoint's tokenizer the way the original stack did: a LLaMA
SentencePiece tokenizer whose ``tokenizer_config.json`` has no ``legacy`` key gets transformers
4.31's default (``legacy=True``: every piece of text after a special token starts a new word);
transformers 5 would silently take ``legacy=False`` and change the ids the model sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vidlora.errors import NotFoundError
from vidlora.jsonl import read_json_object

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

#: The three base special tokens, in id order (0, 1, 2), as in LLaMA.
BASE_SPECIAL_TOKENS: tuple[str, str, str] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

#: Tokenizer classes with transformers' ``legacy`` switch (LLaMA's SentencePiece family).
LEGACY_TOKENIZER_CLASSES = frozenset(
    {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}
)

#: Default total vocabulary (before media tokens) of the tiny tokenizers.
TINY_VOCAB_SIZE = 1000

# Training text: the chat templates' fixed strings, the synthetic QA task's words and some common
# English. Repetition counts matter only for which merges win; the corpus is fixed, so is the result.
TINY_CORPUS: tuple[str, ...] = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "USER: ASSISTANT: Human: Assistant: ### [INST] [/INST] <<SYS>> <</SYS>> USER ASSISTANT",
    "What color is the circle? What color is the square? What color is the triangle?",
    "What shape is moving? What shape is in the image? What shape is in the video?",
    "In which direction is the circle moving? Which direction is the square moving?",
    "How many circles are in the image? How many squares are in the video? How many triangles?",
    "The circle is red. The square is green. The triangle is blue. The circle is yellow.",
    "The square is white. The triangle is black. The circle is orange. The square is purple.",
    "red green blue yellow white black orange purple",
    "Red Green Blue Yellow White Black Orange Purple",
    "circle square triangle circles squares triangles Circle Square Triangle",
    "left right up down Left Right Up Down",
    "one two three four five One Two Three Four Five 1 2 3 4 5 0 6 7 8 9 10",
    "Answer with a single word. Answer the question using a single word or phrase.",
    "Describe the video. Describe the image. What is happening in the video?",
    "What is the man doing? He is juggling. She is walking. It is moving to the left.",
    "It is moving to the right. It is moving up. It is moving down. There are two circles.",
    "Is the object moving? Yes. No. yes no The object is a circle.",
    "the of and to in is it that for on with as was at by this be from are or an have not",
    "you he she they we his her their what which who when where why how all can will would",
    "there been one more some other into than then them these so out about up time only new",
    "picture frame frames clip scene object objects background foreground color colour shape",
    "first second third last next before after during while video image question answer",
)


@dataclass(frozen=True)
class MediaTokenIds:
    """Token ids of the media placeholders and the padding token of a tokenizer."""

    image: int
    video: int
    pad: int


def _train_bpe(
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    vocab_size: int,
    initial_alphabet: list[str],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a BPE on :data:`TINY_CORPUS`; return its vocab and merges (merge order kept).

    The trainer is deterministic: the alphabet is sorted and ties between equally frequent pairs
    are broken by pair ids, so the same corpus always yields the same merges.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=initial_alphabet,
        show_progress=False,
    )
    # Repeat the corpus so that the template strings dominate the pair counts.
    tok.train_from_iterator(list(TINY_CORPUS) * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a backend tokenizer for transformers and add the media tokens."""
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    add_media_tokens(hf)
    return hf


def build_tiny_tokenizer(
    vocab_size: int = TINY_VOCAB_SIZE, model_max_length: int = 4096, *, pad_vocab_to: int | None = None
) -> PreTrainedTokenizerFast:
    """Build the LLaMA-style tiny tokenizer (Metaspace + byte-fallback BPE, BOS on encode).

    Args:
        vocab_size: total size of the base vocabulary (specials + 256 byte pieces + merges),
            before the media tokens are appended. Must leave room for the alphabet.
        model_max_length: recorded on the tokenizer (it does not truncate on its own).
        pad_vocab_to: fill the base vocabulary with pieces no text produces (``<unused_K>``) up
            to this size, so the media tokens land where a larger model expects them (a stand-in
            for a tokenizer that cannot be built offline, e.g. Vicuna's 32,000 pieces).

    Returns:
        A fast tokenizer with ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<0x00>``..``<0xFF>`` = 3..258,
        learned pieces after them, then ``<image>``, ``<video>``, ``<pad>`` (pad token set).
    """
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_fixed = len(BASE_SPECIAL_TOKENS) + len(byte_pieces)
    if vocab_size <= n_fixed + 100:
        raise ValueError(
            f"vocab_size must exceed {n_fixed + 100} (specials, bytes and an alphabet), got {vocab_size}"
        )
    # Train with split=True so that no merge crosses a word start; apply with split=False like
    # LlamaTokenizerFast (identical results on single-spaced text, and runs of spaces stay "▁"s).
    alphabet = sorted({chr(c) for c in range(33, 127)} | {"▁"})
    trained_vocab, merges = _train_bpe(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        vocab_size - len(byte_pieces),
        alphabet,
    )
    vocab: dict[str, int] = {}
    for piece in (*BASE_SPECIAL_TOKENS, *byte_pieces):
        vocab[piece] = len(vocab)
    for piece, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    if pad_vocab_to is not None:
        if pad_vocab_to < len(vocab):
            raise ValueError(f"pad_vocab_to {pad_vocab_to} is below the trained vocabulary ({len(vocab)})")
        vocab.update({f"<unused_{k}>": k for k in range(len(vocab), pad_vocab_to)})

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return _wrap(tok, model_max_length)


def build_bytelevel_tokenizer(
    vocab_size: int = TINY_VOCAB_SIZE, model_max_length: int = 4096, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """Build a GPT-2 style byte-level BPE tokenizer with ``<unk>``/``<s>``/``</s>`` at ids 0/1/2.

    Args:
        vocab_size: total base vocabulary (3 specials + 256 byte symbols + merges).
        model_max_length: recorded on the tokenizer.
        add_bos: prepend ``<s>`` on encode. Off by default, as for GPT-2-style tokenizers.

    Returns:
        A fast tokenizer with the media tokens and ``<pad>`` appended (pad token set).
    """
    if vocab_size <= len(BASE_SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed 259 (specials and 256 bytes), got {vocab_size}")
    trained_vocab, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size, pre_tokenizers.ByteLevel.alphabet()
    )
    tok = Tokenizer(models.BPE(vocab=trained_vocab, merges=merges, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN}:0 $A:0",
            pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, trained_vocab[BOS_TOKEN])],
        )
    else:
        # trim_offsets=False keeps character offsets exact (a leading space stays in its token).
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _wrap(tok, model_max_length)


def add_media_tokens(tokenizer: PreTrainedTokenizerBase) -> MediaTokenIds:
    """Add ``<image>``, ``<video>`` and ``<pad>`` as special tokens and make ``<pad>`` the pad token.

    The tokens are added as real special tokens: never split, never normalised, and with no
    ``lstrip``/``rstrip``, so neighbouring spaces stay ordinary text and are not absorbed.
    The pad token becomes ``<pad>`` (a dedicated id, as in the transformers Video-LLaVA port; the
    original padded with ``<unk>``). Idempotent: tokens that already exist keep their ids.

    Returns:
        The ids of the three tokens.
    """
    new = [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in (IMAGE_TOKEN, VIDEO_TOKEN, PAD_TOKEN)
        if t not in tokenizer.get_vocab()
    ]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.pad_token = PAD_TOKEN
    vocab = tokenizer.get_vocab()
    return MediaTokenIds(image=vocab[IMAGE_TOKEN], video=vocab[VIDEO_TOKEN], pad=int(tokenizer.pad_token_id))


def media_token_ids(tokenizer: PreTrainedTokenizerBase) -> MediaTokenIds:
    """Return the media/pad ids of a tokenizer that already has them; raise if any is missing."""
    # The added tokens are a few; the full vocabulary (32k for LLaMA) only when they are not there.
    vocab = tokenizer.added_tokens_encoder
    if IMAGE_TOKEN not in vocab or VIDEO_TOKEN not in vocab:
        vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in vocab]
    if missing or tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer lacks media tokens {missing or ''}{' and a pad token' if tokenizer.pad_token_id is None else ''}; "
            "call vidlora.model.tokenizer.add_media_tokens(tokenizer) first"
        )
    return MediaTokenIds(image=vocab[IMAGE_TOKEN], video=vocab[VIDEO_TOKEN], pad=int(tokenizer.pad_token_id))


def load_tokenizer(
    directory: str | Path,
    *,
    text_config: PreTrainedConfig | None = None,
    notes: list[str] | None = None,
    absent_legacy: bool = True,
) -> PreTrainedTokenizerBase:
    """A checkpoint directory's tokenizer, read as the original stack read it, with the media tokens.

    A LLaMA SentencePiece tokenizer (``tokenizer.model`` and ``tokenizer_config.json``, with or
    without ``tokenizer.json``) whose config has no ``legacy`` key is loaded with ``legacy=True``,
    transformers 4.31's default; an explicit value is respected. The value is kept in the
    tokenizer's saved config (transformers 5 leaves it out, and would reload the other way).

    Args:
        directory: the checkpoint (or tokenizer) directory.
        text_config: the LLM's config; tells AutoTokenizer the family when tokenizer_config.json does not.
        notes: decisions are appended here (the legacy default, the tokens added).
        absent_legacy: what a missing ``legacy`` key means: True (transformers 4.31, the original's
            stack); False only for a tokenizer saved by vidlora 0.1, which trained with
            transformers 5's default and saved no key.

    Raises:
        NotFoundError: no tokenizer can be read from the directory.
    """
    directory = Path(directory)
    notes = [] if notes is None else notes
    kwargs: dict[str, Any] = {}
    settings_file = directory / "tokenizer_config.json"
    settings = read_json_object(settings_file) if settings_file.is_file() else {}
    family = settings.get("tokenizer_class") or (
        "LlamaTokenizer" if getattr(text_config, "model_type", None) == "llama" else None
    )
    if family in LEGACY_TOKENIZER_CLASSES and "legacy" not in settings:
        kwargs["legacy"] = absent_legacy
        if absent_legacy:
            notes.append(
                "tokenizer: tokenizer_config.json has no 'legacy' key; loaded with legacy=True, the default of "
                "transformers 4.31 (the original's stack), so the ids are the ones the model was trained on"
            )
    try:
        # Never the checkpoint's own code: left unset, transformers would ask at the terminal.
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), config=text_config, trust_remote_code=False, **kwargs
        )
    except (OSError, ValueError) as err:
        raise NotFoundError(f"{directory}: no usable tokenizer ({type(err).__name__}: {err})") from err
    if hasattr(tokenizer, "legacy"):
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    before, had = len(tokenizer), set(tokenizer.get_vocab())
    add_media_tokens(tokenizer)
    added = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN, PAD_TOKEN) if t not in had]
    if added:
        notes.append(f"tokenizer: added special tokens {', '.join(added)} ({before} -> {len(tokenizer)})")
    return tokenizer
