"""Offline tokenizers: layout, determinism, media tokens, save/load."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoTokenizer

from vidlora.model.tokenizer import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    MediaTokenIds,
    add_media_tokens,
    build_bytelevel_tokenizer,
    build_tiny_tokenizer,
    media_token_ids,
)


@pytest.fixture(scope="module")
def llama_tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def byte_tok():
    return build_bytelevel_tokenizer()


def _backend_hash(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def test_llama_layout_specials_bytes_and_media(llama_tok):
    # <unk>=0, <s>=1, </s>=2, then the 256 byte pieces at 3..258, like LLaMA.
    assert llama_tok.convert_ids_to_tokens([0, 1, 2, 3, 13, 258]) == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "<0x0A>",
        "<0xFF>",
    ]
    assert (llama_tok.unk_token_id, llama_tok.bos_token_id, llama_tok.eos_token_id) == (0, 1, 2)
    # 882 base pieces (3 specials + 256 bytes + 623 learned) then the media tokens and <pad>.
    assert len(llama_tok) == 885
    assert media_token_ids(llama_tok) == MediaTokenIds(image=882, video=883, pad=884)
    assert llama_tok.pad_token == "<pad>"


def test_bytelevel_layout(byte_tok):
    assert byte_tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert len(byte_tok) == 749
    assert media_token_ids(byte_tok) == MediaTokenIds(image=746, video=747, pad=748)


def test_build_is_deterministic(llama_tok, byte_tok):
    # Hashes pinned: a different trainer result (order of merges, ids) would change them.
    assert _backend_hash(build_tiny_tokenizer()) == _backend_hash(llama_tok) == "6bb6f47ce7aca676"
    assert _backend_hash(build_bytelevel_tokenizer()) == _backend_hash(byte_tok) == "a3fc7457d12a296a"


def test_llama_metaspace_and_bos(llama_tok):
    enc = llama_tok("What color is the circle?")
    assert enc.input_ids[0] == 1  # BOS added on encode
    assert llama_tok.convert_ids_to_tokens(enc.input_ids[1:]) == [
        "▁What",
        "▁color",
        "▁is",
        "▁the",
        "▁circle?",
    ]
    # Only the first split gets the "▁" prefix: text after a special token does not (non-legacy LLaMA).
    toks = llama_tok.convert_ids_to_tokens(llama_tok("red</s>red", add_special_tokens=False).input_ids)
    assert toks == ["▁red", "</s>", "re", "d"]
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    assert llama_tok.convert_ids_to_tokens(llama_tok("ñ", add_special_tokens=False).input_ids) == [
        "▁",
        "<0xC3>",
        "<0xB1>",
    ]
    assert llama_tok.decode(llama_tok("héllo wörld", add_special_tokens=False).input_ids) == "héllo wörld"


def test_bytelevel_no_bos_and_roundtrip(byte_tok):
    ids = byte_tok("The circle is red.").input_ids
    assert byte_tok.convert_ids_to_tokens(ids) == ["The", "Ġcircle", "Ġis", "Ġred", "."]
    text = "日本 ñ \t x"
    assert byte_tok.decode(byte_tok(text).input_ids) == text
    with_bos = build_bytelevel_tokenizer(add_bos=True)
    assert with_bos("red").input_ids == [1, *byte_tok("red").input_ids]


@pytest.mark.parametrize("which", ["llama", "byte"])
def test_media_tokens_never_split_or_merged(which, llama_tok, byte_tok):
    tok = llama_tok if which == "llama" else byte_tok
    ids = media_token_ids(tok)
    enc = tok("a<image><image>b <video>\nc", add_special_tokens=False).input_ids
    assert enc.count(ids.image) == 2
    assert enc.count(ids.video) == 1
    i = enc.index(ids.image)
    assert enc[i + 1] == ids.image  # adjacent placeholders stay two tokens
    # The space before <video> is not absorbed (no lstrip): it remains a token of its own.
    j = enc.index(ids.video)
    assert tok.convert_ids_to_tokens([enc[j - 1]])[0] in ("▁", "Ġ")


def test_add_media_tokens_idempotent(llama_tok):
    tok = build_tiny_tokenizer()
    first = media_token_ids(tok)
    assert add_media_tokens(tok) == first
    assert add_media_tokens(tok) == first
    assert len(tok) == len(llama_tok)
    assert tok.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN]) == [first.image, first.video]


def test_media_token_ids_requires_tokens():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    with pytest.raises(ValueError, match="add_media_tokens"):
        media_token_ids(bare)
    added = add_media_tokens(bare)
    assert added == MediaTokenIds(image=1, video=2, pad=3)


@pytest.mark.parametrize("which", ["llama", "byte"])
def test_save_load_offline(tmp_path, which, llama_tok, byte_tok):
    tok = llama_tok if which == "llama" else byte_tok
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "USER: <video>\nWhat shape is moving? ASSISTANT: circle</s>"
    assert loaded(text).input_ids == tok(text).input_ids
    assert media_token_ids(loaded) == media_token_ids(tok)
    assert loaded.pad_token == "<pad>" and loaded.padding_side == "right"
    assert len(loaded) == len(tok)
