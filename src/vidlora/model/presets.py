"""Named model presets: `tiny` (random, seconds on a CPU, for tests and demos) and `videollava-7b`
(the Video-LLaVA-7B architecture: Vicuna-7B + two LanguageBind ViT-L/14 towers + mlp2x_gelu).

Both go through the same builder (`build_config` -> `VideoLlavaForCausalLM`); a preset is only a set
of sizes. `build_preset("videollava-7b", device="meta")` builds the full architecture without
allocating weights (for parameter counts, memory plans and loading).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerBase

from vidlora.model.configuration import LanguageBindVideoConfig, VideoLlavaConfig
from vidlora.model.modeling import VideoLlavaForCausalLM


@dataclass(frozen=True)
class Preset:
    """Sizes of one model preset.

    Attributes:
        name: the preset's name (key in `PRESETS`).
        description: one line for `--help` and reports.
        text: LlamaConfig fields of the LLM.
        image: CLIPVisionConfig fields of the image tower (None: no image tower).
        video: LanguageBindVideoConfig fields of the video tower (None: no video tower).
        model: remaining VideoLlavaConfig fields (projector, select layer, token ids, ...).
        tiny_tokenizer: True when the vocabulary and media token ids come from
            `vidlora.model.tokenizer.build_tiny_tokenizer()`; False when they are fixed in the preset.
    """

    name: str
    description: str
    text: Mapping[str, Any]
    image: Mapping[str, Any] | None
    video: Mapping[str, Any] | None
    model: Mapping[str, Any]
    tiny_tokenizer: bool


def _frozen(**fields: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(fields))


_TINY_TOWER = _frozen(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=64,
)

# LanguageBind_Image / LanguageBind_Video_merge: CLIP ViT-L/14 at 224 px, as their configs say.
_VIT_L14 = _frozen(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "tiny": Preset(
            name="tiny",
            description="random tiny Video-LLaVA (LLaMA 128x2, ViT 64x2 at 64 px, 8 frames) for tests and demos",
            text=_frozen(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                # Stands in for a pretrained LLM, whose head gives confident logits. lm_head stays
                # frozen under LoRA, and after the final RMSNorm the largest logit it can produce is
                # about initializer_range * hidden_size: 2.6 with the default 0.02 (the loss cannot
                # fall below ~4 nats over 885 tokens), 12.8 with 0.1.
                initializer_range=0.1,
            ),
            image=_TINY_TOWER,
            video=MappingProxyType({**_TINY_TOWER, "num_frames": 8, "add_time_attn": True}),
            # The tiny tokenizer is vidlora's own (no original stack to match); the whole-prompt
            # convention is what its pinned golden losses and the demo were measured with.
            model=_frozen(
                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, prompt_tokenization="whole_prompt"
            ),
            tiny_tokenizer=True,
        ),
        "videollava-7b": Preset(
            name="videollava-7b",
            description="Video-LLaVA-7B: Vicuna-7B + LanguageBind image and video ViT-L/14 towers + mlp2x_gelu",
            text=_frozen(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                # Vicuna's 32000 pieces + <image>, <video>, <pad> appended (ids 32000, 32001, 32002).
                vocab_size=32003,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=False,
            ),
            image=_VIT_L14,
            video=MappingProxyType({**_VIT_L14, "num_frames": 8, "add_time_attn": True}),
            model=_frozen(
                mm_projector_type="mlp2x_gelu",
                mm_vision_select_layer=-2,
                prompt_tokenization="split_at_media",
                image_token_id=32000,
                video_token_id=32001,
                pad_token_id=32002,
            ),
            tiny_tokenizer=False,
        ),
    }
)


def get_preset(name: str) -> Preset:
    """Return the preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    # Imported lazily: the tokenizer module trains a BPE on first use and is not needed for 7B configs.
    from vidlora.model.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def build_config(
    name: str, *, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any
) -> VideoLlavaConfig:
    """Build the `VideoLlavaConfig` of preset `name`.

    Args:
        name: a key of `PRESETS`.
        tokenizer: for presets whose vocabulary comes from the tiny tokenizer, the tokenizer to read
            the vocabulary size and media/pad ids from (built when omitted).
        **overrides: VideoLlavaConfig fields to replace. `text_config`, `image_config` and
            `video_config` take a dict merged into the preset's fields, or None to drop a tower.
    """
    preset = get_preset(name)
    text_fields: dict[str, Any] = dict(preset.text)
    sections: dict[str, dict[str, Any] | None] = {
        "text_config": text_fields,
        "image_config": dict(preset.image) if preset.image is not None else None,
        "video_config": dict(preset.video) if preset.video is not None else None,
    }
    fields: dict[str, Any] = dict(preset.model)
    if preset.tiny_tokenizer:
        from vidlora.model.tokenizer import add_media_tokens

        tok = tokenizer if tokenizer is not None else _build_tiny_tokenizer()
        ids = add_media_tokens(tok)
        text_fields.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        fields.update(image_token_id=ids.image, video_token_id=ids.video, pad_token_id=ids.pad)
    for key, value in overrides.items():
        if key in sections:
            section = sections[key]
            if value is None:
                sections[key] = None
            elif not isinstance(value, Mapping):
                raise ValueError(
                    f"override {key} must be a dict of fields or None, got {type(value).__name__}"
                )
            elif section is None:
                raise ValueError(f"preset {name!r} has no {key.replace('_config', '')} tower to override")
            else:
                section.update(value)
        else:
            fields[key] = value
    text = sections["text_config"]
    if text is None:
        raise ValueError("override text_config must be a dict of fields: the model needs its language model")
    return VideoLlavaConfig(
        text_config=LlamaConfig(**text),
        image_config=CLIPVisionConfig(**sections["image_config"]) if sections["image_config"] else None,
        video_config=LanguageBindVideoConfig(**sections["video_config"])
        if sections["video_config"]
        else None,
        **fields,
    )


def build_preset(
    name: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    config: VideoLlavaConfig | None = None,
    **overrides: Any,
) -> tuple[VideoLlavaForCausalLM, PreTrainedTokenizerBase | None]:
    """Build preset `name` with random weights from `seed`, in eval mode.

    Args:
        name: a key of `PRESETS`.
        seed: seed of the weight initialisation (the global RNG state is left untouched).
        device: "meta" builds shapes only (no memory, no initialisation, takes well under a second
            even for 7B); any other device gets float32 weights initialised on the CPU and moved
            there, so a seed gives the same weights on every device.
        config: the preset's config, already built (and adjusted) by the caller; else `build_config`.
        **overrides: passed to `build_config`.

    Returns:
        `(model, tokenizer)`. The tokenizer is the tiny tokenizer for `tiny`; presets whose real
        tokenizer cannot be built offline (`videollava-7b`) return None: load it with the weights.
    """
    target = torch.device(device)
    preset = get_preset(name)
    tokenizer = _build_tiny_tokenizer() if preset.tiny_tokenizer else None
    if config is None:
        config = build_config(name, tokenizer=tokenizer, **overrides)
    build_on = target if target.type == "meta" else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), build_on:
        torch.manual_seed(seed)
        model = VideoLlavaForCausalLM(config)
    if target != build_on:
        model.to(target)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides `self`
    return model.eval(), tokenizer


def standin_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer for preset `name` built offline: the tiny tokenizer, padded for presets whose
    real tokenizer must be downloaded so that ``<image>``, ``<video>`` and ``<pad>`` get the
    preset's ids and the vocabulary its size."""
    preset = get_preset(name)
    if preset.tiny_tokenizer:
        return _build_tiny_tokenizer()
    from vidlora.model.tokenizer import add_media_tokens, build_tiny_tokenizer

    config = build_config(name)
    media_ids = (config.image_token_id, config.video_token_id, config.pad_token_id)
    tokenizer = build_tiny_tokenizer(pad_vocab_to=min(i for i in media_ids if i is not None))
    ids = add_media_tokens(tokenizer)
    if (ids.image, ids.video, ids.pad) != media_ids or len(tokenizer) != config.text_config.vocab_size:
        raise ValueError(f"preset {name!r}: the stand-in tokenizer's ids {ids} differ from {media_ids}")
    return tokenizer


def build_random(
    name: str,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> tuple[VideoLlavaForCausalLM, PreTrainedTokenizerBase]:
    """Preset `name` with random weights initialised on `device` in `dtype`, and a tokenizer.

    For throughput and memory measurements (`vidlora bench` on a GPU): the 7B model is built on
    the meta device, allocated on the GPU and initialised there in seconds, with no host copy.
    A preset whose real tokenizer cannot be built offline gets the tiny tokenizer padded to its
    vocabulary (:func:`~vidlora.model.tokenizer.build_tiny_tokenizer` ``pad_vocab_to``), so the
    media and pad tokens have the preset's ids; texts split into other pieces than with the real
    tokenizer, which changes a step's cost only through the text lengths.
    """
    tokenizer = standin_tokenizer(name)
    config = build_config(name, tokenizer=tokenizer)
    if attn_implementation is not None:
        from vidlora.model.configuration import set_attn_implementation

        set_attn_implementation(config, attn_implementation)
    with torch.device("meta"):
        model = VideoLlavaForCausalLM(config)
    model.to_empty(device=device)
    # Parameters in `dtype`; buffers (rotary frequencies, position ids) keep theirs, as when loading.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        for module in model.modules():
            model._init_weights(module)
    return model.eval(), tokenizer
