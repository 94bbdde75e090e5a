"""The web UI's Data tab without the UI: `vidlora check` on a dataset, and one sample as the model gets it.

Everything goes through what training uses: the flags through `vidlora check`'s parser, the
processor and tokenizer through :func:`vidlora.check.data_processor`, the report through
:func:`vidlora.data.check.run_check`, a sample's validation through
:func:`~vidlora.data.dataset.prepare_sample`, its ids and labels through ``Processor.tokenize`` and
its frames through the loaders training reads pixels with — shown un-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vidlora.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vidlora.data.tokenize import IGNORE_INDEX, MediaTokenCounts
from vidlora.errors import NotFoundError
from vidlora.model.tokenizer import MediaTokenIds

#: Labels of :func:`token_segments`' pieces (None: in the prompt, not trained).
TRAINED = "trained"
MEDIA = "media"


def check_argv(model: str, data_path: str, video_folder: str = "", image_folder: str = "") -> list[str]:
    """`vidlora check`'s arguments for the tab's fields (empty fields left out)."""
    argv = ["--model_name_or_path", model.strip() or "tiny", "--data_path", *data_path.split()]
    for flag, value in (("--video_folder", video_folder), ("--image_folder", image_folder)):
        if value.strip():
            argv += [flag, value.strip()]
    return argv


def run_data_check(argv: Sequence[str]) -> tuple[str, list[str], dict[str, Any]]:
    """`vidlora check` on ``argv``: the printed report, every sample id (in order), the report itself."""
    from vidlora.args import media_folders, parse_check_args
    from vidlora.check import data_processor
    from vidlora.data.check import format_report, run_check
    from vidlora.data.dataset import read_samples

    model_args, data_args, _ = parse_check_args(list(argv))
    tokenizer, processor = data_processor(model_args, data_args)
    paths = list(data_args.data_path or [])
    report = run_check(
        paths, processor, tokenizer, media_folders(data_args), decode_timeout=data_args.decode_timeout,
        progress=False,
    )  # fmt: skip
    samples, _ = read_samples(paths)
    return format_report(report), [s.id for s in samples], report


def token_segments(
    input_ids: Sequence[int],
    labels: Sequence[int],
    decode: Any,
    media_ids: MediaTokenIds,
    counts: MediaTokenCounts,
) -> list[tuple[str, str | None]]:
    """A tokenized sample as (text, label) pieces for highlighting: runs of trained / untrained text
    tokens decoded together (label :data:`TRAINED` or None), and each expanded media placeholder as one
    ``<video>`` / ``<image>`` piece (label :data:`MEDIA`) however many positions it fills."""
    media = {
        media_ids.video: (VIDEO_PLACEHOLDER, counts.video),
        media_ids.image: (IMAGE_PLACEHOLDER, counts.image),
    }
    pieces: list[tuple[str, str | None]] = []
    run: list[int] = []
    run_label: str | None = None

    def flush() -> None:
        if run:
            pieces.append((decode(run), run_label))
            run.clear()

    at = 0
    while at < len(input_ids):
        token = input_ids[at]
        if token in media:
            flush()
            name, size = media[token]
            pieces.append((name, MEDIA))
            at += max(size, 1)
            continue
        label = TRAINED if labels[at] != IGNORE_INDEX else None
        if label != run_label:
            flush()
            run_label = label
        run.append(token)
        at += 1
    flush()
    return pieces


def unnormalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The towers' normalised input ``[..., 3, S, S]`` back as uint8 ``[..., S, S, 3]`` for display."""
    shape = [1] * (pixels.ndim - 3) + [3, 1, 1]
    restored = pixels.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    array = (restored.clamp(0, 1) * 255).round().to(torch.uint8)
    return array.movedim(-3, -1).numpy()


@dataclass
class SampleView:
    """One sample as training reads it: its frames and images (as the towers get them), the
    highlighted prompt, and the problems training would raise."""

    frames: list[np.ndarray]
    images: list[np.ndarray]
    segments: list[tuple[str, str | None]]
    num_tokens: int
    num_trained: int
    problems: list[str]


def sample_view(argv: Sequence[str], sample_id: str) -> SampleView:
    """The view of sample ``sample_id`` of the dataset ``argv`` (`vidlora check`'s flags) names.

    Raises:
        NotFoundError: no valid record has that id.
    """
    from vidlora.args import media_folders, parse_check_args
    from vidlora.check import data_processor
    from vidlora.data.dataset import prepare_sample, read_samples
    from vidlora.data.frame_cache import image_pixels, video_pixels
    from vidlora.data.tokenize import TokenizationError
    from vidlora.model.tokenizer import media_token_ids

    model_args, data_args, _ = parse_check_args(list(argv))
    tokenizer, processor = data_processor(model_args, data_args)
    samples, _ = read_samples(list(data_args.data_path or []))
    sample = next((s for s in samples if s.id == sample_id), None)
    if sample is None:
        raise NotFoundError(f"no valid sample with id {sample_id!r} in {' '.join(data_args.data_path or [])}")
    prepared = prepare_sample(sample, processor, tokenizer, media_folders(data_args))
    problems = [p.format() for p in prepared.problems]
    spec = processor.pixel_spec
    frames: list[np.ndarray] = []
    images: list[np.ndarray] = []
    try:
        if prepared.video is not None and prepared.video.is_file():
            pixels = video_pixels(processor, prepared.video, None, timeout_s=data_args.decode_timeout)
            frames = list(unnormalise(pixels, spec.mean, spec.std))
        images = [
            unnormalise(image_pixels(processor, p, None), spec.mean, spec.std)
            for p in prepared.images
            if p.is_file()
        ]
    except (OSError, ValueError, TimeoutError) as err:  # MediaError is a ValueError
        problems.append(str(err))
    try:
        tokenized = processor.tokenize(sample, tokenizer)
    except TokenizationError as err:
        return SampleView(frames, images, [], 0, 0, [*problems, str(err)])

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    segments = token_segments(
        tokenized.input_ids, tokenized.labels, decode, media_token_ids(tokenizer), processor.counts
    )
    return SampleView(frames, images, segments, len(tokenized.input_ids), tokenized.num_trained, problems)
