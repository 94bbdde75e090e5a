"""Reading videos and images from disk: only the sampled frames are decoded.

Videos are decoded with PyAV (it bundles FFmpeg, so nothing has to be installed on the system;
the choice was measured, see ``benchmarks/RESULTS.md``). :func:`read_video` samples frame indices
like the original Video-LLaVA (``np.linspace(0, n − 1, T, dtype=int)``) and decodes only those
frames: it seeks to the keyframe before each target and decodes forward to it.

Frame index → timestamp comes from the packets themselves (a demux-only pass, no decoding), never
from ``fps × index``: container frame counts can be missing (webm) or wrong, and variable frame
rate files cannot be addressed by a rate at all. Every returned frame is matched to its target by
its exact presentation timestamp, so a bad seek can cost time but never returns a wrong frame.

Damage policy: a packet the demuxer flags corrupt or that runs past the end of the file, and a
frame the decoder flags corrupt (it concealed an error), raise :class:`MediaError`; damage that
decodes as a valid bitstream cannot be detected by any decoder and is not.

Time limit: ``timeout_s`` is checked between packets and frames, and PyAV's own I/O timeout
interrupts blocking reads. A decoder stuck inside one FFmpeg call cannot be interrupted from
Python: training therefore reads through :class:`~vidlora.data.watchdog.DecodeWatchdog`, which runs
:func:`read_video` in a child process and kills it at the limit.
"""

from __future__ import annotations

import bisect
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps

from vidlora.errors import VidloraError

#: Seconds allowed to read one sample's media (``--decode_timeout``).
DEFAULT_DECODE_TIMEOUT = 60.0


class MediaError(VidloraError, ValueError):
    """A media file is missing, empty, corrupt or unsupported; the message names the file and the reason."""


class VideoReader(Protocol):
    """What reads a video's sampled frames: :func:`read_video`, or a
    :class:`~vidlora.data.watchdog.DecodeWatchdog` running it in a watched process."""

    def __call__(
        self, path: str | os.PathLike[str], num_frames: int = ..., *, timeout_s: float = ...
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video.

    Attributes:
        num_frames: exact number of frames (counted from the packets, not taken from metadata).
        fps: average frame rate the container reports (0.0 when it reports none).
        duration_s: first to last frame timestamp plus one average frame duration, in seconds.
        width: width of the frames as returned by :func:`read_video` (after rotation).
        height: height of the frames as returned by :func:`read_video` (after rotation).
        codec: decoder name, e.g. ``h264``, ``vp9``, ``mpeg4``.
        rotation: counter-clockwise degrees the display matrix asks for (0, 90, 180 or 270); already
            applied to the frames :func:`read_video` returns.
    """

    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    codec: str
    rotation: int


@dataclass(frozen=True)
class _FrameTable:
    """Presentation timestamps of every frame (sorted = frame order) and of the keyframes."""

    pts: list[int]
    keyframe_pts: list[int]


class _Deadline:
    """A per-call time budget, checked between packets and frames."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def error(self) -> TimeoutError:
        return TimeoutError(f"{self.path}: reading the video took longer than timeout_s={self.timeout_s} s")

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise self.error()

    def failure(self, exc: av.error.FFmpegError, reason: str) -> Exception:
        """The error to raise for an FFmpeg failure: FFmpeg's own I/O timeout becomes TimeoutError."""
        if isinstance(exc, av.error.ExitError):
            return self.error()
        return MediaError(f"{self.path}: {reason} ({exc})")


def sample_indices(num_frames_in_video: int, num_frames: int) -> np.ndarray:
    """Frame indices the original samples: ``np.linspace(0, n − 1, T, dtype=int)`` (repeats when n < T)."""
    if num_frames_in_video <= 0:
        raise ValueError(f"cannot sample from a video with {num_frames_in_video} frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, num_frames_in_video - 1, num_frames, dtype=int)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise MediaError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: empty file")


def _open(path: str, deadline: _Deadline) -> av.container.InputContainer:
    _check_file(path)
    try:
        # PyAV's timeout interrupts blocking I/O inside FFmpeg (ExitError); _Deadline bounds the rest.
        return av.open(path, mode="r", timeout=deadline.timeout_s)
    except av.error.FFmpegError as exc:
        raise deadline.failure(exc, "not a readable video") from exc


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    # FFmpeg opens a still image as a one-frame "video"; sampling it would repeat one picture T times.
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        raise MediaError(f"{path}: a still image ({container.format.name}), not a video")
    if not container.streams.video:
        raise MediaError(f"{path}: no video stream")
    return container.streams.video[0]


def _frame_table(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: str,
    deadline: _Deadline,
) -> _FrameTable:
    """Demux (without decoding) every packet of the stream and collect presentation timestamps."""
    pts: list[int] = []
    keyframe_pts: list[int] = []
    file_size = os.path.getsize(path)
    try:
        for packet in container.demux(stream):
            deadline.check()
            if packet.size == 0:  # the flush packet at end of stream
                continue
            # A cut-off file ends in a partial packet: FFmpeg flags it corrupt, or it runs past the end.
            if packet.is_corrupt or (packet.pos is not None and packet.pos + packet.size > file_size):
                raise MediaError(f"{path}: truncated or corrupt video (bad packet at byte {packet.pos})")
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None:
                raise MediaError(f"{path}: a video packet carries no timestamp; cannot address frames")
            pts.append(stamp)
            if packet.is_keyframe:
                keyframe_pts.append(stamp)
    except av.error.FFmpegError as exc:
        raise deadline.failure(exc, "corrupt or truncated video") from exc
    if not pts:
        raise MediaError(f"{path}: the video stream has no frames")
    pts.sort()
    if len(set(pts)) != len(pts):
        raise MediaError(f"{path}: duplicate frame timestamps; frames cannot be addressed unambiguously")
    if not keyframe_pts:
        raise MediaError(f"{path}: the video stream has no keyframe")
    keyframe_pts.sort()
    return _FrameTable(pts=pts, keyframe_pts=keyframe_pts)


def _rotation(frame: av.VideoFrame, path: str) -> int:
    """Counter-clockwise degrees from the frame's display matrix (0 when there is none)."""
    angle = round(frame.rotation or 0)
    if angle % 90 != 0:
        raise MediaError(f"{path}: unsupported display rotation of {angle} degrees (only multiples of 90)")
    return angle % 360


def _to_rgb(frame: av.VideoFrame, path: str, reformatter: VideoReformatter) -> np.ndarray:
    # One reformatter per video: `frame.to_ndarray(format=...)` builds a new swscale context for
    # every frame; reusing one gives the same pixels 1.2x faster at 64 px and 2.5x at 720p
    # (benchmarks/RESULTS.md).
    array = reformatter.reformat(frame, format="rgb24").to_ndarray()
    quarter_turns = _rotation(frame, path) // 90
    # The display matrix rotates counter-clockwise by `rotation` degrees; np.rot90 turns an
    # [H, W] image counter-clockwise too, so the frame comes out the way a player shows it.
    return np.ascontiguousarray(np.rot90(array, k=quarter_turns)) if quarter_turns else array


def _decoded_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    deadline: _Deadline,
    needed: set[int] | None = None,
) -> Iterator[av.VideoFrame]:
    """Decode forward from the current position.

    With ``needed`` (pts still wanted), packets of other frames are decoded with
    ``skip_frame=NONREF``: a frame no other frame references cannot change any frame we
    want, so the run-up from a keyframe to a target skips them (the decoder drops them).
    """
    context = stream.codec_context
    for packet in container.demux(stream):
        deadline.check()
        if needed is not None:
            context.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in needed else "NONREF"
        for frame in packet.decode():
            deadline.check()
            yield frame


def _decode_targets(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    table: _FrameTable,
    targets: list[int],
    path: str,
    deadline: _Deadline,
) -> dict[int, np.ndarray]:
    """Decode the frames whose pts are in ``targets`` (sorted, unique); returns pts → RGB array."""
    needed = set(targets)  # shrinks as frames are found; _decoded_frames reads it too
    reformatter = VideoReformatter()
    found: dict[int, np.ndarray] = {}
    frames: Iterator[av.VideoFrame] | None = None
    last_pts: int | None = None
    for target in targets:
        if target in found:
            continue
        # Index of the keyframe at or before the target; we step back one keyframe per retry in
        # case the demuxer's seek lands after the target (B-frame reordering can do that).
        key_index = bisect.bisect_right(table.keyframe_pts, target) - 1
        # Keep decoding forward when no keyframe lies between here and the target: a seek would
        # only restart from the same or an earlier keyframe.
        reuse = frames is not None and last_pts is not None and last_pts < target
        if reuse and last_pts is not None and key_index >= 0 and table.keyframe_pts[key_index] > last_pts:
            reuse = False
        while target not in found:
            seeked = not reuse
            if seeked:
                seek_to = table.keyframe_pts[key_index] if key_index >= 0 else table.pts[0]
                container.seek(seek_to, stream=stream, backward=True, any_frame=False)
                frames = _decoded_frames(container, stream, deadline, needed)
            reuse = False
            assert frames is not None
            for frame in frames:
                stamp = frame.pts
                if stamp is None:
                    raise MediaError(f"{path}: decoded a frame without a timestamp")
                last_pts = stamp
                if stamp in needed:
                    if frame.is_corrupt:  # FFmpeg concealed a decode error: the pixels are not the frame's
                        raise MediaError(f"{path}: frame at pts {stamp} decodes with errors (corrupt data)")
                    found[stamp] = _to_rgb(frame, path, reformatter)
                    needed.discard(stamp)
                if stamp >= target:
                    break
            else:  # end of stream
                frames, last_pts = None, None
            if target not in found and seeked:
                # The seek landed past the target, or the data ran out: restart one keyframe earlier.
                if key_index < 0:
                    raise MediaError(f"{path}: frame at pts {target} could not be decoded (corrupt data?)")
                key_index -= 1
    return found


def read_video(
    path: str | os.PathLike[str], num_frames: int = 8, *, timeout_s: float = DEFAULT_DECODE_TIMEOUT
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``num_frames`` evenly spaced frames of a video, upright, as uint8 RGB.

    Indices are ``np.linspace(0, n − 1, num_frames, dtype=int)`` over the n frames the stream
    actually holds (counted from its packets), so a video shorter than ``num_frames`` repeats
    frames. Only the sampled frames (and the frames between each one and its preceding keyframe)
    are decoded. Frames are rotated by the stream's display matrix so they come out the way a
    player shows them.

    Args:
        path: video file (any container/codec FFmpeg reads: mp4/h264, webm/vp9, avi/mpeg4, ...).
        num_frames: T, the number of frames to return.
        timeout_s: wall-clock budget for the whole call; checked between packets and frames.

    Returns:
        ``(frames, indices)``: uint8 ``[T, H, W, 3]`` and the int64 ``[T]`` frame indices.

    Raises:
        MediaError: missing, empty, truncated, corrupt or non-video file (message names the path).
        TimeoutError: the call exceeded ``timeout_s`` (message names the path).
    """
    path = os.fspath(path)
    deadline = _Deadline(path, timeout_s)
    with _open(path, deadline) as container:
        stream = _video_stream(container, path)
        table = _frame_table(container, stream, path, deadline)
        indices = sample_indices(len(table.pts), num_frames)
        targets = sorted({table.pts[i] for i in indices})
        try:
            found = _decode_targets(container, stream, table, targets, path, deadline)
        except av.error.FFmpegError as exc:
            raise deadline.failure(exc, "corrupt video data") from exc
    frames = [found[table.pts[i]] for i in indices]
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise MediaError(f"{path}: frame size changes within the video ({sorted(shapes)})")
    return np.stack(frames), indices.astype(np.int64)


def probe_video(path: str | os.PathLike[str], *, timeout_s: float = DEFAULT_DECODE_TIMEOUT) -> VideoInfo:
    """Describe a video: exact frame count (from its packets), rate, duration, upright size, codec, rotation.

    Decodes only the first frame (for the display rotation and the decoded size).

    Raises:
        MediaError: as :func:`read_video`.
        TimeoutError: the call exceeded ``timeout_s``.
    """
    path = os.fspath(path)
    deadline = _Deadline(path, timeout_s)
    with _open(path, deadline) as container:
        stream = _video_stream(container, path)
        table = _frame_table(container, stream, path, deadline)
        codec = stream.codec_context.name
        rate = stream.average_rate
        fps = float(rate) if rate else 0.0
        try:
            container.seek(table.keyframe_pts[0], stream=stream, backward=True, any_frame=False)
            first = next(_decoded_frames(container, stream, deadline), None)
        except av.error.FFmpegError as exc:
            raise deadline.failure(exc, "corrupt video data") from exc
        if first is None:
            raise MediaError(f"{path}: no frame could be decoded")
        rotation = _rotation(first, path)
        width, height = first.width, first.height
        time_base = stream.time_base or Fraction(1, 1)
    if rotation in (90, 270):
        width, height = height, width
    span = float((table.pts[-1] - table.pts[0]) * time_base)
    duration_s = span + (1.0 / fps if fps else 0.0)
    return VideoInfo(
        num_frames=len(table.pts),
        fps=fps,
        duration_s=duration_s,
        width=width,
        height=height,
        codec=codec,
        rotation=rotation,
    )


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied.

    Args:
        path: image file (anything Pillow reads).
        max_pixels: refuse images with more pixels than this (decompression-bomb guard); ``None``
            uses Pillow's ``Image.MAX_IMAGE_PIXELS``. Pillow itself refuses anything above twice
            its own limit, so a larger ``max_pixels`` also needs Pillow's limit raised.

    Returns:
        A loaded RGB ``PIL.Image.Image`` (RGBA/LA/P/L/CMYK are converted; alpha is dropped).

    Raises:
        MediaError: missing, empty, corrupt or over-sized file (message names the path).
    """
    path = os.fspath(path)
    _check_file(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1× and 2× its limit; our own limit below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if limit is not None and width * height > limit:
                    raise MediaError(
                        f"{path}: image of {width}x{height} = {width * height} pixels exceeds the "
                        f"decompression-bomb limit of {limit} pixels"
                    )
                image.load()
                upright = ImageOps.exif_transpose(image)
                return upright.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{path}: decompression-bomb limit exceeded ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"{path}: not a readable image ({exc})") from exc
