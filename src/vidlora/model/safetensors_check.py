"""Check a safetensors file's header before anything reads its tensors.

A checkpoint can come from anywhere (a hub download, a colleague's run), and its header says how
much to read and where. The format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON
(tensor name -> ``{"dtype", "shape", "data_offsets": [begin, end]}``, offsets relative to the data
after the header, plus an optional ``"__metadata__"`` of strings), then the data.
:func:`check_safetensors` reads the 8 bytes, and the header only once its length is within bounds,
and checks every entry against the file's size, so a damaged or hostile file fails with one line
naming the file and the problem instead of the reader's own error, an allocation sized by the
header, or tensors that share bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidlora.errors import UsageError

#: safetensors' own limit on the header (its readers refuse more).
MAX_HEADER_BYTES = 100_000_000
#: Bytes per element of each dtype torch reads from safetensors.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
METADATA_KEY = "__metadata__"


class SafetensorsHeaderError(UsageError):
    """A safetensors file whose header is malformed or promises more than the file holds."""


_Fail = Callable[[str], SafetensorsHeaderError]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """The tensors a safetensors file's header lists, after checking that the header is sound.

    Checked: the header length fits both the file and :data:`MAX_HEADER_BYTES`; the header is a
    JSON object (no duplicate names); every entry has a known dtype, a shape of non-negative
    integers and ``shape x itemsize`` bytes at offsets inside the data; the tensors tile the data
    exactly (no overlap, no gap, nothing after the last one), as safetensors' own reader requires.

    Raises:
        SafetensorsHeaderError: the first problem found, naming the file.
        OSError: the file cannot be read at all.
    """
    path = Path(path)

    def fail(problem: str) -> SafetensorsHeaderError:
        return SafetensorsHeaderError(f"{path}: not a valid safetensors file: {problem}")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise fail(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise fail(f"header length {length} is over the {MAX_HEADER_BYTES}-byte limit")
        if length > size - 8:
            raise fail(f"header length {length} runs past the end of the file ({size} bytes)")
        raw = handle.read(length)
    data_size = size - 8 - length
    header = _parse_header(raw, fail)
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise fail(f"{METADATA_KEY!r} must be an object of strings")
    entries = {name: _entry(name, value, data_size, fail) for name, value in header.items()}
    expected, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < expected:
            raise fail(f"tensors {previous!r} and {name!r} overlap (bytes {entry.begin}..{expected})")
        if entry.begin > expected:
            raise fail(f"data bytes {expected}..{entry.begin} (before {name!r}) belong to no tensor")
        expected, previous = entry.end, name
    if expected != data_size:
        raise fail(f"data bytes {expected}..{data_size} (after the last tensor) belong to no tensor")
    return entries


def _parse_header(raw: bytes, fail: _Fail) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in pairs:
            if name in out:
                raise fail(f"the header names {name!r} twice")
            out[name] = value
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as err:
        raise fail(f"the header is not UTF-8 ({err})") from None
    except RecursionError:
        raise fail("the header's JSON is nested too deeply") from None
    except ValueError as err:
        raise fail(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise fail(f"the header is a JSON {type(header).__name__}, not an object")
    return header


def _entry(name: str, value: Any, data_size: int, fail: _Fail) -> TensorEntry:
    if not isinstance(value, dict):
        raise fail(f"tensor {name!r}: its entry is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise fail(f"tensor {name!r}: dtype {dtype!r} is not one vidlora reads ({', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise fail(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise fail(f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the {data_size} data bytes")
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if needed != end - begin:
        raise fail(
            f"tensor {name!r}: shape {shape} of {dtype} needs {needed} bytes, its offsets span {end - begin}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
