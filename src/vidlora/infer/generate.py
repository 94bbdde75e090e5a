"""One generation path for chat, batch prediction and evaluation.

A request is a conversation that ends with a user turn, plus its media. It is rendered with the
training template, tokenized with the same segment-wise mechanics as training (so the prompt ids
equal the training prefix), its media read and pre-processed exactly like training (no random
flip), and generated with left padding so that every row of a batch gives what it gives alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vidlora.data.collate import MultimodalCollator
from vidlora.data.dataset import ASPECT_MODES, load_image, load_video, pixel_spec_from_config
from vidlora.data.records import Turn
from vidlora.data.templates import Template, get_template
from vidlora.data.tokenize import MediaTokenCounts, tokenize_prompt
from vidlora.infer.load import InferenceModel


@dataclass
class Request:
    """A conversation ending with a user turn, and the media its placeholders refer to."""

    id: str
    turns: list[Turn]
    video: Path | None = None
    images: list[Path] = field(default_factory=list)


class StopOnString(StoppingCriteria):
    """Stop a row once its generated text contains the template's stop string."""

    def __init__(self, tokenizer, stop: str, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = [
            self.stop in self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=False)
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Generator:
    """Turns requests into answers with a loaded model (see the module docstring)."""

    def __init__(self, loaded: InferenceModel, *, decode_timeout: float = 60.0) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = loaded.settings
        self.template: Template = get_template(loaded.settings.template)
        config = self._base_config()
        self.counts = MediaTokenCounts(
            image=config.image_seq_length if config.image_config is not None else 0,
            video=config.video_seq_length if config.video_config is not None else 0,
        )
        self.spec = pixel_spec_from_config(config)
        self.decode_timeout = decode_timeout
        pad = self.tokenizer.pad_token_id
        self.collate = MultimodalCollator(pad_token_id=pad, padding_side="left", keep_ids=True)

    def _base_config(self):
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.config

    def prepare(self, request: Request) -> dict:
        """Token ids and pixels of one request, through the training dataset's own media loaders."""
        ids = tokenize_prompt(request.turns, self.tokenizer, self.template, self.counts)
        item: dict = {"id": request.id, "input_ids": torch.tensor(ids, dtype=torch.long)}
        if request.video is not None:
            video = load_video(request.video, self.settings.num_frames, self.spec, self.decode_timeout)
            item["pixel_values_videos"] = video.unsqueeze(0)
        if request.images:
            aspect = ASPECT_MODES[self.settings.image_aspect_ratio]
            item["pixel_values_images"] = torch.stack([load_image(p, self.spec, aspect) for p in request.images])
        return item

    @torch.no_grad()
    def generate(
        self,
        requests: Sequence[Request],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        streamer=None,
    ) -> list[str]:
        """Answers for a batch of requests (greedy when temperature is 0)."""
        items = [self.prepare(r) for r in requests]
        batch = self.collate(items)
        batch.pop("ids")
        device = next(self.model.parameters()).device
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        inputs = {
            k: (v.to(device, dtype=dtype) if k.startswith("pixel_values") else v.to(device)) for k, v in batch.items()
        }
        prompt_length = inputs["input_ids"].shape[1]
        sampling = temperature > 0
        if sampling:
            torch.manual_seed(seed)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([StopOnString(self.tokenizer, self.template.stop_str, prompt_length)]),
            streamer=streamer,
            use_cache=True,
        )
        answers = []
        for row in output[:, prompt_length:]:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            stop = self.template.stop_str.strip()
            if stop and stop in text:
                text = text.split(stop)[0]
            answers.append(text.strip())
        return answers
