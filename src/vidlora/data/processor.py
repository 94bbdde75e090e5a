"""The one object that turns a sample into ids, labels and pixels, saved with every checkpoint.

A :class:`Processor` holds every setting that decides what the model sees: the template, how the
prompt is tokenized around media (the model's ``prompt_tokenization``), the media token counts
(derived once from the towers, 0 for an absent tower), frames per video, the tower input size,
image aspect handling, the length limits, the tower feature layer and the modalities a run
accepts. Training builds it once (:meth:`Processor.for_model`) and writes it into every
checkpoint; inference, ``vidlora check`` and ``predict`` read it back, so none of them can
disagree with training about a single field.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, VideoReader, read_image, read_video
from vidlora.data.records import Sample
from vidlora.data.templates import Message, get_template
from vidlora.data.tokenize import MediaTokenCounts, TokenizedSample, tokenize_prompt, tokenize_sample
from vidlora.data.transforms import PixelSpec, preprocess_image, preprocess_video
from vidlora.errors import UsageError
from vidlora.model.configuration import PROMPT_TOKENIZATIONS, ConfigOverrides

#: ``--image_aspect_ratio`` values -> :func:`preprocess_image` ``aspect`` ("square" = plain resize + crop).
ASPECT_MODES = {"pad": "pad", "square": "resize"}
#: Media modalities a run can accept (``--X Video Image``, lower-cased).
MEDIA_MODALITIES: tuple[str, ...] = ("video", "image")
# The data settings' defaults, here once (the argument classes take theirs from these).
DEFAULT_TEMPLATE = "v1"
DEFAULT_ASPECT_RATIO = "pad"
DEFAULT_MODEL_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Processor:
    """Everything that turns a sample into what the model sees (see the module docstring).

    Attributes:
        template: prompt template name (``--version``).
        prompt_tokenization: ``split_at_media`` or ``whole_prompt`` (:mod:`vidlora.data.tokenize`).
        image_size: side of the square crop both towers take.
        image_tokens / video_tokens: feature tokens per image / per video; 0 without that tower.
        num_frames: frames sampled per video; None without a video tower.
        image_aspect_ratio: ``pad`` (pad to a square with the mean colour) or ``square``.
        model_max_length: bound on text tokens (each placeholder counts once); None: no bound.
        tokenizer_model_max_length: bound on the expanded sequence; None: no bound.
        mm_vision_select_layer: the tower hidden state used as features.
        modalities: the media a sample may carry (``--X``, and only where the model has the tower).
    """

    # From the model (`for_model` derives them).
    prompt_tokenization: str
    image_size: int
    image_tokens: int
    video_tokens: int
    num_frames: int | None
    mm_vision_select_layer: int
    # The run's data settings.
    template: str = DEFAULT_TEMPLATE
    image_aspect_ratio: str = DEFAULT_ASPECT_RATIO
    model_max_length: int | None = DEFAULT_MODEL_MAX_LENGTH
    tokenizer_model_max_length: int | None = None
    modalities: tuple[str, ...] = MEDIA_MODALITIES

    def __post_init__(self) -> None:
        get_template(self.template)  # raises TemplateError naming the known templates
        problems = []
        if self.prompt_tokenization not in PROMPT_TOKENIZATIONS:
            problems.append(f"prompt_tokenization must be one of {', '.join(PROMPT_TOKENIZATIONS)}")
        if self.image_aspect_ratio not in ASPECT_MODES:
            problems.append(f"image_aspect_ratio must be one of {', '.join(ASPECT_MODES)}")
        unknown = sorted(set(self.modalities) - set(MEDIA_MODALITIES))
        if unknown:
            problems.append(f"unknown modalities {unknown} (use {', '.join(MEDIA_MODALITIES)})")
        if (self.num_frames is None) != (self.video_tokens == 0) or (
            self.num_frames is not None and self.num_frames < 1
        ):
            problems.append(f"num_frames {self.num_frames} does not fit video_tokens {self.video_tokens}")
        if self.image_tokens < 0 or self.image_size < 1:
            problems.append("image_tokens must be >= 0 and image_size >= 1")
        for name in ("model_max_length", "tokenizer_model_max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be positive, got {value}")
        if problems:
            raise UsageError("processor settings: " + "; ".join(problems))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls,
        config: Any,
        *,
        template: str = DEFAULT_TEMPLATE,
        image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
        model_max_length: int | None = DEFAULT_MODEL_MAX_LENGTH,
        tokenizer_model_max_length: int | None = None,
        modalities: Collection[str] = MEDIA_MODALITIES,
    ) -> Processor:
        """The processor of a model (its `VideoLlavaConfig`) with the run's data settings.

        Media counts, frames, input size, feature layer and prompt tokenization come from the model;
        ``modalities`` is narrowed to the towers it has.

        Raises:
            UsageError: the towers take different input sizes, or the model has a tower for none of
                the requested modalities.
        """
        towers = {"image": config.image_config, "video": config.video_config}
        sizes = {c.image_size for c in towers.values() if c is not None}
        if len(sizes) > 1:
            raise UsageError(
                f"the towers take different input sizes {sorted(sizes)}; one pixel size serves both"
            )
        wanted = [m.lower() for m in modalities]
        available = tuple(m for m in MEDIA_MODALITIES if m in wanted and towers[m] is not None)
        if wanted and not available:
            asked = " ".join(m.capitalize() for m in wanted)
            raise UsageError(
                f"--X {asked}: the model has no tower for {'it' if len(wanted) == 1 else 'them'}"
            )
        return cls(
            template=template,
            prompt_tokenization=config.prompt_tokenization,
            image_size=sizes.pop() if sizes else 224,
            image_tokens=config.image_seq_length if towers["image"] is not None else 0,
            video_tokens=config.video_seq_length if towers["video"] is not None else 0,
            num_frames=config.num_frames if towers["video"] is not None else None,
            image_aspect_ratio=image_aspect_ratio,
            model_max_length=model_max_length,
            tokenizer_model_max_length=tokenizer_model_max_length,
            mm_vision_select_layer=config.mm_vision_select_layer,
            modalities=available,
        )

    def check_model(self, config: Any, *, where: str = "the checkpoint") -> None:
        """Raise when a model (its config) would not see what this processor produces."""
        expected = Processor.for_model(config, template=self.template, modalities=MEDIA_MODALITIES)
        differ = [
            f"{name} {getattr(self, name)!r} vs the model's {getattr(expected, name)!r}"
            for name in (
                "prompt_tokenization",
                "image_size",
                "image_tokens",
                "video_tokens",
                "num_frames",
                "mm_vision_select_layer",
            )
            if getattr(self, name) != getattr(expected, name)
        ]
        if differ:
            raise UsageError(f"{where}: its processor settings do not fit the model: " + "; ".join(differ))

    @property
    def config_overrides(self) -> ConfigOverrides:
        """What the loader must set on the base model so it is the model this processor feeds."""
        return ConfigOverrides(mm_vision_select_layer=self.mm_vision_select_layer, num_frames=self.num_frames)

    # -- text ----------------------------------------------------------------------------------

    @property
    def counts(self) -> MediaTokenCounts:
        """Feature tokens per image and per video."""
        return MediaTokenCounts(image=self.image_tokens, video=self.video_tokens)

    def tokenize(
        self,
        sample_or_turns: Sample | Sequence[Message],
        tokenizer: PreTrainedTokenizerBase,
        *,
        sample_id: str | None = None,
        truncate: bool = True,
    ) -> TokenizedSample:
        """A training conversation's ids and labels (``truncate=False`` ignores the length limits)."""
        return tokenize_sample(
            sample_or_turns,
            tokenizer,
            self.template,
            self.counts,
            model_max_length=self.model_max_length if truncate else None,
            tokenizer_model_max_length=self.tokenizer_model_max_length if truncate else None,
            sample_id=sample_id,
            tokenization=self.prompt_tokenization,
        )

    def prompt_ids(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """An inference prompt's ids, built exactly like training's prefix."""
        return tokenize_prompt(
            messages, tokenizer, self.template, self.counts, tokenization=self.prompt_tokenization
        )

    # -- media ---------------------------------------------------------------------------------

    @property
    def pixel_spec(self) -> PixelSpec:
        """Crop size and CLIP normalisation of the towers."""
        return PixelSpec(image_size=self.image_size)

    def load_video(
        self, path: str | Path, *, timeout_s: float = DEFAULT_DECODE_TIMEOUT, read: VideoReader = read_video
    ) -> torch.Tensor:
        """Decode the sampled frames of one video (with ``read``, e.g. in a watched process) and
        pre-process them: float32 ``[T, 3, S, S]``."""
        if self.num_frames is None:
            raise UsageError(f"{path}: the model has no video tower")
        frames, _ = read(path, self.num_frames, timeout_s=timeout_s)
        return preprocess_video(frames, self.pixel_spec)

    def load_image(self, path: str | Path) -> torch.Tensor:
        """Read and pre-process one image: float32 ``[3, S, S]``."""
        return self.preprocess_image(read_image(path))

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Pre-process one decoded image: aspect handling, resize, crop, normalisation."""
        return preprocess_image(image, self.pixel_spec, aspect=ASPECT_MODES[self.image_aspect_ratio])

    def media_settings(self, kind: str) -> dict[str, Any]:
        """Every setting :meth:`load_video` (``kind`` "video") or :meth:`load_image` ("image") reads.

        The frame cache keys its entries on these, so a setting added to a loader belongs here too.
        """
        spec = self.pixel_spec
        common = {"kind": kind, "image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)}
        if kind == "video":
            return {**common, "num_frames": self.num_frames}
        if kind == "image":
            return {**common, "aspect": ASPECT_MODES[self.image_aspect_ratio]}
        raise ValueError(f"media kind must be 'video' or 'image', got {kind!r}")

    def refused_media(self, sample: Sample) -> str | None:
        """Why this run does not accept the sample's media, or None when it does."""
        carried = {"video": [sample.video] if sample.video is not None else [], "image": list(sample.images)}
        refused = [m for m in MEDIA_MODALITIES if carried[m] and m not in self.modalities]
        if not refused:
            return None
        counts = {"video": self.video_tokens, "image": self.image_tokens}
        what = ", ".join(f"{m} {', '.join(carried[m])}" for m in refused)
        if any(counts[m] == 0 for m in refused):
            missing = " and ".join(f"no {m} tower" for m in refused if counts[m] == 0)
            return f"carries {what} but the model has {missing}"
        enabled = " ".join(m.capitalize() for m in self.modalities) or "no media"
        return f"carries {what} but --X enables {enabled}"

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (written into every checkpoint)."""
        out = asdict(self)
        out["modalities"] = list(self.modalities)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "processor settings") -> Processor:
        """Read :meth:`to_dict`'s output back; unknown or missing fields are errors."""
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise UsageError(f"{where}: unknown fields {unknown}, missing fields {missing}")
        try:
            return cls(**{**data, "modalities": tuple(data["modalities"])})
        except TypeError as err:  # a field of the wrong type (a hand-edited file)
            raise UsageError(f"{where}: {err}") from None
