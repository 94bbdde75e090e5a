"""The serving queue: batches by model and sampler, bounded, deadlines, one failed batch only."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import pytest

from vidlora.infer.generate import Completion, Sampling
from vidlora.serve.engine import Engine, Job
from vidlora.serve.protocol import RequestError


class FakeGenerator:
    """Answers each row with its item's text; can be held (to fill the queue) or made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.fail_on: str | None = None
        self.model = ""
        self.stopped_rows: list[str] = []

    def complete_prepared(self, items, samplings, *, on_text=None, should_stop=None):
        self.started.set()
        texts = [item["text"] for item in items]
        self.batches.append((self.model, texts))
        if self.fail_on in texts:
            raise RuntimeError("boom")
        deadline = time.monotonic() + 10
        while not self.release.wait(0.01):
            for row, text in enumerate(texts):
                if should_stop(row) and text not in self.stopped_rows:
                    self.stopped_rows.append(text)
            assert time.monotonic() < deadline
        for row, text in enumerate(texts):
            on_text(row, text[:1])
            on_text(row, text[1:])
        return [Completion(t, 3, len(t), "stop") for t in texts]


class FakeModels:
    def __init__(self) -> None:
        self.generator = FakeGenerator()

    @contextmanager
    def use(self, name):
        self.generator.model = name
        yield self.generator


def _job(text, model="m", sampling=None, results=None):
    results = results if results is not None else []
    return Job(model, {"text": text}, sampling or Sampling(), time.monotonic() + 30, None, results.append)


def _wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@contextmanager
def running(models, **options):
    """An engine over ``models``, stopped at the end (a held fake model released first)."""
    engine = Engine(models, batch_wait_s=0.0, **options)
    engine.start()
    try:
        yield engine
    finally:
        models.generator.release.set()
        engine.stop()


def held_models() -> FakeModels:
    """Fake models whose generation waits until ``generator.release`` is set."""
    models = FakeModels()
    models.generator.release.clear()
    return models


def test_queued_requests_batch_by_model_and_sampler():
    models = held_models()
    gen = models.generator
    results: list = []
    with running(models, max_batch_size=3) as engine:
        engine.submit(_job("first", results=results))  # held in the model while the rest queue up
        gen.started.wait(5)
        hot = Sampling(temperature=0.7, seed=None)
        for text, model, sampling in [
            ("a1", "a", Sampling()), ("b1", "b", Sampling()), ("a2", "a", Sampling(max_new_tokens=5, seed=9)),
            ("a3", "a", hot), ("a4", "a", Sampling(stop=("x",))), ("a5", "a", Sampling()), ("a6", "a", hot),
            ("s1", "a", Sampling(temperature=0.7, seed=1)), ("s2", "a", Sampling(temperature=0.7, seed=1)),
        ]:  # fmt: skip
            engine.submit(_job(text, model, sampling, results=results))
        gen.release.set()
        _wait_for(lambda: len(results) == 10)
    # Greedy rows of one model batch whatever their budgets, stops and seeds; max 3 per batch;
    # unseeded sampled rows batch with the same temperature/top_p; a seeded one runs alone (its
    # answer must not depend on what else is queued); queue order otherwise kept.
    assert gen.batches == [
        ("m", ["first"]), ("a", ["a1", "a2", "a4"]), ("b", ["b1"]), ("a", ["a3", "a6"]), ("a", ["a5"]),
        ("a", ["s1"]), ("a", ["s2"]),
    ]  # fmt: skip
    assert engine.batches == 7


def test_a_full_queue_refuses_at_once_with_429():
    models = held_models()
    with running(models, max_queue=2) as engine:
        engine.submit(_job("running"))
        models.generator.started.wait(5)
        engine.submit(_job("q1"))
        engine.submit(_job("q2"))
        with pytest.raises(RequestError) as caught:
            engine.submit(_job("q3"))
        assert caught.value.status == 429 and caught.value.body()["error"]["code"] == "queue_full"


def test_a_failed_batch_fails_its_requests_only():
    models = FakeModels()
    models.generator.fail_on = "bad"
    results: list = []
    with running(models, max_batch_size=1) as engine:
        engine.submit(_job("bad", results=results))
        engine.submit(_job("good", results=results))
        _wait_for(lambda: len(results) == 2)
    assert isinstance(results[0], RequestError) and results[0].status == 500 and "boom" in results[0].message
    assert results[1].text == "good"


def test_a_timed_out_request_is_504_and_its_row_is_stopped():
    models = held_models()
    with running(models) as engine:

        async def ask():
            return await engine.run("m", {"text": "slow"}, Sampling(), timeout_s=0.3)

        with pytest.raises(RequestError) as caught:
            asyncio.run(ask())
        assert caught.value.status == 504 and caught.value.kind == "timeout_error"
        _wait_for(lambda: models.generator.stopped_rows == ["slow"])


def test_a_stream_still_queued_at_its_deadline_ends_with_504():
    models = held_models()
    with running(models) as engine:

        async def ask():
            pieces: asyncio.Queue = asyncio.Queue()
            task = asyncio.create_task(
                engine.run("m", {"text": "q"}, Sampling(), timeout_s=0.3, pieces=pieces)
            )
            assert await asyncio.wait_for(pieces.get(), 5) is None  # the stream loop ends at the deadline
            with pytest.raises(RequestError) as caught:
                await task
            return caught.value

        engine.submit(_job("running"))  # holds the model: "q" waits in the queue
        models.generator.started.wait(5)
        assert asyncio.run(ask()).status == 504


def test_streamed_pieces_arrive_before_the_completion_then_none():
    with running(FakeModels()) as engine:

        async def ask():
            pieces: asyncio.Queue = asyncio.Queue()
            completion = await engine.run("m", {"text": "hello"}, Sampling(), timeout_s=10, pieces=pieces)
            received = []
            while (piece := await pieces.get()) is not None:
                received.append(piece)
            return completion, received

        completion, received = asyncio.run(ask())
    assert received == ["h", "ello"] and completion.text == "hello"


def test_requests_queued_at_shutdown_are_told_so():
    models = held_models()
    engine = Engine(models, batch_wait_s=0.0)
    engine.start()
    results: list = []
    engine.submit(_job("running", results=results))
    models.generator.started.wait(5)
    engine.submit(_job("waiting", results=results))
    threading.Timer(0.2, models.generator.release.set).start()
    engine.stop()
    assert {type(r).__name__ for r in results} == {"Completion", "RequestError"}
    assert next(r for r in results if isinstance(r, RequestError)).status == 503
