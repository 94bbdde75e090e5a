"""Stand-ins for a decoder stuck inside one FFmpeg call, or crashing in it.

No file can be made that reliably hangs or crashes FFmpeg (and one replaced by a FIFO, which really
blocks a read, is refused before it is opened: see the dataset tests), so these readers do it on
request: :func:`read_video_or_misbehave` is :func:`~vidlora.data.media.read_video` unless a marker
file next to the video says ``.stuck`` (sleep, never checking any deadline, as a blocked C call does)
or ``.crash`` (die of SIGSEGV, as a segfault in FFmpeg does). They run inside the watchdog's child
process, which imports this module by name (the watchdog hands it the parent's ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, read_video

STUCK = ".stuck"
CRASH = ".crash"


def mark(video: Path, how: str) -> Path:
    """Make :func:`read_video_or_misbehave` get stuck (``STUCK``) or crash (``CRASH``) on ``video``."""
    marker = Path(f"{video}{how}")
    marker.touch()
    return marker


def read_video_or_misbehave(
    path: str | os.PathLike[str], num_frames: int = 8, *, timeout_s: float = DEFAULT_DECODE_TIMEOUT
) -> tuple[np.ndarray, np.ndarray]:
    path = os.fspath(path)
    if os.path.exists(path + STUCK):
        while True:
            time.sleep(3600)
    if os.path.exists(path + CRASH):
        os.kill(os.getpid(), signal.SIGSEGV)
    return read_video(path, num_frames, timeout_s=timeout_s)


def raise_a_bug(
    path: str | os.PathLike[str], num_frames: int = 8, *, timeout_s: float = DEFAULT_DECODE_TIMEOUT
) -> tuple[np.ndarray, np.ndarray]:
    """A reader with a bug in it (not a bad file)."""
    raise KeyError("a bug, not a bad file")


@contextlib.contextmanager
def bounded(seconds: float, what: str) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (it would have hung)."""

    def expire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
