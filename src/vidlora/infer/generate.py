"""One generation path for chat, batch prediction and evaluation.

A request is a conversation that ends with a user turn, plus its media. It is rendered with the
training template, tokenized with the same segment-wise mechanics as training (so the prompt ids
equal the training prefix), its media read and pre-processed exactly like training (no random
flip), and generated with left padding so that every row of a batch gives what it gives alone.
`Generator.score_options` ranks given answers instead: each is tokenized as a training answer and
scored by its teacher-forced log-likelihood (closed-form questions, multiple-choice style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vidlora.data.collate import IGNORE_INDEX, MultimodalCollator
from vidlora.data.frame_cache import FrameCache, image_pixels, video_pixels
from vidlora.data.media import DEFAULT_DECODE_TIMEOUT
from vidlora.data.records import Turn
from vidlora.data.templates import Template, get_template
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
        # A bool tensor; torch's stubs do not relate torch.tensor(dtype=torch.bool) to BoolTensor.
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class Generator:
    """Turns requests into answers with a loaded model (see the module docstring)."""

    def __init__(
        self,
        loaded: InferenceModel,
        *,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        frame_cache: FrameCache | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.template: Template = get_template(loaded.processor.template)
        self.decode_timeout = decode_timeout
        self.frame_cache = frame_cache
        pad = self.tokenizer.pad_token_id
        self.collate = MultimodalCollator(pad_token_id=pad, padding_side="left", keep_ids=True)
        self.train_collate = MultimodalCollator(pad_token_id=pad)

    def prepare(self, request: Request) -> dict:
        """Token ids and pixels of one request, through the training dataset's own media loaders."""
        ids = self.processor.prompt_ids(request.turns, self.tokenizer)
        return {"id": request.id, "input_ids": torch.tensor(ids, dtype=torch.long), **self._pixels(request)}

    def _pixels(self, request: Request) -> dict:
        """``pixel_values_videos`` / ``pixel_values_images`` of a request (keys absent without media)."""
        pixels: dict = {}
        cache, processor = self.frame_cache, self.processor
        if request.video is not None:
            video = video_pixels(processor, request.video, cache, timeout_s=self.decode_timeout)
            pixels["pixel_values_videos"] = video.unsqueeze(0)
        if request.images:
            pixels["pixel_values_images"] = torch.stack(
                [image_pixels(processor, p, cache) for p in request.images]
            )
        return pixels

    def _to_model(self, batch: dict) -> dict:
        """A collated batch on the model's device, pixels in its floating dtype."""
        device = next(self.model.parameters()).device
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        return {
            k: (v.to(device, dtype=dtype) if k.startswith("pixel_values") else v.to(device))
            for k, v in batch.items()
        }

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
        inputs = self._to_model(batch)
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
            stopping_criteria=StoppingCriteriaList(
                [StopOnString(self.tokenizer, self.template.stop_str, prompt_length)]
            ),
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

    @torch.no_grad()
    def score_options(self, request: Request, options: Sequence[str]) -> list[float]:
        """Log-likelihood of each option as the answer to ``request``, one batch for all options.

        Each option is appended as the assistant's turn and tokenized by training's own processor
        (no length limits); its score is the summed log-probability of the labelled tokens (the
        answer and the template's end of turn). Earlier answers in a multi-turn request are
        labelled too, which adds the same amount to every option and leaves the ranking alone.
        """
        if not options:
            raise ValueError(f"{request.id}: no options to score")
        media = self._pixels(request)
        items = []
        for option in options:
            tokenized = self.processor.tokenize(
                [*request.turns, Turn("gpt", option)], self.tokenizer, sample_id=request.id, truncate=False
            )
            items.append(
                {
                    **media,
                    "input_ids": torch.tensor(tokenized.input_ids, dtype=torch.long),
                    "labels": torch.tensor(tokenized.labels, dtype=torch.long),
                }
            )
        batch = self.train_collate(items)
        labels = batch.pop("labels")
        logits = self.model(**self._to_model(batch)).logits.float()
        targets = labels[:, 1:].to(logits.device)
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != IGNORE_INDEX)).sum(dim=1).tolist()
