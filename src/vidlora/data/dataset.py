"""The supervised training dataset: :class:`Sample` -> ``{id, input_ids, labels, pixel_values_*}``.

Construction is eager for everything cheap and lazy for decoding:

* at construction every sample's media paths are resolved (paths escaping their folder are
  refused), the files are ``stat``-ed (missing / empty / not a regular file) and the
  conversation is tokenised once, so ``modality_lengths`` (the grouped sampler's input) is known
  and records, path and tokenisation problems surface before training starts, all at once;
* videos and images are decoded in ``__getitem__`` (only the sampled frames), and the ids are
  tokenised again there — tokenisation is deterministic and cheap, and keeping expanded ids for
  every sample would cost gigabytes on a 7B-sized data set (2056 ids per video).

Bad samples. Without ``skip_bad_samples`` any problem found at construction raises
:class:`BadSamplesError` listing every problem (sample id, record file, media file, reason).
With it, those samples are dropped and listed in :attr:`SupervisedDataset.skipped`. A file that
exists but cannot be decoded (truncated since, an unreadable stream, a decode over
``decode_timeout``, a crashed decoder) is only found in ``__getitem__``. There the dataset never
substitutes another sample (the original did, training on data nobody asked for) nor returns
fewer frames: it raises :class:`SampleError` naming the sample id, its index, the record file and
the media file, or, with ``mark_failed_items`` (training), returns the problem as a marker item
that the collator leaves out of its batch, so that the training loop, in the main process, stops
with that error or skips and counts the sample (``--skip_bad_samples``, up to
``--max_bad_sample_fraction``; :class:`~vidlora.training.callbacks.BadSampleGuard`). The epoch's
length and every other sample's place in it stay as they were. Training reads videos through
:class:`~vidlora.data.watchdog.DecodeWatchdog`, so a decoder stuck inside FFmpeg or crashing
costs that one sample too. ``vidlora check`` decodes every sample up front and lists them all.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vidlora.data.collate import BAD_SAMPLE_KEY
from vidlora.data.frame_cache import FrameCache, image_pixels, video_pixels
from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, MediaError, VideoReader, read_video
from vidlora.data.processor import Processor
from vidlora.data.records import RecordError, Sample, read_records, resolve_media
from vidlora.data.tokenize import TokenizationError
from vidlora.data.watchdog import DecoderCrashed
from vidlora.errors import UsageError, VidloraError

ADVICE = "run `vidlora check` with the same arguments to list every unreadable sample before training"


class ProblemKind(str, Enum):
    """Why a sample cannot be used. The value is the stable name written in reports."""

    INVALID_FILE = "invalid_file"  # a whole record file is unreadable / not JSON
    INVALID_RECORD = "invalid_record"  # a record's fields or conversation are malformed
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # <video>/<image> counts differ from the media
    BAD_PATH = "bad_path"  # absolute / escaping path, or no folder given for a relative path
    MISSING_FILE = "missing_file"
    EMPTY_FILE = "empty_file"
    NOT_A_FILE = "not_a_file"  # a directory or special file where media was expected
    UNREADABLE_MEDIA = "unreadable_media"  # truncated, corrupt, or not a video/image at all
    DECODE_TIMEOUT = "decode_timeout"
    DECODER_CRASHED = "decoder_crashed"  # the decoder process died reading the file (e.g. a crash in FFmpeg)
    TOKENIZATION = "tokenization"  # template does not fit, or a length limit would cut media / all answers
    DUPLICATE_ID = "duplicate_id"  # only with duplicate_ids="error"
    DISABLED_MODALITY = "disabled_modality"  # a video/image sample while --X does not enable that modality


_KINDS = frozenset(k.value for k in ProblemKind)


@dataclass(frozen=True)
class SampleProblem:
    """One problem with one sample.

    Attributes:
        kind: the category (:class:`ProblemKind`).
        reason: human-readable detail.
        sample_id: the record's id (None when the whole record file is unreadable).
        index: the record's position in its file (0-based), when known.
        source: the record file (JSON/JSONL).
        file: the media file concerned, if any.
    """

    kind: ProblemKind
    reason: str
    sample_id: str | None = None
    index: int | None = None
    source: str | None = None
    file: str | None = None

    def format(self) -> str:
        """One line: ``id 'x' (train.json #3), file videos/a.mp4: [missing_file] reason``."""
        parts = []
        if self.sample_id is not None:
            parts.append(f"id {self.sample_id!r}")
        if self.source is not None:
            parts.append(f"({self.source}" + (f" #{self.index})" if self.index is not None else ")"))
        if self.file is not None:
            parts.append(f"file {self.file}")
        where = " ".join(parts) or "?"
        return f"{where}: [{self.kind.value}] {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used by ``vidlora check --report``)."""
        return {
            "id": self.sample_id,
            "index": self.index,
            "source": self.source,
            "file": self.file,
            "kind": self.kind.value,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleProblem:
        """The problem :meth:`to_dict` wrote (extra keys are ignored)."""
        return cls(
            ProblemKind(data["kind"]), data["reason"], data["id"], data["index"], data["source"], data["file"]
        )


class SampleError(VidloraError, ValueError):
    """A sample cannot be turned into a training item; the message names id, index and files."""

    def __init__(self, problem: SampleProblem, advice: str | None = ADVICE) -> None:
        self.problem = problem
        message = f"sample {problem.format()}"
        super().__init__(message + (f"\n  ({advice})" if advice else ""))


class BadSamplesError(VidloraError, ValueError):
    """Construction found bad samples and ``skip_bad_samples`` is off; lists every problem."""

    def __init__(self, problems: Sequence[SampleProblem], shown: int = 20, note: str | None = None) -> None:
        self.problems = list(problems)
        lines = [f"  - {p.format()}" for p in self.problems[:shown]]
        if len(self.problems) > shown:
            lines.append(f"  ... and {len(self.problems) - shown} more")
        advice = note or (
            "Fix them, or pass --skip_bad_samples True to drop (and count) them; "
            "`vidlora check` lists every problem including undecodable media."
        )
        super().__init__(
            f"{len(self.problems)} problem(s) with the data:\n" + "\n".join(lines) + "\n" + advice
        )


# -- reading records, problem by problem -------------------------------------------------------


def error_kind(err: RecordError, default: ProblemKind) -> ProblemKind:
    """The category a :class:`RecordError` names in ``kind``, or ``default`` when it names none."""
    return ProblemKind(err.kind) if err.kind in _KINDS else default


def record_problem(err: RecordError) -> SampleProblem:
    """Turn a :class:`RecordError` into a problem; its ``kind`` names the category."""
    return SampleProblem(
        error_kind(err, ProblemKind.INVALID_RECORD), err.reason, err.sample_id, err.index, str(err.file), None
    )


def read_samples(
    paths: Sequence[str | Path] | str | Path, duplicate_ids: Literal["warn", "error"] = "warn"
) -> tuple[list[Sample], list[SampleProblem]]:
    """Read record files collecting every invalid record (:func:`~vidlora.data.records.read_records`).

    Returns:
        ``(valid samples in file order, problems)``; an unreadable/non-JSON file is one
        ``invalid_file`` problem and contributes no samples.
    """
    samples, errors = read_records(paths, duplicate_ids=duplicate_ids)
    return samples, [record_problem(err) for err in errors]


# -- media ------------------------------------------------------------------------------------


def stat_problem(path: Path) -> tuple[ProblemKind, str] | None:
    """``(kind, reason)`` when ``path`` is missing, empty or not a regular file; None when it looks readable."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ProblemKind.MISSING_FILE, "file not found"
    except OSError as exc:
        return ProblemKind.MISSING_FILE, f"cannot stat: {exc}"
    if not Path(path).is_file():
        return ProblemKind.NOT_A_FILE, "not a regular file"
    if st.st_size == 0:
        return ProblemKind.EMPTY_FILE, "empty file"
    return None


def classify_media_error(path: Path, exc: BaseException) -> tuple[ProblemKind, str]:
    """Category and reason of a decode failure; the reason drops the leading ``"<path>: "``.

    The file is stat-ed again because it may have changed since the dataset was built.
    """
    reason = str(exc)
    prefix = f"{path}: "
    reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
    if isinstance(exc, TimeoutError):
        return ProblemKind.DECODE_TIMEOUT, reason
    if isinstance(exc, DecoderCrashed):
        return ProblemKind.DECODER_CRASHED, reason
    found = stat_problem(path)
    return (found[0] if found is not None else ProblemKind.UNREADABLE_MEDIA), reason


def record_field_path(sample: Sample, field: str | None) -> str | None:
    """The media path as written in the record for a RecordError field ("video" or "image[k]")."""
    if field == "video":
        return sample.video
    if field is not None and field.startswith("image[") and field.endswith("]"):
        k = int(field[len("image[") : -1])
        return sample.images[k] if k < len(sample.images) else None
    return None


# -- one sample, the way training reads it ---------------------------------------------------------


@dataclass(frozen=True)
class MediaFolders:
    """Where a dataset's relative media paths point (``--video_folder``, ``--image_folder``)."""

    video_folder: str | Path | None = None
    image_folder: str | Path | None = None
    allow_outside: bool = False


@dataclass
class PreparedSample:
    """What reading one sample the way training does found: its media, its lengths, its problems.

    ``video``/``images`` are resolved when the paths are valid (even if another check failed, so
    `vidlora check` can still decode them); the lengths are known when tokenization succeeded.
    """

    sample: Sample
    video: Path | None = None
    images: tuple[Path, ...] = ()
    text_length: int | None = None  # placeholders counted once, before truncation
    full_length: int | None = None  # media expanded, before truncation
    length: int | None = None  # media expanded, after truncation (what the model sees)
    problems: list[SampleProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def truncated(self) -> bool:
        return self.length is not None and self.full_length is not None and self.length < self.full_length

    def decodable_media(self) -> list[tuple[str, Path]]:
        """``("video" | "image", path)`` of each resolved media file no problem names: what is
        worth decoding (a file already found missing, empty or refused is reported as it is)."""
        failed = {p.file for p in self.problems if p.file is not None}
        media = [("video", self.video)] if self.video is not None else []
        media += [("image", path) for path in self.images]
        return [(kind, path) for kind, path in media if str(path) not in failed]

    @property
    def modality_length(self) -> int:
        """Expanded length, negated for text-only samples (the grouped sampler's input)."""
        assert self.length is not None
        return self.length if self.sample.has_media else -self.length


def prepare_sample(
    sample: Sample,
    processor: Processor,
    tokenizer: PreTrainedTokenizerBase,
    folders: MediaFolders,
    *,
    check_files: bool = True,
) -> PreparedSample:
    """Validate one sample as training does, without decoding: media accepted by the run, paths
    inside their folders, files present (``check_files``), tokenization within the length limits.

    Training refuses (or, asked to, skips) a sample with problems; `vidlora check` reports them.
    """
    prepared = PreparedSample(sample)

    def problem(kind: ProblemKind, reason: str, file: Path | str | None = None) -> None:
        prepared.problems.append(
            SampleProblem(
                kind, reason, sample.id, sample.index, str(sample.source), None if file is None else str(file)
            )
        )

    # A sample the run does not accept would still reach a tower (or find none): say so rather than
    # train on a modality the user switched off.
    refused = processor.refused_media(sample)
    if refused is not None:
        problem(ProblemKind.DISABLED_MODALITY, refused)
        return prepared
    try:
        video, images = resolve_media(
            sample, folders.video_folder, folders.image_folder, folders.allow_outside
        )
    except RecordError as err:
        problem(error_kind(err, ProblemKind.BAD_PATH), err.reason, record_field_path(sample, err.field))
    else:
        prepared.video, prepared.images = video, tuple(images)
        if check_files:
            for path in ([video] if video is not None else []) + list(images):
                found = stat_problem(path)
                if found is not None:
                    problem(found[0], found[1], path)
    try:
        tokenized = processor.tokenize(sample, tokenizer)
    except TokenizationError as err:
        problem(ProblemKind.TOKENIZATION, err.reason)
        prepared.text_length, prepared.full_length = err.text_length, err.full_length
    else:
        prepared.text_length, prepared.full_length = tokenized.text_length, tokenized.full_length
        prepared.length = len(tokenized.input_ids)
    return prepared


def prepare_samples(
    samples: Sequence[Sample],
    processor: Processor,
    tokenizer: PreTrainedTokenizerBase,
    folders: MediaFolders,
    *,
    check_files: bool = True,
) -> list[PreparedSample]:
    """:func:`prepare_sample` for every sample, in order (the dataset's construction-time pass).

    Picklable, so one rank of a multi-process launch can run it and hand the result to the others.
    """
    return [prepare_sample(s, processor, tokenizer, folders, check_files=check_files) for s in samples]


# -- the dataset ------------------------------------------------------------------------------


class SupervisedDataset(Dataset):
    """Training items built from validated samples (see the module docstring for error handling).

    Each item is a dict: ``id`` (str), ``input_ids`` and ``labels`` (1-D LongTensors of the
    expanded length), ``pixel_values_videos`` float32 ``[1, T, 3, S, S]`` when the sample has a
    video, ``pixel_values_images`` float32 ``[n_images, 3, S, S]`` when it has images (in record
    order: the k-th ``<image>`` in the text is the k-th listed image, the original's convention);
    absent keys mean no such media.

    Args:
        samples: validated records (:func:`read_samples`).
        processor: template, tokenization, media counts, pre-processing and length limits.
        tokenizer: a tokenizer with the media tokens.
        folders: where relative media paths point, and whether paths may leave those folders.
        decode_timeout: seconds allowed to read one video.
        skip_bad_samples: drop samples with construction-time problems (listed in ``skipped``)
            instead of raising :class:`BadSamplesError`. An unreadable record file, or every
            sample being bad, still raises.
        check_files: ``stat`` every media file at construction (cheap; turns missing/empty files
            into construction-time problems rather than mid-epoch errors).
        prior_problems: problems found while reading the records (:func:`read_samples`); they
            count as skipped samples, or raise, exactly like construction problems.
        frame_cache: read pixels from (and store them in) this cache instead of decoding every
            time; a file that fails to decode fails exactly as without it.
        prepared: the samples already validated and tokenized (:func:`prepare_samples`, e.g. by
            rank 0 of a launch); None prepares them here.
        video_reader: what decodes a video's frames: :func:`~vidlora.data.media.read_video` in this
            process, or a :class:`~vidlora.data.watchdog.DecodeWatchdog` (training's default).
        mark_failed_items: return ``{"id", BAD_SAMPLE_KEY: SampleProblem}`` for a sample that
            cannot be read instead of raising :class:`SampleError` (see the module docstring).

    Raises:
        BadSamplesError: problems found and ``skip_bad_samples`` is off.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        processor: Processor,
        tokenizer: PreTrainedTokenizerBase,
        folders: MediaFolders = MediaFolders(),
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        skip_bad_samples: bool = False,
        check_files: bool = True,
        prior_problems: Sequence[SampleProblem] = (),
        frame_cache: FrameCache | None = None,
        prepared: Sequence[PreparedSample] | None = None,
        video_reader: VideoReader = read_video,
        mark_failed_items: bool = False,
    ) -> None:
        self.processor = processor
        self.video_reader = video_reader
        self.mark_failed_items = mark_failed_items
        self.frame_cache = frame_cache
        self.tokenizer = tokenizer
        self.folders = folders
        self.decode_timeout = decode_timeout
        self.skip_bad_samples = skip_bad_samples
        if prepared is None:
            prepared = prepare_samples(samples, processor, tokenizer, folders, check_files=check_files)
        elif [p.sample for p in prepared] != list(samples):
            raise ValueError("`prepared` must hold one PreparedSample per sample, in order")
        problems = list(prior_problems)
        entries: list[PreparedSample] = []
        for entry in prepared:
            if entry.ok:
                entries.append(entry)
            problems += entry.problems
        # An unreadable record *file* is never skipped: it is a wrong path or a broken export,
        # and training on the remaining files would silently lose a whole part of the data.
        fatal = [p for p in problems if p.kind is ProblemKind.INVALID_FILE]
        if (problems and not skip_bad_samples) or fatal:
            raise BadSamplesError(problems if not skip_bad_samples else fatal)
        if not entries and problems:
            raise BadSamplesError(problems, note="every sample was skipped: nothing is left to train on")
        self._entries = entries
        #: Problems of the samples dropped at construction (empty unless ``skip_bad_samples``).
        self.skipped: list[SampleProblem] = problems

    @classmethod
    def from_paths(cls, data_paths: Sequence[str | Path] | str | Path, **kwargs: Any) -> SupervisedDataset:
        """Read record files (collecting invalid records) and build the dataset; ``kwargs`` as ``__init__``."""
        samples, problems = read_samples(data_paths)
        return cls(samples, prior_problems=problems, **kwargs)

    # -- Dataset protocol -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def samples(self) -> list[Sample]:
        """The kept samples, in dataset order."""
        return [e.sample for e in self._entries]

    @property
    def modality_lengths(self) -> list[int]:
        """Expanded lengths (text + media tokens), positive for multimodal, negative for text-only samples."""
        return [e.modality_length for e in self._entries]

    @property
    def lengths(self) -> list[int]:
        """Expanded lengths, unsigned."""
        return [abs(e.modality_length) for e in self._entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self._entries[index]
        try:
            return self._item(entry)
        except SampleError as err:
            if not self.mark_failed_items:
                raise
            return {"id": entry.sample.id, BAD_SAMPLE_KEY: err.problem}

    def _item(self, entry: PreparedSample) -> dict[str, Any]:
        sample = entry.sample
        # Tokenised again here: deterministic and cheap, and keeping expanded ids for every sample
        # would cost gigabytes on a 7B-sized data set (2056 ids per video).
        try:
            tokenized = self.processor.tokenize(sample, self.tokenizer)
        except TokenizationError as err:  # deterministic, so only if the tokenizer changed underneath
            raise SampleError(self._problem(entry, ProblemKind.TOKENIZATION, err.reason, None), None) from err
        item: dict[str, Any] = {
            "id": sample.id,
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
        }
        if entry.video is not None:
            item["pixel_values_videos"] = self._decode(entry, entry.video, self._load_video).unsqueeze(0)
        if entry.images:
            item["pixel_values_images"] = torch.stack(
                [self._decode(entry, p, self._load_image) for p in entry.images]
            )
        return item

    def _load_video(self, path: Path) -> torch.Tensor:
        return video_pixels(
            self.processor, path, self.frame_cache, timeout_s=self.decode_timeout, read=self.video_reader
        )

    def _load_image(self, path: Path) -> torch.Tensor:
        return image_pixels(self.processor, path, self.frame_cache)

    def _problem(
        self, entry: PreparedSample, kind: ProblemKind, reason: str, file: Path | None
    ) -> SampleProblem:
        s = entry.sample
        return SampleProblem(kind, reason, s.id, s.index, str(s.source), None if file is None else str(file))

    def _decode(
        self, entry: PreparedSample, path: Path, load: Callable[[Path], torch.Tensor]
    ) -> torch.Tensor:
        try:
            return load(path)
        except (MediaError, TimeoutError, ValueError) as exc:
            # ValueError covers pre-processing refusals (e.g. an image array of the wrong shape).
            kind, reason = classify_media_error(path, exc)
            raise SampleError(self._problem(entry, kind, reason, path)) from exc

    # -- subsets ----------------------------------------------------------------------------

    def subset(self, indices: Sequence[int]) -> SupervisedDataset:
        """A dataset over ``indices`` of this one, sharing its settings; no re-tokenisation.

        The subset's ``skipped`` is empty: skips belong to the dataset that was read.
        """
        child = copy.copy(self)
        child._entries = [self._entries[i] for i in indices]
        child.skipped = []
        return child


# -- eval hold-out ----------------------------------------------------------------------------


def split_indices(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval index split: ``max(1, round(n * ratio))`` eval indices, both sorted.

    Raises:
        ValueError: ratio outside (0, 1), or fewer than 2 samples (both splits must be non-empty).
    """
    if not 0 < ratio < 1:
        raise UsageError(f"eval hold-out ratio must be in (0, 1), got {ratio}")
    n_eval = max(1, round(n * ratio))
    if n_eval >= n:
        raise UsageError(
            f"cannot hold out {n_eval} of {n} sample(s) for evaluation (ratio {ratio}) and keep any for "
            "training; give evaluation data of its own (--eval_data_path)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[n_eval:]), sorted(int(i) for i in order[:n_eval])


def train_eval_split(
    dataset_or_records: SupervisedDataset | Sequence[Sample], ratio: float, seed: int
) -> tuple[Any, Any]:
    """Hold out ``ratio`` of the data (at least one sample) for evaluation, deterministically per ``seed``.

    Both parts keep the original order. Returns two :class:`SupervisedDataset` subsets for a
    dataset, or two lists for a sequence of samples.
    """
    train_idx, eval_idx = split_indices(len(dataset_or_records), ratio, seed)
    if isinstance(dataset_or_records, SupervisedDataset):
        return dataset_or_records.subset(train_idx), dataset_or_records.subset(eval_idx)
    return [dataset_or_records[i] for i in train_idx], [dataset_or_records[i] for i in eval_idx]
