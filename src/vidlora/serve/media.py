"""Media URLs of a request → local files the generator reads, under the server's limits.

``data:`` URLs (base64) are written to the request's scratch folder; ``file://`` URLs and plain
paths are read only inside ``--allowed_media_dir`` (resolved, so ``..`` and symlinks cannot leave
it; no folder means no local files at all); http(s) is fetched only with ``--allow_remote_media``.
Sizes are checked before anything is decoded, video length from the container's packets.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from vidlora.data.media import probe_video
from vidlora.errors import VidloraError
from vidlora.serve.protocol import RequestError

#: MIME types of data: URLs and remote responses, by the kind of part that may carry them.
SUFFIXES: dict[str, dict[str, str]] = {
    "video": {
        "video/mp4": ".mp4",
        "video/webm": ".webm",
        "video/x-matroska": ".mkv",
        "video/quicktime": ".mov",
        "video/x-msvideo": ".avi",
        "video/mpeg": ".mpg",
        "image/gif": ".gif",
    },
    "image": {
        "image/png": ".png",
        "image/jpeg": ".jpg",
        "image/jpg": ".jpg",
        "image/webp": ".webp",
        "image/bmp": ".bmp",
        "image/gif": ".gif",
    },
}


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how big it may be."""

    allowed_dir: Path | None = None
    allow_remote: bool = False
    max_bytes: int = 200 * 2**20
    max_video_seconds: float = 600.0
    remote_timeout_s: float = 30.0


def resolve_media(url: str, kind: str, scratch: Path, policy: MediaPolicy, *, param: str) -> Path:
    """The local file behind ``url`` (a ``kind`` = "video" | "image" part at ``param``), checked."""
    if url.startswith("data:"):
        path = _from_data_url(url, kind, scratch, policy, param)
    elif url.startswith(("http://", "https://")):
        path = _from_remote(url, kind, scratch, policy, param)
    elif url.startswith("file://") or "://" not in url:
        path = _local(url, policy, param)
    else:
        scheme = url.split("://", 1)[0]
        raise RequestError(
            f"{param}: unsupported URL scheme {scheme!r} (data:, file:// or a path)", param=param
        )
    if kind == "video":
        try:
            info = probe_video(path)
        except VidloraError as err:
            # A data: URL's scratch file name means nothing to the client: the part names the video.
            reason = str(err).replace(f"{path}: ", "").replace(str(path), "the video")
            raise RequestError(f"{param}: {reason}", param=param, code="invalid_media") from err
        if info.duration_s > policy.max_video_seconds:
            raise RequestError(
                f"{param}: the video lasts {info.duration_s:.1f} s, the server takes at most "
                f"{policy.max_video_seconds:g} s (--max_video_seconds)",
                param=param,
                code="media_too_long",
            )
    return path


def _too_big(size: int, policy: MediaPolicy, param: str) -> RequestError:
    return RequestError(
        f"{param}: {size} bytes of media, the server takes at most {policy.max_bytes} (--max_media_mb)",
        status=413,
        param=param,
        code="media_too_large",
    )


def _from_data_url(url: str, kind: str, scratch: Path, policy: MediaPolicy, param: str) -> Path:
    header, sep, payload = url[len("data:") :].partition(",")
    mime, *flags = header.split(";")
    if not sep or "base64" not in flags:
        raise RequestError(f"{param}: write data URLs as data:<type>;base64,<data>", param=param)
    suffix = SUFFIXES[kind].get(mime.strip().lower())
    if suffix is None:
        raise RequestError(
            f"{param}: {mime or 'no type'} is not a {kind} type ({', '.join(SUFFIXES[kind])})", param=param
        )
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _too_big(len(payload) * 3 // 4, policy, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{param}: the data URL is not valid base64", param=param) from err
    return _write(scratch, suffix, data)


def _write(scratch: Path, suffix: str, data: bytes) -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(data)
    return path


def _local(url: str, policy: MediaPolicy, param: str) -> Path:
    if policy.allowed_dir is None:
        raise RequestError(
            f"{param}: local files are off; start the server with --allowed_media_dir to allow a folder",
            status=403,
            param=param,
            code="media_not_allowed",
        )
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    root = policy.allowed_dir.resolve()
    path = (root / raw).resolve()  # an absolute `raw` replaces root, then must still lie inside it
    if not path.is_relative_to(root):
        raise RequestError(
            f"{param}: {raw} is outside --allowed_media_dir",
            status=403,
            param=param,
            code="media_not_allowed",
        )
    if not path.is_file():
        raise RequestError(f"{param}: no such file {raw}", status=404, param=param, code="media_not_found")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise _too_big(size, policy, param)
    return path


def _from_remote(url: str, kind: str, scratch: Path, policy: MediaPolicy, param: str) -> Path:
    if not policy.allow_remote:
        raise RequestError(
            f"{param}: remote media is off; start the server with --allow_remote_media to fetch http(s) URLs",
            status=403,
            param=param,
            code="media_not_allowed",
        )
    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout_s) as response:
            mime = response.headers.get_content_type()
            data = response.read(policy.max_bytes + 1)
    except OSError as err:
        raise RequestError(
            f"{param}: could not fetch {url}: {err}", param=param, code="media_fetch_failed"
        ) from err
    if len(data) > policy.max_bytes:
        raise _too_big(len(data), policy, param)
    suffix = SUFFIXES[kind].get(mime) or Path(urllib.parse.urlparse(url).path).suffix.lower()
    if not suffix:
        raise RequestError(f"{param}: {url} is {mime}, not a {kind}", param=param)
    return _write(scratch, suffix, data)
