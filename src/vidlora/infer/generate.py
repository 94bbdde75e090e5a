"""One generation path for chat, batch prediction and evaluation.

A request is a conversation that ends with a user turn, plus its media. It is rendered with the
training template, tokenized with the same segment-wise mechanics as training (so the prompt ids
equal the training prefix), its media read and pre-processed exactly like training (no random
flip), and generated with left padding so that every row of a batch gives what it gives alone.
`Generator.score_options` ranks given answers instead: each is tokenized as a training answer and
scored by its teacher-forced log-likelihood (closed-form questions, multiple-choice style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Sampling:
    """How to generate one answer: the knobs `chat`, `predict` and the API share.

    Rows generated in one batch share ``temperature``, ``top_p`` and the random stream (they are
    one ``model.generate`` call); ``max_new_tokens`` and ``stop`` are kept per row. A sampled row
    with a seed is generated alone, so its answer is the same whatever else is being served; one
    without (``seed=None``) shares a freshly seeded batch.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the answer, besides the template's own
    seed: int | None = 0

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch: greedy rows whatever their seed, unseeded
        sampled rows with the same temperature and top_p; a seeded sampled row is its own batch."""
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is None:
            return ("sampled", self.temperature, self.top_p)
        return ("seeded", id(self))


@dataclass
class Completion:
    """One generated answer and its token counts (media tokens count as prompt tokens)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    #: "stop" (end of turn, eos or a stop string), "length", or "cancelled" (by ``should_stop``).
    finish_reason: str


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops``, and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still turn out to begin a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class _Detokenizer:
    """Text of a growing token sequence, extended piece by piece and never rewritten.

    Decoding the whole sequence again after each token is not prefix-stable: byte-fallback tokens
    merge with the bytes after them, and SentencePiece drops a leading space. So each new piece is
    the text of the tokens since the last piece, decoded with the token before them for context,
    and held back while it ends in an incomplete character (as vLLM's incremental detokenizer does).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0  # tokens before this are context only
        self._read = 0  # tokens before this are in ``text``

    def add(self, ids: list[int], *, final: bool = False) -> None:
        decode = self.tokenizer.decode
        before = decode(ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(ids)


class RowTracker(StoppingCriteria):
    """Per-row end of generation, token counts and streamed text, checked after every new token.

    A row ends at the eos token, the template's stop string, one of its own stop strings, or its
    own token budget; its answer is the text before the stop, stripped. While it runs, ``on_text``
    gets each new piece of that answer, never a piece a stop string might still swallow, so the
    pieces add up to exactly the final answer.
    """

    def __init__(
        self,
        tokenizer,
        template_stop: str,
        stops: Sequence[Sequence[str]],
        budgets: Sequence[int],
        prompt_length: int,
        on_text: Callable[[int, str], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> None:
        self.should_stop = should_stop
        self.eos = tokenizer.eos_token_id
        self.stops = [[s for s in (*row, template_stop.strip()) if s] for row in stops]
        self.budgets = list(budgets)
        self.prompt_length = prompt_length
        self.on_text = on_text
        rows = len(budgets)
        self.decoded = [_Detokenizer(tokenizer) for _ in range(rows)]
        self.finished: list[str | None] = [None] * rows
        self.lengths = [0] * rows
        self.emitted = [""] * rows
        self.texts = [""] * rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for row, ids in enumerate(input_ids):
            if self.finished[row] is None:
                self._advance(row, ids[self.prompt_length :].tolist(), final=False)
            if self.finished[row] is None and self.should_stop is not None and self.should_stop(row):
                self.finished[row] = "cancelled"
        done = [reason is not None for reason in self.finished]
        # A bool tensor; torch's stubs do not relate torch.tensor(dtype=torch.bool) to BoolTensor.
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    def finish(self, output: torch.Tensor) -> None:
        """End the rows generation stopped without this tracker's say (a model-wide length limit)."""
        for row, reason in enumerate(self.finished):
            if reason is None:
                self._advance(row, output[row, self.prompt_length :].tolist(), final=True)

    def _advance(self, row: int, generated: list[int], *, final: bool) -> None:
        ended_by_eos = bool(generated) and generated[-1] == self.eos
        last = final or ended_by_eos or len(generated) >= self.budgets[row]
        self.lengths[row] = len(generated)
        decoded = self.decoded[row]
        decoded.add(generated[:-1] if ended_by_eos else generated, final=last)
        text, stopped = cut_at_stops(decoded.text, self.stops[row])
        stopped = stopped or ended_by_eos
        if stopped or last:
            self.finished[row] = "stop" if stopped else "length"
            self.texts[row] = text.strip()
            self._emit(row, self.texts[row])
        else:
            safe = text[: len(text) - _held_back(text, self.stops[row])]
            self._emit(row, safe.strip())

    def _emit(self, row: int, text: str) -> None:
        """Send the part of ``text`` not sent yet."""
        sent = self.emitted[row]
        if len(text) > len(sent):
            if self.on_text is not None:
                self.on_text(row, text[len(sent) :])
            self.emitted[row] = text


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

    def generate(
        self,
        requests: Sequence[Request],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """Answers for a batch of requests (greedy when temperature is 0)."""
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return [c.text for c in self.complete(requests, sampling, on_text=on_text)]

    def complete(
        self,
        requests: Sequence[Request],
        sampling: Sampling | Sequence[Sampling],
        *,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Completions of a batch of requests; ``on_text(row, piece)`` streams each answer."""
        return self.complete_prepared([self.prepare(r) for r in requests], sampling, on_text=on_text)

    @torch.no_grad()
    def complete_prepared(
        self,
        items: Sequence[dict],
        sampling: Sampling | Sequence[Sampling],
        *,
        on_text: Callable[[int, str], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> list[Completion]:
        """:meth:`complete` on already :meth:`prepare`-d requests (media decoded elsewhere, e.g. while
        the model works on the previous batch); ``should_stop(row)`` ends a row early (a client gone)."""
        rows = [sampling] * len(items) if isinstance(sampling, Sampling) else list(sampling)
        if len(rows) != len(items) or not items:
            raise ValueError(f"{len(items)} requests and {len(rows)} sampling settings")
        if len({row.batch_key for row in rows}) != 1:
            raise ValueError("rows of one batch must share temperature, top_p and seed")
        if min(row.max_new_tokens for row in rows) < 1:
            raise ValueError("max_new_tokens must be at least 1")
        first = rows[0]
        batch = self.collate(list(items))
        batch.pop("ids")
        inputs = self._to_model(batch)
        prompt_length = inputs["input_ids"].shape[1]
        tracker = RowTracker(
            self.tokenizer,
            self.template.stop_str,
            [row.stop for row in rows],
            [row.max_new_tokens for row in rows],
            prompt_length,
            on_text,
            should_stop,
        )
        sampled = first.temperature > 0
        if sampled:
            torch.manual_seed(first.seed if first.seed is not None else torch.seed())
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(row.max_new_tokens for row in rows),
            do_sample=sampled,
            temperature=first.temperature if sampled else None,
            top_p=first.top_p if sampled and first.top_p < 1 else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([tracker]),
            use_cache=True,
        )
        tracker.finish(output)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            Completion(
                tracker.texts[i], int(prompt_tokens[i]), tracker.lengths[i], tracker.finished[i] or "length"
            )
            for i in range(len(items))
        ]

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
