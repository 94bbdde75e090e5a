"""`VideoLlavaForCausalLM`: LLM + image tower + video tower + one shared projector.

The tokenizer step expands every `<image>` / `<video>` placeholder into exactly as many copies of its
token id as the media has feature tokens; this model only embeds the ids, scatters the projected
features into those positions (raising when the counts differ) and runs the LLM. With labels, the
output head runs only at the positions that take a loss (the tokenizer step put -100 on every media
and prompt position, most of a Video-LLaVA sequence), with transformers' causal-LM loss semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPVisionEmbeddings

from vidlora.model.configuration import MODEL_TYPE, VideoLlavaConfig, tower_side
from vidlora.model.projector import build_projector
from vidlora.model.towers import ClipVisionTower, LanguageBindEncoderLayer, LanguageBindVideoTower

IGNORE_INDEX = -100


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a causal-LM loss is taken, and the targets there: ``(keep [B, L] bool, targets [N])``.

    Position t predicts label t + 1 (the last position predicts nothing), as transformers'
    ``ForCausalLMLoss`` shifts; ``keep`` is true where that shifted label is not -100.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def labelled_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Cross-entropy of ``logits [N, V]`` against ``targets [N]`` with transformers' ``ForCausalLMLoss``
    reduction: in float32, summed and divided by ``num_items_in_batch`` when given (the Trainer's
    count over all micro-batches of an optimizer step), else the mean (NaN when N is 0, as there)."""
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, reduction="mean")
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _check_count(modality: str, token_id: int, mask: torch.Tensor, expected: int, given: str) -> None:
    """Raise unless ``mask`` marks exactly ``expected`` placeholder positions.

    On the CPU the count is read and named in a ValueError. On an accelerator reading it would stall
    the host once per modality per step, so the comparison is queued on the device instead
    (``torch._assert_async``): a mismatch fails the step at the next synchronisation, with the
    feature-token side of the message. (Batches made by the processor are right by construction: it
    expands every placeholder to its tower's token count.)
    """
    if mask.device.type == "cpu":
        n_positions = int(mask.sum())
        if n_positions != expected:
            raise ValueError(
                f"{modality}: input_ids hold {n_positions} <{modality}> token positions (id {token_id}) "
                f"but {given}"
            )
        return
    torch._assert_async(
        mask.sum() == expected,
        f"{modality}: the number of <{modality}> token positions (id {token_id}) in input_ids differs from "
        f"the feature tokens: {given}",
    )


def register_auto_classes() -> None:
    """Register `VideoLlavaConfig` / `VideoLlavaForCausalLM` with AutoConfig, AutoModel and
    AutoModelForCausalLM, so that `Auto*.from_pretrained` opens our checkpoint directories.

    Idempotent; call it before using the Auto classes on a vidlora checkpoint.
    """
    AutoConfig.register(MODEL_TYPE, VideoLlavaConfig, exist_ok=True)
    AutoModel.register(VideoLlavaConfig, VideoLlavaForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(VideoLlavaConfig, VideoLlavaForCausalLM, exist_ok=True)


class VideoLlavaForCausalLM(PreTrainedModel, GenerationMixin):
    """Video-LLaVA: `language_model` (AutoModelForCausalLM), `image_tower`, `video_tower`, `mm_projector`.

    A tower is None when its config is None. The projector is shared by both modalities.
    """

    config: VideoLlavaConfig
    config_class = VideoLlavaConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")  # type: ignore[assignment]  # base: str | list[str]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The LLM's own `_no_split_modules` (e.g. LlamaDecoderLayer) are gathered from it in post_init too.
    _no_split_modules = (  # type: ignore[assignment]  # base: set | list (post_init makes it a set)
        "LlamaDecoderLayer",
        "CLIPEncoderLayer",
        "LanguageBindEncoderLayer",
    )
    # Nothing of ours is tied; the LLM declares its own lm_head <-> embed_tokens tie (when its config
    # says so) and post_init collects it as `language_model.lm_head.weight`.
    _tied_weights_keys = None  # type: ignore[assignment]  # base declares dict[str, str] yet defaults to None

    def __init__(self, config: VideoLlavaConfig) -> None:
        super().__init__(config)
        # Towers are plain modules: give them the attention implementation chosen for the whole model
        # unless the caller already set one on their config.
        for tower_config in (config.image_config, config.video_config):
            if tower_config is not None and tower_config._attn_implementation is None:
                tower_config._attn_implementation = config._attn_implementation
        # The class itself, not `from_config`: under a ZeRO-3 config `from_config` would build the LLM
        # inside deepspeed.zero.Init (partitioned, rank-dependent random init) while the towers are
        # whole. The loader assigns checkpoint weights into a whole model; DeepSpeed partitions it
        # when the engine starts.
        # The model mappings hold classes; transformers annotates every lazy mapping's values as the
        # tokenizer mapping's (slow, fast) pair.
        llm_class = cast("type[PreTrainedModel]", MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)])
        self.language_model = llm_class(config.text_config)
        self.image_tower = ClipVisionTower(config.image_config) if config.image_config is not None else None
        self.video_tower = (
            LanguageBindVideoTower(config.video_config) if config.video_config is not None else None
        )
        has_tower = self.image_tower is not None or self.video_tower is not None
        self.mm_projector = (
            build_projector(config.mm_projector_type, config.mm_hidden_size, config.text_config.hidden_size)
            if has_tower
            else None
        )
        self.post_init()

    # ---- weights -------------------------------------------------------------------------------

    def _init_weights(self, module: nn.Module) -> None:
        """CLIP's initialisation for the towers, LanguageBind's for the temporal embedding."""
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            factor = module.config.initializer_factor
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5 * factor)
            init.normal_(module.patch_embedding.weight, std=module.config.initializer_range * factor)
            init.normal_(module.position_embedding.weight, std=module.config.initializer_range * factor)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, CLIPAttention):
            # Only the towers hold CLIP attention, built from vision configs (a float initializer_factor).
            assert isinstance(module.config, CLIPVisionConfig)
            factor = module.config.initializer_factor
            in_std = (module.embed_dim**-0.5) * ((2 * module.config.num_hidden_layers) ** -0.5) * factor
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(proj.weight, std=in_std)
            init.normal_(module.out_proj.weight, std=(module.embed_dim**-0.5) * factor)
        elif isinstance(module, CLIPMLP):
            cfg = module.config
            factor = cfg.initializer_factor
            init.normal_(module.fc1.weight, std=(2 * cfg.hidden_size) ** -0.5 * factor)
            init.normal_(
                module.fc2.weight,
                std=(cfg.hidden_size**-0.5) * ((2 * cfg.num_hidden_layers) ** -0.5) * factor,
            )
        if isinstance(module, LanguageBindEncoderLayer) and module.add_time_attn:
            init.normal_(module.temporal_embedding, std=module.embed_dim**-0.5)

    # ---- embeddings: all delegated to the LLM -----------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's token embedding."""
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the LLM's token embedding."""
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        """The LLM's output head (`lm_head`)."""
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Replace the LLM's output head."""
        self.language_model.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Resize the LLM's embeddings (and head); `config.text_config.vocab_size` follows."""
        embeddings = self.language_model.resize_token_embeddings(
            new_num_tokens, pad_to_multiple_of=pad_to_multiple_of, mean_resizing=mean_resizing
        )
        self.config.text_config.vocab_size = embeddings.num_embeddings
        return embeddings

    def _set_gradient_checkpointing(
        self,
        enable: bool = True,
        gradient_checkpointing_func: Callable | None = None,
        every_n_layers: int = 1,
    ) -> None:
        # Checkpoint the LLM only: the towers are frozen and run without autograd in the recipe, so
        # checkpointing them would only add recomputation.
        kwargs: dict[str, Any] = {"enable": enable, "every_n_layers": every_n_layers}
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        self.language_model._set_gradient_checkpointing(**kwargs)

    # ---- media features ---------------------------------------------------------------------------

    def _select_hidden(self, tower: ClipVisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
        """`hidden_states[mm_vision_select_layer]` of `tower`, without autograd when nothing in it trains."""
        track = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(track):
            return tower(pixel_values.to(dtype=tower.dtype))[self.config.mm_vision_select_layer]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        assert self.mm_projector is not None  # built whenever there is a tower to give features
        weight = next(self.mm_projector.parameters(), None)
        if weight is not None:
            features = features.to(weight.dtype)
        return self.mm_projector(features)

    def get_image_features(self, pixel_values_images: torch.Tensor) -> torch.Tensor:
        """Projected image features `[Bi, n, D_llm]` from pixels `[Bi, 3, H, W]` (CLS dropped)."""
        if self.image_tower is None:
            raise ValueError(
                "got image pixels, but this model has no image tower (config.image_config is None)"
            )
        hidden = self._select_hidden(self.image_tower, pixel_values_images)
        return self._project(hidden[:, 1:])

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Projected video features `[Bv, T*(n+1), D_llm]` from pixels `[Bv, T, 3, H, W]` (CLS kept per frame)."""
        if self.video_tower is None:
            raise ValueError(
                "got video pixels, but this model has no video tower (config.video_config is None)"
            )
        hidden = self._select_hidden(self.video_tower, pixel_values_videos)
        return self._project(hidden.flatten(1, 2))

    def _scatter(
        self,
        modality: str,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        token_id: int | None,
        pixel_values: torch.Tensor | None,
        features_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Put the features of `pixel_values` into the `<modality>` positions of `inputs_embeds`."""
        if token_id is None:
            if pixel_values is not None:
                raise ValueError(f"got {modality} pixels, but config.{modality}_token_id is None")
            return inputs_embeds
        mask = input_ids == token_id
        if pixel_values is None:
            _check_count(
                modality, token_id, mask, 0, f"no pixel_values_{modality}s were given (0 feature tokens)"
            )
            return inputs_embeds
        features = features_fn(pixel_values)
        n_features = features.shape[0] * features.shape[1]
        _check_count(
            modality,
            token_id,
            mask,
            n_features,
            f"pixel_values_{modality}s give {n_features} feature tokens "
            f"({features.shape[0]} {modality}s x {features.shape[1]} tokens)",
        )
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def _dummy_features(self, modality: str) -> torch.Tensor:
        """Exactly zero that depends on every parameter of one tower and the projector.

        For ``run_all_towers``: a rank whose batch lacks this modality still runs the tower
        (and, under ZeRO-3, gathers its parameters) at the same point as the ranks that have it.
        """
        if modality == "image":
            image_config, image_tower = self.config.image_config, self.image_tower
            assert image_config is not None and image_tower is not None  # called for a present tower only
            size = tower_side(image_config)
            dummy = torch.zeros(1, 3, size, size, device=image_tower.device, dtype=image_tower.dtype)
            return self.get_image_features(dummy).float().sum() * 0.0
        vc, video_tower = self.config.video_config, self.video_tower
        assert vc is not None and video_tower is not None  # called for a present tower only
        dummy = torch.zeros(
            1, vc.num_frames, 3, tower_side(vc), tower_side(vc),
            device=video_tower.device, dtype=video_tower.dtype,
        )  # fmt: skip
        return self.get_video_features(dummy).float().sum() * 0.0

    def _add_media(
        self, input_ids, inputs_embeds, pixel_values_images, pixel_values_videos, run_all_towers: bool
    ) -> torch.Tensor:
        """Scatter image then video features; with ``run_all_towers``, run an absent modality's tower on
        a dummy input *in the same place*, so every rank calls the towers in the same order."""
        modalities = (
            (
                "image",
                self.image_tower,
                self.config.image_token_id,
                pixel_values_images,
                self.get_image_features,
            ),
            (
                "video",
                self.video_tower,
                self.config.video_token_id,
                pixel_values_videos,
                self.get_video_features,
            ),
        )
        for modality, tower, token_id, pixels, features_fn in modalities:
            inputs_embeds = self._scatter(modality, input_ids, inputs_embeds, token_id, pixels, features_fn)
            if run_all_towers and pixels is None and tower is not None:
                zero = self._dummy_features(modality)
                inputs_embeds = inputs_embeds + zero.to(
                    device=inputs_embeds.device, dtype=inputs_embeds.dtype
                )
        return inputs_embeds

    # ---- forward --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        run_all_towers: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Embed `input_ids`, scatter image/video features into their placeholders, run the LLM.

        Args:
            input_ids: `[B, L]`; `<image>` / `<video>` positions already expanded to the feature counts.
            attention_mask: `[B, L]` (1 = token, 0 = padding).
            position_ids: optional `[B, L]`.
            past_key_values: KV cache (older name of `cache`, which transformers 5 passes in `generate`).
            inputs_embeds: instead of `input_ids`, for text-only calls (media need the ids).
            labels: `[B, L]`, -100 where no loss is taken; position t is scored against label t + 1.
            pixel_values_images: `[Bi, 3, H, W]`, images of all rows stacked in row then text order.
            pixel_values_videos: `[Bv, T, 3, H, W]`, videos stacked likewise.
            run_all_towers: run every tower and the projector, adding exactly zero for a modality the
                batch lacks, so every rank of a ZeRO-3 job gathers the same parameters in the same
                order (a training-time switch: the Trainer passes it, inference leaves it off).
            num_items_in_batch: (in kwargs, from the Trainer) divides the summed loss, as in transformers.
            use_cache / logits_to_keep / **kwargs: passed to the LLM; logits_to_keep only without labels.

        Returns:
            The LLM's `CausalLMOutputWithPast`. Without labels: logits `[B, L, V]` (or the last
            `logits_to_keep`) and the cache. With labels: the loss (transformers' causal-LM loss:
            shifted, -100 ignored, mean, or sum / `num_items_in_batch` when given) and logits
            `[N, V]` of only the N positions that take a loss, in row-major order (see
            :func:`labelled_positions`); the full `[B, L, V]` logits are never built, since media
            and prompt positions (-100) are most of the sequence. Call without labels for all logits.

        Raises:
            ValueError: placeholder count != feature-token count (naming the modality and both counts),
                media without a tower or token id, media with `inputs_embeds`, or both cache arguments.
        """
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        has_images = pixel_values_images is not None
        has_videos = pixel_values_videos is not None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            # In decoding steps (cache already filled, no pixels) a generated id may equal a placeholder
            # id; it is then an ordinary token, not a slot for features.
            decoding = cache is not None and cache.get_seq_length() > 0 and not (has_images or has_videos)
            if not decoding:
                inputs_embeds = self._add_media(
                    input_ids, inputs_embeds, pixel_values_images, pixel_values_videos, run_all_towers
                )
        elif has_images or has_videos:
            raise ValueError(
                "media pixels need input_ids (their placeholder positions are read from the ids)"
            )
        if labels is None:
            return self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(
                "logits_to_keep cannot be combined with labels (the labels decide the positions)"
            )
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        keep, targets = labelled_positions(labels.to(inputs_embeds.device))
        # A boolean [B, L] logits_to_keep makes the LLM apply its head to those positions only
        # (transformers' slice_logits_to_keep), so the head, any logit post-processing and LoRA on
        # the head all stay the LLM's own.
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=keep,
            **kwargs,
        )
        outputs.loss = labelled_loss(outputs.logits, targets.to(outputs.logits.device), num_items_in_batch)
        return outputs
