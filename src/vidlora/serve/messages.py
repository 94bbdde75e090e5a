"""OpenAI chat messages → the generator's :class:`~vidlora.infer.generate.Request`.

Each ``image_url`` / ``video_url`` part becomes the training data's placeholder (``<image>`` /
``<video>``) where it stands in the message, text parts are joined by newlines, exactly as a
training record reads (``"<video>\\nWhat is the man doing?"``). A conversation has one video at
most, before any image (the training format's order); roles alternate user/assistant after an
optional system message, which replaces the template's system prompt.
"""

from __future__ import annotations

from pathlib import Path

from vidlora.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Turn
from vidlora.infer.generate import Request
from vidlora.serve.media import MediaPolicy, resolve_media
from vidlora.serve.protocol import Message, RequestError

ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
PART_TYPES = ("text", "image_url", "video_url")


def to_request(messages: list[Message], scratch: Path, policy: MediaPolicy, *, request_id: str) -> Request:
    """The generation request for ``messages``, media resolved to files (see the module docstring)."""
    turns: list[Turn] = []
    video: Path | None = None
    images: list[Path] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = ROLES.get(message.role)
        if role is None:
            raise RequestError(
                f"{where}.role: {message.role!r} is not supported (system, user, assistant)",
                param=f"{where}.role",
            )
        if role == "system" and i != 0:
            raise RequestError(f"{where}: a system message must come first", param=f"{where}.role")
        content = message.content
        if content is None:
            raise RequestError(f"{where}.content: missing", param=f"{where}.content")
        if isinstance(content, str):
            parts = [_text(content, f"{where}.content")]
        else:
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type")
                if kind not in PART_TYPES:
                    raise RequestError(
                        f"{at}.type: {kind!r} is not supported ({', '.join(PART_TYPES)})",
                        param=f"{at}.type",
                        code="unsupported_content",
                    )
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(f"{at}.text: a string is required", param=f"{at}.text")
                    parts.append(_text(part["text"], f"{at}.text"))
                    continue
                if role != "human":
                    raise RequestError(f"{at}: only user messages may carry media", param=at)
                url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else None
                if not isinstance(url, str) or not url:
                    raise RequestError(f"{at}.{kind}.url: a URL is required", param=f"{at}.{kind}.url")
                if kind == "video_url":
                    if video is not None:
                        raise RequestError(f"{at}: one video per conversation", param=at)
                    if images:
                        raise RequestError(f"{at}: the video comes before any image", param=at)
                    video = resolve_media(url, "video", scratch, policy, param=at)
                    parts.append(VIDEO_PLACEHOLDER)
                else:
                    images.append(resolve_media(url, "image", scratch, policy, param=at))
                    parts.append(IMAGE_PLACEHOLDER)
        text = "\n".join(parts)
        turns.append(Turn(role, text))
    _check_order(turns)
    return Request(request_id, turns, video, images)


def _text(text: str, param: str) -> str:
    """A text part; a placeholder in it would be taken for media the request does not carry."""
    for placeholder in (VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER):
        if placeholder in text:
            raise RequestError(
                f"{param}: the text holds {placeholder}; send media as image_url/video_url parts", param=param
            )
    return text


def _check_order(turns: list[Turn]) -> None:
    body = turns[1:] if turns and turns[0].role == "system" else turns
    for k, turn in enumerate(body):
        expected = "human" if k % 2 == 0 else "gpt"
        if turn.role != expected:
            raise RequestError(
                "messages: after an optional system message, user and assistant messages alternate, "
                "starting with user",
                param="messages",
            )
    if not body or body[-1].role != "human":
        raise RequestError("messages: the last message must be the user's", param="messages")
