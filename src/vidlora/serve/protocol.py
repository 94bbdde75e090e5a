"""The OpenAI chat-completions wire format: the request we accept, the objects we return, errors.

Only what vidlora honours is declared; parameters that would change the answer and that vidlora
cannot honour (``n`` > 1, logprobs, tools, penalties) are refused with the parameter's name rather
than silently ignored. Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vidlora.infer.generate import Completion


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``' body (unknown extra fields are ignored, as OpenAI's own are)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def refuse_unsupported(self) -> None:
        """Parameters vidlora does not implement, when set to anything but their neutral value."""
        unsupported = {
            "n": self.n != 1,
            "logprobs": bool(self.logprobs),
            "tools": bool(self.tools),
            "functions": bool(self.functions),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
        }
        for name, used in unsupported.items():
            if used:
                raise RequestError(
                    f"{name} is not supported by vidlora serve", param=name, code="unsupported"
                )

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError("stop: at most 4 sequences", param="stop")
        return tuple(s for s in stops if s)


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request body, or a 400 naming the first invalid field."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestError(f"{where}: {first['msg']}", param=where) from err
    request.refuse_unsupported()
    return request


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def completion_object(completion: Completion, *, model: str, id_: str) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(completion),
    }


def chunk_object(
    *,
    model: str,
    id_: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    """One server-sent event of a streamed completion (the usage-only chunk has no choices)."""
    chunk: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if choices
        else [],
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def model_list(names: list[str], *, parents: dict[str, str | None]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(name, parents.get(name)) for name in names]}


def model_object(name: str, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "vidlora", "parent": parent}
