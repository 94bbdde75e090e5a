"""Files that survive a kill: one JSONL reader and appender for every JSONL vidlora writes, an
atomic whole-file writer, and the one reader of JSON object files (configs, records).

A record is written as one ``json + "\\n"`` and flushed, so a SIGKILL can only leave the *last*
line cut short — possibly inside a multi-byte character. :class:`JsonlAppender` truncates such a
torn tail before appending (the record it held was never complete, so whoever wrote it writes it
again); a last line that is complete JSON but lacks its newline (files from other tools) just gets
the newline. :func:`read_jsonl` reports a torn tail, an invalid line or invalid UTF-8 by file and
line number instead of mis-reading it. Lines are split at ``"\\n"`` only: JSON strings may hold
U+2028 and other characters that ``str.splitlines`` would also split at.
:func:`write_text_atomic` writes beside the target and renames, so a reader sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from vidlora.errors import UsageError


class JsonlError(UsageError):
    """A JSONL file with an invalid line; the message names the file and the line."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}")


def _unterminated_tail(path: Path) -> int:
    """How many bytes follow the last newline; 0 when the file ends with one (or is empty)."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return 0
        # Walk back to the previous newline in blocks (the tail is one record: small).
        position, block = size, 4096
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            newline = handle.read(position - start).rfind(b"\n")
            if newline >= 0:
                return size - (start + newline + 1)
            position = start
    return size


def _is_record(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included: a character cut in half
        return False
    return True


def torn_tail(path: Path) -> int:
    """Bytes of a torn last line (cut short by a kill: not valid JSON); 0 when the last line is whole."""
    tail = _unterminated_tail(path)
    if not tail:
        return 0
    with open(path, "rb") as handle:
        handle.seek(-tail, os.SEEK_END)
        return 0 if _is_record(handle.read()) else tail


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for every non-blank line.

    Raises:
        JsonlError: a line that is not valid UTF-8 JSON; a torn last line unless ``allow_torn_tail``
            (then it is skipped: the appender will cut it before writing again).
    """
    path = Path(path)
    data = path.read_bytes()
    tail = torn_tail(path)
    body = data[: len(data) - tail] if tail else data
    lines = body.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise JsonlError(path, number, f"not UTF-8 ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise JsonlError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
    if tail and not allow_torn_tail:
        raise JsonlError(
            path,
            body.count(b"\n") + 1,
            "the last line is cut short (its writer was stopped mid-line); "
            "rerun the command that writes it to complete the file",
        )


class JsonlAppender:
    """Append records to a JSONL file, first cutting a torn last line left by a killed writer.

    Use as a context manager; every :meth:`write` is one line, flushed (``fsync`` with ``durable``).
    """

    def __init__(self, path: str | Path, *, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self.repaired = 0  # bytes cut from a torn tail
        self._handle: IO[str] | None = None

    def __enter__(self) -> JsonlAppender:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = torn_tail(self.path)
        if self.repaired:
            with open(self.path, "r+b") as handle:
                handle.truncate(self.path.stat().st_size - self.repaired)
        self._handle = open(self.path, "a", encoding="utf-8")
        if _unterminated_tail(self.path):
            self._handle.write("\n")  # a whole record written without its newline
        return self

    def write(self, record: Any) -> None:
        """Write one record as one line and flush it."""
        assert self._handle is not None, "use JsonlAppender as a context manager"
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        if self.durable:
            os.fsync(self._handle.fileno())

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold one object (a config, a record); anything else is a user error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a file beside it and a rename."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
