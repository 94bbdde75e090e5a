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
exists but cannot be decoded is only found in ``__getitem__``; dropping a sample there would
change the epoch's length and batch composition mid-run (and silently substituting another
sample, as the original did, trains on data nobody asked for), so a decode failure *always*
raises :class:`SampleError` naming the sample id, its index, the record file and the media file,
with the advice to run ``vidlora check`` — which decodes every sample up front and lists them all.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vidlora.data.media import MediaError, read_image, read_video
from vidlora.data.records import RecordError, Sample, read_records, resolve_media
from vidlora.data.templates import Template, get_template
from vidlora.data.tokenize import MediaTokenCounts, TokenizationError, TokenizedSample, tokenize_sample
from vidlora.data.transforms import PixelSpec, preprocess_image, preprocess_video
from vidlora.errors import VidloraError
from vidlora.model.tokenizer import MediaTokenIds, media_token_ids

#: ``--image_aspect_ratio`` values -> :func:`preprocess_image` ``aspect`` ("square" = plain resize + crop).
ASPECT_MODES = {"pad": "pad", "square": "resize", "resize": "resize"}

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
    TOKENIZATION = "tokenization"  # template does not fit, or a length limit would cut media / all answers
    DUPLICATE_ID = "duplicate_id"  # only with duplicate_ids="error"
    DISABLED_MODALITY = "disabled_modality"  # a video/image sample while --X does not enable that modality


_KINDS = frozenset(k.value for k in ProblemKind)

#: Media modalities a dataset can accept (``--X Video Image``, lower-cased).
MEDIA_MODALITIES: tuple[str, ...] = ("video", "image")


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
    found = stat_problem(path)
    return (found[0] if found is not None else ProblemKind.UNREADABLE_MEDIA), reason


def load_video(path: Path, num_frames: int, spec: PixelSpec, timeout_s: float) -> torch.Tensor:
    """Decode ``num_frames`` frames and pre-process them: float32 ``[T, 3, S, S]``."""
    frames, _ = read_video(path, num_frames, timeout_s=timeout_s)
    return preprocess_video(frames, spec)


def load_image(path: Path, spec: PixelSpec, aspect: str) -> torch.Tensor:
    """Read and pre-process one image: float32 ``[3, S, S]``."""
    return preprocess_image(read_image(path), spec, aspect=aspect)


def record_field_path(sample: Sample, field: str | None) -> str | None:
    """The media path as written in the record for a RecordError field ("video" or "image[k]")."""
    if field == "video":
        return sample.video
    if field is not None and field.startswith("image[") and field.endswith("]"):
        k = int(field[len("image[") : -1])
        return sample.images[k] if k < len(sample.images) else None
    return None


# -- the dataset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A sample that passed construction, with its resolved media and its signed length."""

    sample: Sample
    video: Path | None
    images: tuple[Path, ...]
    modality_length: int


class SupervisedDataset(Dataset):
    """Training items built from validated samples (see the module docstring for error handling).

    Each item is a dict: ``id`` (str), ``input_ids`` and ``labels`` (1-D LongTensors of the
    expanded length), ``pixel_values_videos`` float32 ``[1, T, 3, S, S]`` when the sample has a
    video, ``pixel_values_images`` float32 ``[n_images, 3, S, S]`` when it has images (in record
    order: the k-th ``<image>`` in the text is the k-th listed image, the original's convention);
    absent keys mean no such media.

    Args:
        samples: validated samples (from :func:`load_records` / :func:`read_samples`).
        tokenizer: a tokenizer with the media tokens.
        template: a :class:`Template` or its registered name (``--version``).
        media_counts: tokens per image / per video of the model.
        pixel_spec: crop size and normalisation of the towers.
        num_frames: frames decoded per video (must match ``media_counts.video``'s assumption).
        image_aspect_ratio: ``pad`` (the original's default) or ``square`` (resize + crop).
        video_folder / image_folder: folders that record paths are relative to.
        allow_outside: accept absolute paths and paths escaping their folder.
        decode_timeout: seconds allowed to read one video.
        model_max_length / tokenizer_model_max_length: length limits (see :mod:`vidlora.data.tokenize`).
        skip_bad_samples: drop samples with construction-time problems (listed in ``skipped``)
            instead of raising :class:`BadSamplesError`. An unreadable record file, or every
            sample being bad, still raises.
        check_files: ``stat`` every media file at construction (cheap; turns missing/empty files
            into construction-time problems rather than mid-epoch errors).
        prior_problems: problems found while reading the records (:func:`read_samples`); they
            count as skipped samples, or raise, exactly like construction problems.

    Raises:
        BadSamplesError: problems found and ``skip_bad_samples`` is off.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        tokenizer: PreTrainedTokenizerBase,
        template: Template | str,
        media_counts: MediaTokenCounts,
        pixel_spec: PixelSpec,
        num_frames: int = 8,
        image_aspect_ratio: str = "pad",
        video_folder: str | Path | None = None,
        image_folder: str | Path | None = None,
        allow_outside: bool = False,
        decode_timeout: float = 60.0,
        model_max_length: int | None = None,
        tokenizer_model_max_length: int | None = None,
        skip_bad_samples: bool = False,
        check_files: bool = True,
        prior_problems: Sequence[SampleProblem] = (),
        modalities: Collection[str] = MEDIA_MODALITIES,
    ) -> None:
        unknown = sorted(set(modalities) - set(MEDIA_MODALITIES))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MEDIA_MODALITIES)}")
        if image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(
                f"image_aspect_ratio must be one of {sorted(ASPECT_MODES)}, got {image_aspect_ratio!r}"
            )
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.media_counts = media_counts
        self.media_ids: MediaTokenIds = media_token_ids(tokenizer)
        self.pixel_spec = pixel_spec
        self.num_frames = num_frames
        self.image_aspect_ratio = image_aspect_ratio
        self.video_folder = video_folder
        self.image_folder = image_folder
        self.allow_outside = allow_outside
        self.decode_timeout = decode_timeout
        self.model_max_length = model_max_length
        self.tokenizer_model_max_length = tokenizer_model_max_length
        self.skip_bad_samples = skip_bad_samples
        self.modalities = frozenset(modalities)

        problems = list(prior_problems)
        entries: list[_Entry] = []
        for sample in samples:
            entry, sample_problems = self._prepare(sample, check_files)
            if entry is not None:
                entries.append(entry)
            problems += sample_problems
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

    @classmethod
    def from_args(
        cls,
        model_args: Any,
        data_args: Any,
        training_args: Any,
        tokenizer: PreTrainedTokenizerBase,
        model_config: Any,
        *,
        eval_split: bool = False,
    ) -> SupervisedDataset:
        """Build the training (or, with ``eval_split``, the ``--eval_data_path``) dataset from the
        argument dataclasses of :mod:`vidlora.args` and the model's config.

        Raises:
            ValueError: ``--num_frames`` differs from the video tower's fixed frame count, or the
                towers disagree on the input size.
        """
        paths = data_args.eval_data_path if eval_split else data_args.data_path
        if not paths:
            raise ValueError("--eval_data_path is not set" if eval_split else "--data_path is not set")
        return cls.from_paths(
            paths,
            tokenizer=tokenizer,
            template=model_args.version,
            media_counts=MediaTokenCounts.from_config(model_config),
            pixel_spec=pixel_spec_from_config(model_config),
            num_frames=frames_from_config(model_config, model_args.num_frames),
            image_aspect_ratio=data_args.image_aspect_ratio,
            video_folder=data_args.video_folder,
            image_folder=data_args.image_folder,
            allow_outside=data_args.allow_media_outside_folder,
            decode_timeout=data_args.decode_timeout,
            model_max_length=training_args.model_max_length,
            tokenizer_model_max_length=training_args.tokenizer_model_max_length,
            skip_bad_samples=data_args.skip_bad_samples,
            modalities=tuple(x.lower() for x in model_args.X),
        )

    # -- construction helpers -------------------------------------------------------------

    def tokenize(self, sample: Sample) -> TokenizedSample:
        """Tokenise one sample with this dataset's template, counts and length limits."""
        return tokenize_sample(
            sample,
            self.tokenizer,
            self.template,
            self.media_counts,
            model_max_length=self.model_max_length,
            tokenizer_model_max_length=self.tokenizer_model_max_length,
            media_ids=self.media_ids,
        )

    def _prepare(self, sample: Sample, check_files: bool) -> tuple[_Entry | None, list[SampleProblem]]:
        def problem(kind: ProblemKind, reason: str, file: Path | str | None = None) -> SampleProblem:
            return SampleProblem(
                kind, reason, sample.id, sample.index, str(sample.source), None if file is None else str(file)
            )

        # A sample the run's --X leaves out would still reach a tower (every preset builds both):
        # say so rather than train on a modality the user switched off.
        carried = {"video": [sample.video] if sample.video is not None else [], "image": list(sample.images)}
        disabled = [m for m in MEDIA_MODALITIES if carried[m] and m not in self.modalities]
        if disabled:
            enabled = " ".join(m.capitalize() for m in MEDIA_MODALITIES if m in self.modalities) or "no media"
            what = ", ".join(f"{m} {', '.join(carried[m])}" for m in disabled)
            return None, [problem(ProblemKind.DISABLED_MODALITY, f"carries {what} but --X enables {enabled}")]
        problems: list[SampleProblem] = []
        try:
            video, images = resolve_media(sample, self.video_folder, self.image_folder, self.allow_outside)
        except RecordError as err:
            kind = error_kind(err, ProblemKind.BAD_PATH)
            return None, [problem(kind, err.reason, record_field_path(sample, err.field))]
        if check_files:
            for path in ([video] if video is not None else []) + images:
                found = stat_problem(path)
                if found is not None:
                    problems.append(problem(found[0], found[1], path))
        try:
            tokenized = self.tokenize(sample)
        except TokenizationError as err:
            problems.append(problem(ProblemKind.TOKENIZATION, err.reason))
        if problems:
            return None, problems
        length = len(tokenized.input_ids)
        signed = length if sample.has_media else -length
        return _Entry(sample, video, tuple(images), signed), []

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
        sample = entry.sample
        try:
            tokenized = self.tokenize(sample)
        except TokenizationError as err:  # deterministic, so only if the tokenizer changed underneath
            raise SampleError(self._problem(entry, ProblemKind.TOKENIZATION, err.reason, None), None) from err
        item: dict[str, Any] = {
            "id": sample.id,
            "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokenized.labels, dtype=torch.long),
        }
        if entry.video is not None:
            video = self._decode(
                entry,
                entry.video,
                lambda p: load_video(p, self.num_frames, self.pixel_spec, self.decode_timeout),
            )
            item["pixel_values_videos"] = video.unsqueeze(0)
        if entry.images:
            aspect = ASPECT_MODES[self.image_aspect_ratio]
            item["pixel_values_images"] = torch.stack(
                [
                    self._decode(entry, p, lambda q: load_image(q, self.pixel_spec, aspect))
                    for p in entry.images
                ]
            )
        return item

    def _problem(self, entry: _Entry, kind: ProblemKind, reason: str, file: Path | None) -> SampleProblem:
        s = entry.sample
        return SampleProblem(kind, reason, s.id, s.index, str(s.source), None if file is None else str(file))

    def _decode(self, entry: _Entry, path: Path, load: Any) -> torch.Tensor:
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


# -- config helpers ---------------------------------------------------------------------------


def pixel_spec_from_config(config: Any) -> PixelSpec:
    """The :class:`PixelSpec` of a model config's towers (CLIP mean/std, tower input size).

    Raises:
        ValueError: the image and video towers take different input sizes (one spec serves both).
    """
    sizes = {
        c.image_size
        for c in (getattr(config, "image_config", None), getattr(config, "video_config", None))
        if c is not None
    }
    if len(sizes) != 1:
        raise ValueError(f"cannot derive one pixel size from the towers' image sizes {sorted(sizes)}")
    return PixelSpec(image_size=sizes.pop())


def frames_from_config(config: Any, requested: int | None) -> int:
    """Frames per video: the video tower's fixed count; ``requested`` must agree when given.

    Raises:
        ValueError: ``requested`` differs from the tower's temporal embedding length.
    """
    video_config = getattr(config, "video_config", None)
    if video_config is None:
        return requested if requested is not None else 8
    fixed = int(video_config.num_frames)
    if requested is not None and requested != fixed:
        raise ValueError(
            f"--num_frames {requested}: the model's video tower is built for {fixed} frames "
            f"(its temporal embedding and video token count are fixed); pass --num_frames {fixed}"
        )
    return fixed


# -- eval hold-out ----------------------------------------------------------------------------


def split_indices(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval index split: ``max(1, round(n * ratio))`` eval indices, both sorted.

    Raises:
        ValueError: ratio outside (0, 1), or fewer than 2 samples (both splits must be non-empty).
    """
    if not 0 < ratio < 1:
        raise ValueError(f"eval hold-out ratio must be in (0, 1), got {ratio}")
    n_eval = max(1, round(n * ratio))
    if n_eval >= n:
        raise ValueError(
            f"cannot hold out {n_eval} of {n} sample(s) for evaluation and keep any for training"
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
