"""Configuration of the Video-LLaVA model: an LLM config plus optional image and video tower configs.

The towers are CLIP vision transformers (`CLIPVisionConfig`); the video tower adds LanguageBind's
temporal attention (`LanguageBindVideoConfig`: `num_frames`, `add_time_attn`). Token counts that the
tokenizer step and the model must agree on are derived here, in one place.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from vidlora.errors import UsageError

MODEL_TYPE = "vidlora_video_llava"
VIDEO_TOWER_MODEL_TYPE = "vidlora_languagebind_video"
#: How prompts are tokenized around media placeholders (see `vidlora.data.tokenize`).
PROMPT_TOKENIZATIONS = ("split_at_media", "whole_prompt")
#: The tower hidden state used as features when a checkpoint or flag says none (Video-LLaVA's -2).
DEFAULT_SELECT_LAYER = -2
#: Attention kernels the LLM and both towers can run (transformers' names); sdpa is the default.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


def attn_implementation_problem(name: str) -> str | None:
    """Why ``--attn_implementation name`` cannot be used here, or None when it can."""
    if name not in ATTN_IMPLEMENTATIONS:
        return f"--attn_implementation {name}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}."
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return (
            "--attn_implementation flash_attention_2 needs the flash-attn package (CUDA, fp16/bf16): "
            "pip install 'vidlora[flash]', or use sdpa."
        )
    return None


def set_attn_implementation(config: VideoLlavaConfig, name: str) -> None:
    """Run the LLM and both towers with attention kernel ``name`` (validated; see ATTN_IMPLEMENTATIONS).

    transformers passes a composite config's attention setting down to its sub-configs (text,
    image, video), which the LLM and the towers read when they are built.
    """
    problem = attn_implementation_problem(name)
    if problem is not None:
        raise UsageError(problem)
    config._attn_implementation = name


class LanguageBindVideoConfig(CLIPVisionConfig):
    """CLIP vision config plus LanguageBind's temporal fields.

    `num_frames` is fixed by the checkpoint (the temporal embedding has that many rows);
    `add_time_attn` adds per-layer temporal attention (LanguageBind_Video_merge: True).
    """

    model_type = VIDEO_TOWER_MODEL_TYPE

    num_frames: int = 8
    add_time_attn: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.num_frames < 1:
            raise ValueError(f"video tower num_frames must be >= 1, got {self.num_frames}")


def _as_video_config(config: PreTrainedConfig | dict | None) -> PreTrainedConfig | dict | None:
    """Upgrade a plain `CLIPVisionConfig` (e.g. read from a LanguageBind checkpoint) to the video config.

    Fields the plain config carries as extra attributes (`num_frames`, `add_time_attn`) are kept.
    """
    if isinstance(config, CLIPVisionConfig) and not isinstance(config, LanguageBindVideoConfig):
        fields = config.to_dict()
        for key in ("model_type", "transformers_version"):
            fields.pop(key, None)
        return LanguageBindVideoConfig(**fields)
    return config


class VideoLlavaConfig(PreTrainedConfig):
    """Configuration of `VideoLlavaForCausalLM`.

    Args:
        text_config: the language model's config (any AutoConfig model type; LLaMA by default).
        image_config: image tower (`CLIPVisionConfig`), or None for a model without an image tower.
        video_config: video tower (`LanguageBindVideoConfig`), or None for a model without a video tower.
        mm_projector_type: `linear`, `mlp{N}x_gelu` or `identity` (see `projector.build_projector`).
        mm_vision_select_layer: index into the tower's hidden states (0 = after `pre_layrnorm`).
        image_token_id / video_token_id: ids of the `<image>` / `<video>` placeholder tokens.
        pad_token_id: padding id of the tokenizer.
        ignore_index: label value that the loss ignores.
        prompt_tokenization: how this model's prompts were tokenized in training: ``split_at_media``
            (the original's ``tokenizer_image_token``: each piece between placeholders on its own) or
            ``whole_prompt`` (transformers' processor: the whole prompt at once). The checkpoint
            layout decides it when loading.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {  # noqa: RUF012 -- transformers declares this as a ClassVar on the base
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "image_config": SubConfigSpec(config_class=CLIPVisionConfig, optional=True),
        "video_config": SubConfigSpec(config_class=LanguageBindVideoConfig, optional=True),
    }

    if TYPE_CHECKING:  # what the fields hold once built (transformers turns dicts into configs)
        text_config: PreTrainedConfig
        image_config: CLIPVisionConfig | None
        video_config: LanguageBindVideoConfig | None
    else:
        text_config: dict | PreTrainedConfig | None = None
        image_config: dict | PreTrainedConfig | None = None
        video_config: dict | PreTrainedConfig | None = None
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = DEFAULT_SELECT_LAYER
    image_token_id: int | None = None
    video_token_id: int | None = None
    pad_token_id: int | None = None
    ignore_index: int = -100
    prompt_tokenization: str = "split_at_media"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # Before `super().__post_init__` the field may still be a dict; transformers builds it then.
        self.video_config = cast("LanguageBindVideoConfig | None", _as_video_config(self.video_config))
        super().__post_init__(**kwargs)
        self._check_towers()
        if self.prompt_tokenization not in PROMPT_TOKENIZATIONS:
            raise ValueError(
                f"prompt_tokenization must be one of {', '.join(PROMPT_TOKENIZATIONS)}, got {self.prompt_tokenization!r}"
            )
        if self.ignore_index != -100:
            # transformers' causal-LM losses ignore -100 only; labels must use it.
            raise ValueError(
                f"ignore_index must be -100 (the LLM loss ignores -100), got {self.ignore_index}"
            )

    def _check_towers(self) -> None:
        """The towers share one projector, so their widths must agree."""
        towers = [c for c in (self.image_config, self.video_config) if isinstance(c, PreTrainedConfig)]
        widths = {c.hidden_size for c in towers}
        if len(widths) > 1:
            raise ValueError(
                f"image and video towers must have the same hidden size (they share mm_projector), got "
                f"image {towers[0].hidden_size} and video {towers[1].hidden_size}"
            )
        for tower in towers:
            # hidden_states has num_hidden_layers + 1 entries (0 = after pre_layrnorm).
            n_states = tower.num_hidden_layers + 1
            if not -n_states <= self.mm_vision_select_layer < n_states:
                raise ValueError(
                    f"mm_vision_select_layer {self.mm_vision_select_layer} is out of range for a tower with "
                    f"{tower.num_hidden_layers} layers ({n_states} hidden states)"
                )

    @property
    def mm_hidden_size(self) -> int:
        """Width of the tower features that enter the projector."""
        tower = self.video_config if self.video_config is not None else self.image_config
        if tower is None:
            raise ValueError("mm_hidden_size is undefined: the config has neither an image nor a video tower")
        return tower.hidden_size

    @property
    def image_seq_length(self) -> int:
        """Feature tokens per image: (S // P) ** 2 patches (CLS dropped)."""
        if self.image_config is None:
            raise ValueError("image_seq_length is undefined: the config has no image tower")
        return num_patches(self.image_config)

    @property
    def frame_seq_length(self) -> int:
        """Feature tokens per video frame: (S // P) ** 2 patches + CLS."""
        if self.video_config is None:
            raise ValueError("frame_seq_length is undefined: the config has no video tower")
        return num_patches(self.video_config) + 1

    @property
    def num_frames(self) -> int:
        """Frames per video, fixed by the video tower's temporal embedding."""
        if self.video_config is None:
            raise ValueError("num_frames is undefined: the config has no video tower")
        return self.video_config.num_frames

    @property
    def video_seq_length(self) -> int:
        """Feature tokens per video: num_frames * frame_seq_length (CLS kept per frame)."""
        return self.num_frames * self.frame_seq_length


def tower_side(config: CLIPVisionConfig, name: Literal["image_size", "patch_size"] = "image_size") -> int:
    """`image_size` or `patch_size` of a tower config as one int (the side of a square ViT input).

    transformers also allows a (height, width) pair or None there; a Video-LLaVA tower is square.
    """
    value = getattr(config, name)
    if not isinstance(value, int):
        raise TypeError(f"tower config {name} must be a single int (a square ViT input), got {value!r}")
    return value


def num_patches(config: CLIPVisionConfig) -> int:
    """Patches per frame of a square ViT input: (S // P) ** 2."""
    return (tower_side(config, "image_size") // tower_side(config, "patch_size")) ** 2


@dataclass(frozen=True)
class ConfigOverrides:
    """Training-time choices that change the model built from a checkpoint.

    The loader applies them to the config it builds (validated against the checkpoint), every
    vidlora checkpoint records the values it trained with, and inference replays them, so a
    model never runs with other settings than it was trained with. None keeps the checkpoint's.
    """

    mm_vision_select_layer: int | None = None
    num_frames: int | None = None

    def apply(self, config: VideoLlavaConfig, notes: list[str]) -> None:
        """Set the overrides on a config under construction; notes say what changed."""
        layer = self.mm_vision_select_layer
        if layer is not None and layer != config.mm_vision_select_layer:
            notes.append(f"mm_vision_select_layer {config.mm_vision_select_layer} -> {layer}")
            config.mm_vision_select_layer = layer
            try:
                config._check_towers()
            except ValueError as err:
                raise UsageError(f"--mm_vision_select_layer {layer}: {err}") from None
        frames = self.num_frames
        if frames is None:
            return
        video = config.video_config
        if video is None:
            raise UsageError(f"--num_frames {frames}: the model has no video tower")
        if frames < 1:
            raise UsageError(f"--num_frames {frames}: must be at least 1")
        if frames != video.num_frames:
            if video.add_time_attn:
                raise UsageError(
                    f"--num_frames {frames}: this video tower's temporal embedding is trained for "
                    f"{video.num_frames} frames; pass --num_frames {video.num_frames} (or leave it out)"
                )
            notes.append(
                f"frames per video {video.num_frames} -> {frames} (the video tower has no temporal layers)"
            )
            video.num_frames = frames
