"""Vision towers: CLIP ViT for images and LanguageBind's CLIP-with-temporal-attention for videos.

Sub-module names equal LanguageBind's `vision_model.*` checkpoint keys minus that prefix
(`embeddings.*`, `pre_layrnorm` (sic), `encoder.layers.{i}.*`, `post_layernorm`), so a LanguageBind
state dict loads with a plain prefix strip. Both towers return every hidden state (entry 0 is the
output of `pre_layrnorm`, entry k the output of layer k-1) so that `mm_vision_select_layer` can index
them; no post-layernorm is applied to them (Video-LLaVA never uses the pooled output).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPVisionEmbeddings

from vidlora.model.configuration import LanguageBindVideoConfig


class LanguageBindEncoderLayer(CLIPEncoderLayer):
    """A CLIP encoder layer preceded, when `add_time_attn`, by LanguageBind's temporal attention.

    Input and output are `[(B*T), N, D]` with the frame index fastest. Per layer (LanguageBind order):
    add `temporal_embedding` across frames (only when T != 1), then
    `x += temporal_attn(temporal_layer_norm1(x))` across frames for every token (CLS included, no mask),
    then the usual CLIP block `x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))`.
    """

    def __init__(self, config: LanguageBindVideoConfig) -> None:
        super().__init__(config)
        self.add_time_attn = config.add_time_attn
        self.num_frames = config.num_frames
        if self.add_time_attn:
            # Initialised by the owning PreTrainedModel's `_init_weights` (normal, std = D ** -0.5).
            self.temporal_embedding = nn.Parameter(torch.zeros(1, config.num_frames, config.hidden_size))
            self.temporal_attn = CLIPAttention(config)
            self.temporal_layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Run the temporal step (if any) and the spatial CLIP block on `[(B*T), N, D]`."""
        if self.add_time_attn:
            hidden_states = self._temporal(hidden_states)
        # CLIP's attention takes attention_mask=None; CLIPEncoderLayer annotates it as a Tensor only.
        return super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[arg-type]

    def _temporal(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bt, n, d = hidden_states.shape
        t = self.num_frames
        b = bt // t
        # (b t) n d -> (b n) t d: every token position attends over the frames of its own video.
        x = hidden_states.view(b, t, n, d).transpose(1, 2)
        if t != 1:
            x = x + self.temporal_embedding[:, :t].unsqueeze(0)
        y = self.temporal_layer_norm1(x).reshape(b * n, t, d)
        y, _ = self.temporal_attn(hidden_states=y, attention_mask=None)
        x = x + y.view(b, n, t, d)
        return x.transpose(1, 2).reshape(bt, n, d)


class VisionEncoder(nn.Module):
    """The layer stack (`encoder.layers.{i}`), returning the output of every layer."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Return `[out_0, ..., out_{L-1}]`, one tensor per layer."""
        outputs = []
        for layer in self.layers:
            hidden_states = layer(hidden_states, None)
            outputs.append(hidden_states)
        return outputs


class ClipVisionTower(nn.Module):
    """CLIP ViT image tower (LanguageBind_Image's `vision_model`).

    `forward(pixel_values [B, 3, H, W])` returns `num_hidden_layers + 1` tensors `[B, N, D]`
    (N = (S // P) ** 2 + 1, CLS first).
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(self._make_layers())
        # Unused by Video-LLaVA's features, kept so that LanguageBind checkpoints load without leftovers.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _make_layers(self) -> list[nn.Module]:
        return [CLIPEncoderLayer(self.config) for _ in range(self.config.num_hidden_layers)]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the tower's weights (pixels are cast to it)."""
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the tower's weights."""
        return self.embeddings.patch_embedding.weight.device

    def _hidden_states(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.pre_layrnorm(self.embeddings(frames))
        return (hidden, *self.encoder(hidden))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states of a batch of images `[B, 3, H, W]`, each `[B, N, D]`."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"image tower expects pixels [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
            )
        return self._hidden_states(pixel_values)


class LanguageBindVideoTower(ClipVisionTower):
    """LanguageBind_Video_merge's `vision_model`: the CLIP ViT with per-layer temporal attention.

    `forward(pixel_values [B, T, 3, H, W])` runs the B*T frames (frame index fastest) and returns
    `num_hidden_layers + 1` tensors `[B, T, N, D]`. T must equal `config.num_frames`: the temporal
    embedding has exactly that many rows.
    """

    config: LanguageBindVideoConfig

    def __init__(self, config: LanguageBindVideoConfig) -> None:
        super().__init__(config)

    def _make_layers(self) -> list[nn.Module]:
        return [LanguageBindEncoderLayer(self.config) for _ in range(self.config.num_hidden_layers)]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states of a batch of videos `[B, T, 3, H, W]`, each `[B, T, N, D]`."""
        if pixel_values.dim() != 5:
            raise ValueError(
                f"video tower expects pixels [B, T, 3, H, W], got shape {tuple(pixel_values.shape)}"
            )
        b, t = pixel_values.shape[:2]
        if t != self.config.num_frames:
            raise ValueError(
                f"video tower was built for {self.config.num_frames} frames per video, got {t} "
                f"(pixels of shape {tuple(pixel_values.shape)})"
            )
        states = self._hidden_states(pixel_values.flatten(0, 1))
        return tuple(h.view(b, t, *h.shape[1:]) for h in states)
