"""`vidlora serve`: the OpenAI-compatible HTTP API (FastAPI on uvicorn).

    vidlora serve --model_path out/checkpoint-50 [--adapters other=out2] [--allowed_media_dir clips/]

``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models``, ``GET /health``. Media is
decoded and pre-processed in a thread pool while the model works, with the checkpoint's own
processor (as `chat` and `predict`); the engine batches what is queued. Every refusal is an
OpenAI-style error object with a 4xx status, and the server goes on serving.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from vidlora.errors import UsageError, VidloraError
from vidlora.infer.adapters import add_model_set_arguments
from vidlora.infer.generate import Sampling
from vidlora.serve import protocol
from vidlora.serve.engine import busy_error, timeout_error
from vidlora.serve.media import MediaPolicy
from vidlora.serve.protocol import RequestError

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access of one server (the flags of `vidlora serve`)."""

    media: MediaPolicy = field(default_factory=MediaPolicy)
    api_key: str | None = None
    request_timeout_s: float = 600.0
    max_request_bytes: int = 300 * 2**20
    max_tokens: int = DEFAULT_MAX_TOKENS  # when a request sets none
    prepare_workers: int = 4


def create_app(models, settings: ServeSettings, *, max_batch_size: int = 8, max_queue: int = 64):
    """The FastAPI application serving ``models`` (a :class:`~vidlora.infer.adapters.ModelSet`)."""
    from vidlora.serve.engine import Engine

    engine = Engine(models, max_batch_size=max_batch_size, max_queue=max_queue)
    pool = ThreadPoolExecutor(max_workers=settings.prepare_workers, thread_name_prefix="vidlora-media")
    scratch_root = Path(tempfile.mkdtemp(prefix="vidlora-serve-"))
    contexts = {name: _context_length(models.generator(name)) for name in models.names}

    @asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            shutil.rmtree(scratch_root, ignore_errors=True)

    app = FastAPI(title="vidlora", lifespan=lifespan)
    app.state.engine = engine

    def error(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestError)
    async def _request_error(_request, err: RequestError):
        return error(err)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error(RequestError(str(err.detail), status=err.status_code, kind=kind))

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        logging.getLogger("vidlora.serve").exception("internal error")  # the details stay in the log
        return error(RequestError("internal error (see the server's log)", status=500, kind="server_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, err: RequestValidationError):
        return error(RequestError(str(err.errors()[0].get("msg", err)), status=400))

    # A dependency of each /v1 route, not an HTTP middleware: Starlette's middleware wraps
    # `receive`, and a handler behind it no longer sees its client disconnect.
    def authorize(http: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        given, expected = token.strip().encode(), settings.api_key.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise RequestError(
                "a valid API key is required: Authorization: Bearer <key>",
                status=401,
                code="invalid_api_key",
                kind="authentication_error",
            )

    keyed = [Depends(authorize)]

    parents = {name: models.parent_of(name) for name in models.names}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": models.names}

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return protocol.model_list(models.names, parents=parents)

    @app.get("/v1/models/{name}", dependencies=keyed)
    async def get_model(name: str) -> dict[str, Any]:
        name = _model_name(models, name)
        return protocol.model_object(name, parents[name])

    admitted = [0]  # requests between arrival and their answer (only the event loop touches it)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(http: Request):
        if admitted[0] >= max_queue + max_batch_size:
            raise busy_error(f"{admitted[0]} requests in progress")
        admitted[0] += 1
        try:
            return await _complete(http)
        finally:
            admitted[0] -= 1

    async def _complete(http: Request):
        body = await _read_body(http, settings.max_request_bytes)
        request = protocol.parse_request(body)
        name = _model_name(models, request.model)
        id_ = protocol.completion_id()
        scratch = scratch_root / id_
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout_s
        prepared = loop.run_in_executor(pool, _prepare, models, name, request, scratch, settings.media, id_)
        try:
            item = await asyncio.wait_for(asyncio.shield(prepared), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise timeout_error(settings.request_timeout_s) from None
        finally:
            # The pixels are in memory once it is done; a timed-out one cleans up when it ends.
            prepared.add_done_callback(lambda f: _forget(f, scratch))
        prompt_tokens = len(item["input_ids"])
        sampling = _sampling(request, prompt_tokens, contexts[name], settings.max_tokens)
        left = max(deadline - loop.time(), 0.001)
        created = int(time.time())
        if not request.stream:
            waiting = asyncio.ensure_future(engine.run(name, item, sampling, timeout_s=left))
            gone = asyncio.create_task(_until_disconnected(http))
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not waiting.done():
                waiting.cancel()  # the client left: its row stops (the engine sees it cancelled)
                raise RequestError("the client closed the connection", status=499)
            return protocol.completion_object(waiting.result(), model=name, id_=id_, created=created)
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        task = asyncio.create_task(engine.run(name, item, sampling, timeout_s=left, pieces=pieces))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(
            _events(task, pieces, model=name, id_=id_, created=created, include_usage=include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _forget(future, scratch: Path) -> None:
    """Drop a finished media job's files; its result or error was used, or nobody waits any more."""
    shutil.rmtree(scratch, ignore_errors=True)
    if not future.cancelled():
        future.exception()


async def _until_disconnected(http: Request) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)


async def _events(
    task, pieces, *, model: str, id_: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion, in OpenAI's chunk format, then ``[DONE]``."""

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield event(
            protocol.chunk_object(
                model=model, id_=id_, created=created, delta={"role": "assistant", "content": ""}
            )
        )
        while (piece := await pieces.get()) is not None:
            yield event(
                protocol.chunk_object(model=model, id_=id_, created=created, delta={"content": piece})
            )
        try:
            completion = await task
        except RequestError as err:
            yield event(err.body())
        else:
            yield event(
                protocol.chunk_object(
                    model=model, id_=id_, created=created, delta={}, finish_reason=completion.finish_reason
                )
            )
            if include_usage:
                usage = protocol.usage(completion)
                yield event(
                    protocol.chunk_object(
                        model=model, id_=id_, created=created, delta={}, usage_=usage, choices=False
                    )
                )
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()  # a client that went away stops its row (the engine sees it cancelled)


async def _read_body(http, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _body_too_big(int(declared), limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_big(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_big(size: int, limit: int) -> RequestError:
    return RequestError(
        f"the request body has {size} bytes, the server takes at most {limit} (--max_request_mb)",
        status=413,
        code="request_too_large",
    )


def _model_name(models, requested: str | None) -> str:
    if requested is None or requested == "":
        return models.names[0]
    if requested not in models.names:
        raise RequestError(
            f"the model {requested!r} does not exist; this server has {', '.join(models.names)}",
            status=404,
            param="model",
            code="model_not_found",
        )
    return requested


def _prepare(models, name: str, request, scratch: Path, policy: MediaPolicy, id_: str) -> dict:
    """Resolve, decode and pre-process one request's media and tokenize its prompt (a pool thread)."""
    from vidlora.serve.messages import to_request

    generation_request = to_request(request.messages, scratch, policy, request_id=id_)
    try:
        return models.generator(name).prepare(generation_request)
    except VidloraError as err:
        media = generation_request.video is not None or bool(generation_request.images)
        raise RequestError(str(err), code="invalid_media" if media else None) from err


def _sampling(request, prompt_tokens: int, context: int, default_max_tokens: int) -> Sampling:
    room = context - prompt_tokens
    asked = request.max_completion_tokens or request.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens (media included) and asks for {asked or 1} more; "
            f"the model's context is {context}",
            param="messages",
            code="context_length_exceeded",
        )
    return Sampling(
        max_new_tokens=asked or min(default_max_tokens, room),
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=request.stops(),
        seed=request.seed,  # None: sampled with a fresh seed, batched with other unseeded requests
    )


def _context_length(generator) -> int:
    config = generator.model.config
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 4096))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidlora serve", description=__doc__.split("\n\n")[0])
    add_model_set_arguments(parser, required=True)
    parser.add_argument(
        "--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (with --api_key)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api_key",
        default=os.environ.get("VIDLORA_API_KEY"),
        help="require Authorization: Bearer KEY (default: $VIDLORA_API_KEY)",
    )
    parser.add_argument("--allowed_media_dir", default=None, help="file:// and paths are read only inside it")
    parser.add_argument("--allow_remote_media", action="store_true", help="fetch http(s) media URLs")
    parser.add_argument("--max_media_mb", type=float, default=200.0, help="size limit of one image or video")
    parser.add_argument("--max_video_seconds", type=float, default=600.0)
    parser.add_argument("--max_request_mb", type=float, default=300.0, help="size limit of a request body")
    parser.add_argument("--max_tokens", type=int, default=DEFAULT_MAX_TOKENS, help="when a request sets none")
    parser.add_argument("--max_batch_size", type=int, default=8, help="requests per generate call")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting; more get 429")
    parser.add_argument("--request_timeout", type=float, default=600.0, help="seconds per request")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    problems = [
        f"--{name} {value}: must be positive"
        for name, value in vars(args).items()
        if name.startswith(("max_", "request_")) and value is not None and value <= 0
    ]
    allowed = None
    if args.allowed_media_dir is not None:
        allowed = Path(args.allowed_media_dir)
        if not allowed.is_dir():
            problems.append(f"--allowed_media_dir {allowed}: no such folder")
    if problems:
        raise UsageError("; ".join(problems))
    media = MediaPolicy(
        allowed_dir=allowed,
        allow_remote=args.allow_remote_media,
        max_bytes=int(args.max_media_mb * 2**20),
        max_video_seconds=args.max_video_seconds,
    )
    return ServeSettings(
        media=media,
        api_key=args.api_key or None,
        request_timeout_s=args.request_timeout,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_tokens=args.max_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from vidlora.infer.adapters import load_model_set

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"vidlora serve: listening on {args.host} without --api_key: anyone who can reach it may use it",
              file=sys.stderr)  # fmt: skip
    models = load_model_set(args)
    app = create_app(models, settings, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    print(
        f"vidlora serve: {', '.join(models.names)} at http://{args.host}:{args.port}/v1 (default {models.names[0]})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
