"""Requests queued and answered in batches by one worker thread that owns the model.

Concurrent requests for the same model with compatible sampling (:attr:`Sampling.batch_key`) share
one left-padded ``generate`` call, up to ``max_batch_size`` rows, so N clients are served in about
the time of one. The queue is bounded (a full queue answers 429 at once, rather than letting every
client time out), a request past its deadline or whose client is gone is dropped from the queue or
stopped mid-generation, and an exception in one batch fails that batch's requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from vidlora.infer.adapters import ModelSet
from vidlora.infer.generate import Completion, Sampling
from vidlora.serve.protocol import RequestError


@dataclass
class Job:
    """One request in the queue; its callbacks run on the worker thread."""

    model: str
    item: dict
    sampling: Sampling
    deadline: float  # time.monotonic() after which it is dropped or stopped
    on_text: Callable[[str], None] | None
    on_done: Callable[[Completion | BaseException], None]
    cancelled: bool = field(default=False)

    @property
    def key(self) -> tuple:
        return (self.model, self.sampling.batch_key)

    def expired(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


def busy_error(load: str) -> RequestError:
    """The 429 of a full queue: refused at once, the client retries later."""
    return RequestError(
        f"the server is busy: {load} (--max_queue); retry later",
        status=429,
        code="queue_full",
        kind="rate_limit_error",
    )


def timeout_error(seconds: float) -> RequestError:
    return RequestError(
        f"the request took longer than {seconds:g} s (--request_timeout)",
        status=504,
        code="timeout",
        kind="timeout_error",
    )


class Engine:
    """The queue and its worker (see the module docstring)."""

    def __init__(
        self, models: ModelSet, *, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.02
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.models = models
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.batches = 0  # generate calls made, for the logs and the tests
        self.stopped_rows = 0  # rows stopped early: past their deadline or their client gone
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="vidlora-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise busy_error(f"{len(self._pending)} requests queued")
            self._pending.append(job)
            self._cond.notify_all()

    def run(
        self,
        model: str,
        item: dict,
        sampling: Sampling,
        *,
        timeout_s: float,
        pieces: asyncio.Queue[str | None] | None = None,
    ) -> Coroutine[Any, Any, Completion]:
        """Queue one prepared request now (a full queue raises here, before any response starts) and
        return what to await for its completion; ``pieces`` gets the streamed text, then None."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()

        def settle(result: Completion | BaseException) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
            if pieces is not None:
                pieces.put_nowait(None)

        def on_text(piece: str) -> None:
            if pieces is not None:
                _call_in(loop, pieces.put_nowait, piece)

        def on_done(result: Completion | BaseException) -> None:
            _call_in(loop, settle, result)

        job = Job(
            model,
            item,
            sampling,
            time.monotonic() + timeout_s,
            on_text if pieces is not None else None,
            on_done,
        )
        self.submit(job)
        return self._wait(job, future, timeout_s, pieces)

    @staticmethod
    async def _wait(
        job: Job, future: asyncio.Future[Completion], timeout_s: float, pieces: asyncio.Queue | None
    ) -> Completion:
        try:
            completion = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if pieces is not None:
                pieces.put_nowait(None)  # ends a stream still waiting in the queue
            raise timeout_error(timeout_s) from None
        finally:
            job.cancelled = True  # a no-op once done; stops it when the client went away
            # Settled later by the worker, with nobody waiting: retrieve it so asyncio does not warn.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        if completion.finish_reason == "cancelled":  # its deadline passed mid-generation
            raise timeout_error(timeout_s)
        return completion

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._answer(batch)

    def _next_batch(self) -> list[Job] | None:
        """Jobs for one generate call, waiting up to ``batch_wait_s`` for more of the first's kind."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                for job in self._pending:
                    job.on_done(RequestError("the server is shutting down", status=503, kind="server_error"))
                self._pending.clear()
                return None
            key = self._pending[0].key
            until = time.monotonic() + self.batch_wait_s
            while sum(job.key == key for job in self._pending) < self.max_batch_size:
                left = until - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            batch: list[Job] = []
            rest: deque[Job] = deque()
            for job in self._pending:
                if job.expired():
                    job.on_done(
                        timeout_error(0) if not job.cancelled else RequestError("cancelled", status=499)
                    )
                elif job.key == key and len(batch) < self.max_batch_size:
                    batch.append(job)
                else:
                    rest.append(job)
            self._pending = rest
            return batch

    def _answer(self, batch: list[Job]) -> None:
        try:
            with self.models.use(batch[0].model) as generator:
                completions = generator.complete_prepared(
                    [job.item for job in batch],
                    [job.sampling for job in batch],
                    on_text=lambda row, piece: _call(batch[row].on_text, piece),
                    should_stop=lambda row: batch[row].expired(),
                )
            self.batches += 1
            self.stopped_rows += sum(c.finish_reason == "cancelled" for c in completions)
        except Exception as err:  # one failed batch must not take the server down
            for job in batch:
                job.on_done(RequestError(f"generation failed: {err}", status=500, kind="server_error"))
            return
        for job, completion in zip(batch, completions, strict=True):
            job.on_done(completion)


def _call_in(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args) -> None:
    """Run ``callback`` on ``loop``'s thread, unless that loop has closed (its client is gone)."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


def _call(callback: Callable[[str], None] | None, piece: str) -> None:
    if callback is not None:
        callback(piece)
