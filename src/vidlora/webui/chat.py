"""The web UI's Chat tab without the UI: a conversation, its streamed answers, the frames the model sees.

Answers come from the one generation path (:class:`~vidlora.infer.generate.Generator`, through the
:class:`~vidlora.infer.adapters.ModelSet` holding the served adapters), with the media placeholders
on the first user message as `vidlora chat` puts them; the conversation is kept, so a follow-up sees
earlier answers. The frames shown are the tower input of the chosen model's own processor, read by
the same loader, un-normalised for display.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vidlora.data.records import Turn
from vidlora.infer.chat import first_message
from vidlora.webui.data_view import unnormalise


@dataclass(frozen=True)
class Conversation:
    """The turns so far and the media the first message refers to (fixed for the conversation)."""

    turns: tuple[Turn, ...] = ()
    video: Path | None = None
    images: tuple[Path, ...] = ()

    def ask(self, text: str, video: Path | None = None, images: tuple[Path, ...] = ()) -> Conversation:
        """This conversation with the user's next message; the first one takes ``video``/``images``."""
        if not self.turns:
            return Conversation((Turn("human", first_message(text, video, list(images))),), video, images)
        return replace(self, turns=(*self.turns, Turn("human", text)))

    def answered(self, text: str) -> Conversation:
        return replace(self, turns=(*self.turns, Turn("gpt", text)))


@dataclass(frozen=True)
class Settings:
    """Sampling settings of one answer (temperature 0: greedy)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Reply:
    """An answer as it streams: the text so far, and once done its completion."""

    text: str = ""
    done: bool = False
    completion: Any = None
    deltas: list[str] = field(default_factory=list)


def stream_reply(models: Any, name: str, conversation: Conversation, settings: Settings) -> Iterator[Reply]:
    """Answer the conversation's last message with model ``name``, yielding the text as tokens arrive.

    Generation runs in a worker thread (the ModelSet's lock held there); its text deltas come back
    through a queue, and its error, if any, is raised here.
    """
    from vidlora.infer.generate import Request, Sampling

    request = Request("webui", list(conversation.turns), conversation.video, list(conversation.images))
    sampling = Sampling(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        seed=settings.seed,
    )  # fmt: skip
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            with models.use(name) as generator:
                completions = generator.complete(
                    [request], sampling, on_text=lambda row, delta: events.put(("delta", delta))
                )
            events.put(("done", completions[0]))
        except BaseException as err:  # handed to the caller's thread, raised there
            events.put(("error", err))

    threading.Thread(target=work, name="webui-generate", daemon=True).start()
    reply = Reply()
    while True:
        kind, value = events.get()
        if kind == "error":
            raise value
        if kind == "done":
            reply.done, reply.completion, reply.text = True, value, value.text
            yield reply
            return
        reply.deltas.append(value)
        reply.text += value
        yield reply


def model_frames(models: Any, name: str, video: str | Path) -> list[np.ndarray]:
    """The frames model ``name`` gets from ``video`` (its processor's sampling, crop and size), as
    uint8 RGB images."""
    from vidlora.data.frame_cache import video_pixels

    with models.use(name) as generator:
        processor = generator.processor
        pixels = video_pixels(processor, video, generator.frame_cache, timeout_s=generator.decode_timeout)
    spec = processor.pixel_spec
    return list(unnormalise(pixels, spec.mean, spec.std))
