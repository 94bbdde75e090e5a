"""Training/eval records: JSON or JSONL files -> validated, typed :class:`Sample` objects.

The format is the original Video-LLaVA one::

    {"id": "v1", "video": "clips/a.mp4", "image": ["a.jpg", "b.jpg"],
     "conversations": [{"from": "human", "value": "<video>\\nWhat?"}, {"from": "gpt", "value": "..."}]}

Decisions (the original accepted or silently repaired all of these; we document instead):

* **Format**: a file whose first non-blank character is ``[`` is a JSON list; otherwise it is
  read as JSON Lines (one object per non-blank line). A multi-line document that is a single JSON
  object (``{"data": [...]}``) is rejected as "not a list"; a file with one object on one line is
  a one-record JSONL file. Several files are concatenated in the order given.
* **ids**: a string or an integer (kept as ``str``). A missing id becomes ``"<file name>:<index>"``.
  Duplicate ids warn by default (the original overwrote every id with a running index, so
  existing data sets often repeat them); ``duplicate_ids="error"`` makes them an error.
* **Errors**: :func:`load_records` raises the first :class:`RecordError`; :func:`read_records`
  returns every one (with a stable ``kind``) beside the valid samples, for ``vidlora check`` and
  counted skips.
* **Turns**: ``from`` is ``"human"`` or ``"gpt"``, alternating and starting with ``human``; with
  ``require_answer`` (default) the last turn is ``gpt``. One leading ``{"from": "system"}`` turn
  is accepted and overrides the template's system prompt. Values are non-empty strings.
* **Placeholders**: ``<video>``/``<image>`` may appear only in human turns. A video needs exactly
  one ``<video>``; N images need exactly N ``<image>``. When a modality has *no* placeholder at all,
  ``"<video>\\n"`` / ``"<image>\\n"`` × N is prepended to the first human turn (as LLaVA does for a
  missing image token); a non-zero count that is wrong, or a placeholder without media, is an
  error. ``Sample.conversations`` holds the normalised turns; ``Sample.raw`` the record as read.
* **Media**: at most one video (a one-element list is accepted); ``image`` is a string or a
  non-empty list of strings.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vidlora.errors import VidloraError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = ("human", "gpt")
PLACEHOLDER_MISMATCH = "placeholder_mismatch"

#: Builds a RecordError for the current sample from (reason, field[, kind]).
_ErrorFn = Callable[..., "RecordError"]


class RecordError(VidloraError, ValueError):
    """A record file or sample is invalid. The message names file, sample index, id and field.

    ``kind`` is a stable category for reports: ``"invalid_file"`` (the file cannot be read as
    records; ``index`` is None), ``"invalid_record"`` (fields or conversation malformed),
    ``"placeholder_mismatch"`` (``<video>``/``<image>`` placeholders do not match the media),
    ``"duplicate_id"`` or ``"bad_path"`` (from :func:`resolve_media`).
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | Path,
        index: int | None = None,
        sample_id: str | None = None,
        field: str | None = None,
        kind: str | None = None,
    ) -> None:
        self.file = Path(file)
        self.index = index
        self.sample_id = sample_id
        self.field = field
        self.reason = reason
        self.kind = kind or ("invalid_file" if index is None else "invalid_record")
        where = str(self.file)
        if index is not None:
            where += f": sample {index}"
        if sample_id is not None:
            where += f" (id {sample_id!r})"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Turn:
    """One conversation turn: ``role`` is "system", "human" or "gpt"."""

    role: str
    value: str


@dataclass(frozen=True)
class Sample:
    """A validated record.

    Attributes:
        id: the record's id as a string (or ``"<file name>:<index>"`` when it had none).
        video: the video path as written in the record (relative to ``--video_folder``), or None.
        images: image paths as written, in order.
        conversations: normalised turns (placeholders guaranteed; see the module docstring).
        source: the file the record came from.
        index: the record's position in that file (0-based).
        raw: the record exactly as parsed.
    """

    id: str
    video: str | None
    images: tuple[str, ...]
    conversations: tuple[Turn, ...]
    source: Path
    index: int
    raw: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def has_media(self) -> bool:
        """Whether the sample carries a video or at least one image."""
        return self.video is not None or bool(self.images)

    @property
    def modality(self) -> str:
        """``video``, ``image``, ``video+image`` or ``text``: the media the sample carries."""
        if self.video is not None:
            return "video+image" if self.images else "video"
        return "image" if self.images else "text"

    @property
    def modality_label(self) -> str:
        """What reports group the sample under: its own ``modality`` field, else :attr:`modality`."""
        return str(self.raw.get("modality") or self.modality)


def load_records(
    paths: Sequence[str | Path] | str | Path,
    *,
    duplicate_ids: Literal["warn", "error"] = "warn",
    require_answer: bool = True,
) -> list[Sample]:
    """Read and validate records from JSON-list or JSONL files, concatenated in order.

    Args:
        paths: one path or several (the original's repeated ``--data_path``).
        duplicate_ids: ``"warn"`` (``UserWarning`` listing them) or ``"error"`` (:class:`RecordError`).
        require_answer: every conversation must end with a ``gpt`` turn.

    Returns:
        The samples, file by file, in file order.

    Raises:
        RecordError: the first problem found: unreadable file, malformed JSON (with line/column),
            non-list top level, or an invalid sample (naming its index, id and field).
    """
    samples, errors = read_records(paths, duplicate_ids=duplicate_ids, require_answer=require_answer)
    if errors:
        raise errors[0]
    return samples


def read_records(
    paths: Sequence[str | Path] | str | Path,
    *,
    duplicate_ids: Literal["warn", "error"] = "warn",
    require_answer: bool = True,
) -> tuple[list[Sample], list[RecordError]]:
    """Like :func:`load_records`, but collect every problem instead of stopping at the first.

    A file that cannot be read as records gives one ``invalid_file`` error and no samples; each
    invalid record gives one error and is left out. With ``duplicate_ids="error"`` each repeated
    id is an error (``kind="duplicate_id"``) and the later record is left out.

    Returns:
        ``(valid samples in file order, errors in file order)``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("no data files given")
    samples: list[Sample] = []
    errors: list[RecordError] = []
    for path in map(Path, paths):
        try:
            objects = read_record_objects(path)
        except RecordError as err:
            errors.append(err)
            continue
        for index, obj in enumerate(objects):
            try:
                samples.append(_parse_sample(obj, path, index, require_answer))
            except RecordError as err:
                errors.append(err)
    samples, dup_errors = _check_duplicates(samples, duplicate_ids)
    errors.extend(dup_errors)
    return samples, errors


def resolve_media(
    sample: Sample,
    video_folder: str | Path | None,
    image_folder: str | Path | None,
    allow_outside: bool = False,
) -> tuple[Path | None, list[Path]]:
    """Join a sample's media paths to their folders, refusing paths that leave the folder.

    A path is refused unless ``allow_outside`` when it is absolute, or when the joined path,
    after resolving ``..`` and symlinks, is not inside the (resolved) folder. Existence is not
    checked here (the media readers and ``vidlora check`` do that).

    Returns:
        ``(video path or None, [image paths])``, each the folder joined with the record's path.

    Raises:
        RecordError: a refused path, or media given without the matching folder.
    """
    video = None
    if sample.video is not None:
        video = _resolve_one(sample, "video", sample.video, video_folder, allow_outside)
    images = [
        _resolve_one(sample, f"image[{k}]", p, image_folder, allow_outside)
        for k, p in enumerate(sample.images)
    ]
    return video, images


# -- reading -----------------------------------------------------------------------------------


def read_record_objects(path: Path) -> list[Any]:
    """Parse a JSON-list or JSONL file into its top-level items (records not yet validated).

    Raises:
        RecordError: unreadable, empty or malformed file (the message names it).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"cannot read: {exc}", file=path) from exc
    stripped = text.lstrip()
    if not stripped:
        raise RecordError("file is empty (expected a JSON list or JSON lines)", file=path)
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", file=path
            ) from exc
        if not isinstance(data, list):  # pragma: no cover - "[" always parses to a list
            raise RecordError("top level is not a list", file=path)
        return data

    objects: list[Any] = []
    # "\n" only: a JSON string may hold U+2028 and others that str.splitlines also splits at.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError as exc:
            # Distinguish a pretty-printed single JSON document from a broken JSONL line.
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                raise RecordError(
                    f"malformed JSON at line {lineno}, column {exc.colno}: {exc.msg}", file=path
                ) from exc
            raise RecordError(
                f"top level is a JSON {type(whole).__name__}, expected a list of samples or JSON lines",
                file=path,
            ) from exc
    if len(objects) == 1 and not isinstance(objects[0], dict):
        raise RecordError(
            f"top level is a JSON {type(objects[0]).__name__}, expected a list of samples or JSON lines",
            file=path,
        )
    return objects


def _parse_sample(obj: Any, path: Path, index: int, require_answer: bool) -> Sample:
    """Validate one record and build its :class:`Sample`."""
    if not isinstance(obj, dict):
        raise RecordError(
            f"sample is a JSON {type(obj).__name__}, expected an object", file=path, index=index
        )

    raw_id = obj.get("id")
    if raw_id is None:
        sample_id = f"{path.name}:{index}"
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise RecordError(
            f"id must be a string or an integer, got {type(raw_id).__name__}",
            file=path,
            index=index,
            field="id",
        )
    else:
        sample_id = str(raw_id)

    def error(reason: str, fld: str | None, kind: str | None = None) -> RecordError:
        return RecordError(reason, file=path, index=index, sample_id=sample_id, field=fld, kind=kind)

    video = _parse_video(obj, error)
    images = _parse_images(obj, error)
    turns = _parse_turns(obj, error, require_answer)
    turns = _check_placeholders(turns, video, images, error)
    return Sample(
        id=sample_id,
        video=video,
        images=images,
        conversations=tuple(turns),
        source=path,
        index=index,
        raw=obj,
    )


def _parse_video(obj: dict, error: _ErrorFn) -> str | None:
    if "video" not in obj or obj["video"] is None:
        return None
    value = obj["video"]
    if isinstance(value, list):
        if len(value) > 1:
            raise error(f"more than one video ({len(value)}); a sample carries at most one", "video")
        if not value:
            raise error("empty list", "video")
        value = value[0]
    if not isinstance(value, str) or not value:
        raise error(f"must be a non-empty string path, got {value!r}", "video")
    return value


def _parse_images(obj: dict, error: _ErrorFn) -> tuple[str, ...]:
    if "image" not in obj or obj["image"] is None:
        return ()
    value = obj["image"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise error(f"must be a path or a non-empty list of paths, got {value!r}", "image")
    for k, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise error(f"must be a non-empty string path, got {item!r}", f"image[{k}]")
    return tuple(items)


def _parse_turns(obj: dict, error: _ErrorFn, require_answer: bool) -> list[Turn]:
    convs = obj.get("conversations")
    if convs is None:
        raise error("missing", "conversations")
    if not isinstance(convs, list) or not convs:
        raise error(f"must be a non-empty list of turns, got {convs!r:.60}", "conversations")
    turns: list[Turn] = []
    for k, turn in enumerate(convs):
        fld = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise error(f"turn is a JSON {type(turn).__name__}, expected an object", fld)
        role, value = turn.get("from"), turn.get("value")
        if role == "system" and k == 0:
            pass
        elif role not in ROLES:
            raise error(
                f"'from' is {role!r}; expected 'human' or 'gpt' (or 'system' as the first turn)",
                f"{fld}.from",
            )
        if not isinstance(value, str):
            raise error(f"'value' must be a string, got {type(value).__name__}", f"{fld}.value")
        if not value and role != "system":
            raise error("'value' is empty", f"{fld}.value")
        turns.append(Turn(role, value))
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise error("no human/gpt turns after the system turn", "conversations")
    for k, turn in enumerate(body):
        expected = ROLES[k % 2]
        if turn.role != expected:
            pos = k + (len(turns) - len(body))
            raise error(
                f"turn {pos} is from {turn.role!r}, expected {expected!r} (turns alternate human/gpt starting with human)",
                f"conversations[{pos}].from",
            )
    if require_answer and body[-1].role != "gpt":
        raise error("the last turn must be from 'gpt' (the answer to train on)", "conversations")
    return turns


def _check_placeholders(
    turns: list[Turn], video: str | None, images: tuple[str, ...], error: _ErrorFn
) -> list[Turn]:
    """Check placeholder counts against the media; prepend missing ones to the first human turn."""
    n_video = n_image = 0
    for k, turn in enumerate(turns):
        nv, ni = turn.value.count(VIDEO_PLACEHOLDER), turn.value.count(IMAGE_PLACEHOLDER)
        if turn.role != "human" and (nv or ni):
            raise error(
                "media placeholders may only appear in human turns",
                f"conversations[{k}].value",
                PLACEHOLDER_MISMATCH,
            )
        n_video += nv
        n_image += ni
    want_video = int(video is not None)
    if n_video and n_video != want_video:
        what = "no video is given" if video is None else "the sample has one video"
        raise error(
            f"{n_video} {VIDEO_PLACEHOLDER} placeholder(s) but {what}", "conversations", PLACEHOLDER_MISMATCH
        )
    if n_image and n_image != len(images):
        raise error(
            f"{n_image} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) given",
            "conversations",
            PLACEHOLDER_MISMATCH,
        )
    prefix = (VIDEO_PLACEHOLDER + "\n") * (want_video if n_video == 0 else 0)
    prefix += (IMAGE_PLACEHOLDER + "\n") * (len(images) if n_image == 0 else 0)
    if not prefix:
        return turns
    first = next(k for k, t in enumerate(turns) if t.role == "human")
    out = list(turns)
    out[first] = Turn("human", prefix + turns[first].value)
    return out


def _check_duplicates(samples: list[Sample], mode: str) -> tuple[list[Sample], list[RecordError]]:
    """Warn about repeated ids, or (mode "error") turn each repeat into an error and drop it."""
    seen: dict[str, Sample] = {}
    kept: list[Sample] = []
    dups: list[tuple[Sample, Sample]] = []
    for s in samples:
        if s.id in seen:
            dups.append((seen[s.id], s))
            if mode == "error":
                continue
        else:
            seen[s.id] = s
        kept.append(s)
    if not dups:
        return samples, []
    if mode == "error":
        errors = [
            RecordError(
                f"duplicate id (first seen at sample {first.index} of {first.source})",
                file=again.source,
                index=again.index,
                sample_id=again.id,
                field="id",
                kind="duplicate_id",
            )
            for first, again in dups
        ]
        return kept, errors
    first, again = dups[0]
    detail = f"id {first.id!r} at {first.source}:{first.index} and {again.source}:{again.index}"
    warnings.warn(f"{len(dups)} duplicate sample id(s), first: {detail}", UserWarning, stacklevel=4)
    return kept, []


def _resolve_one(
    sample: Sample, fld: str, value: str, folder: str | Path | None, allow_outside: bool
) -> Path:
    def error(reason: str) -> RecordError:
        return RecordError(
            reason, file=sample.source, index=sample.index, sample_id=sample.id, field=fld, kind="bad_path"
        )

    rel = Path(value)
    if rel.is_absolute():
        if not allow_outside:
            raise error(f"absolute path {value!r} is not allowed (paths are relative to their folder)")
        return rel
    if folder is None:
        kind = "video" if fld == "video" else "image"
        raise error(f"{value!r} is relative but no {kind} folder was given (--{kind}_folder)")
    base = Path(folder)
    joined = base / rel
    if not allow_outside:
        root = base.resolve()
        target = joined.resolve()
        if not target.is_relative_to(root):
            raise error(f"{value!r} resolves to {target}, outside the folder {root}")
    return joined
