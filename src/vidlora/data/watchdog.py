"""Decoding videos in a helper process with a hard time limit, so a stuck decoder costs one sample.

PyAV checks ``--decode_timeout`` between packets and frames (:mod:`vidlora.data.media`), but a call
blocked inside FFmpeg cannot be interrupted from Python, and a crash inside FFmpeg (a segfault)
kills the process it runs in. :class:`DecodeWatchdog` runs the decode in a persistent child process
owned by the process that reads (each DataLoader worker has its own) and waits for the answer at
most ``timeout_s`` + :data:`HARD_LIMIT_GRACE_S`: then it kills the child (SIGKILL) and raises
:class:`TimeoutError`; a child that dies raises :class:`DecoderCrashed`. The next call starts a
fresh child, so only that file's sample is lost.

The child is a fresh interpreter (``python -m vidlora.data.watchdog``), not a fork: DataLoader
workers are daemonic and may not start ``multiprocessing`` children, and a fork of a process running
threads (torch's, FFmpeg's) can deadlock. It imports PyAV and numpy only (about 0.5 s and 50 MB,
once per reading process) and sends the frames back as raw bytes over a pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, MediaError, VideoReader, read_video

#: A slow decode stops at ``timeout_s`` inside the child (which lives on, as PyAV's own check raises
#: there); one stuck inside an FFmpeg call is killed this much later.
HARD_LIMIT_GRACE_S = 1.0
#: Seconds a new child may take to import PyAV and answer (generous: a loaded machine is slow).
DEFAULT_STARTUP_TIMEOUT_S = 120.0

# The errors a decode is expected to raise for a bad file, as the child names them in its reply.
_EXPECTED: dict[str, type[Exception]] = {"media": MediaError, "timeout": TimeoutError, "value": ValueError}


class DecoderCrashed(MediaError):
    """The decoder process died while reading a file (a crash inside FFmpeg, or killed from outside)."""


class DecoderStartError(RuntimeError):
    """A decoder process could not be started (the environment is broken, not a file)."""


@dataclass
class _Child:
    """One running decoder process and the two pipe ends its parent holds."""

    process: subprocess.Popen
    requests: Connection
    replies: Connection
    owner: int  # the pid of the process that started it: a forked copy of this object is not its owner

    def stop(self) -> None:
        """Kill (idle or stuck, it has nothing to finish) and reap the process; close the pipes."""
        if self.owner != os.getpid():
            return
        if self.process.poll() is None:
            self.process.kill()
        # A process in uninterruptible sleep is reaped by the kernel later.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.requests.close()
        self.replies.close()

    def exit_reason(self) -> str:
        """How the process ended ("killed by SIGSEGV", "exit status 1"); waits briefly for it."""
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"


class DecodeWatchdog:
    """A :class:`~vidlora.data.media.VideoReader` that runs ``function`` in a watched child process.

    Call it like :func:`~vidlora.data.media.read_video`. Expected failures of a bad file
    (:class:`MediaError`, :class:`TimeoutError`, :class:`ValueError`) come back from the child as
    the same types and messages; any other exception there is a bug and raises
    :class:`RuntimeError` with the child's traceback. The object pickles without its child (a
    child belongs to the process that started it), so a dataset holding one can go to DataLoader
    workers of any start method.

    Args:
        function: the reader to run in the child; it must pickle by reference (a module-level
            function). Tests pass one that blocks or crashes.
        startup_timeout_s: how long a new child may take to come up.
    """

    def __init__(
        self, function: VideoReader = read_video, *, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    ) -> None:
        self.function = function
        self.startup_timeout_s = startup_timeout_s
        #: Children killed after a time-out or found dead after a crash, in this process.
        self.replaced = 0
        self._child: _Child | None = None
        self._finalizer: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"function": self.function, "startup_timeout_s": self.startup_timeout_s, "replaced": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _child=None, _finalizer=None)

    @property
    def pid(self) -> int | None:
        """The pid of this process's running child, if one is up."""
        child = self._own_child()
        return None if child is None or child.process.poll() is not None else child.process.pid

    def close(self) -> None:
        """Stop this process's child (a later call starts a new one)."""
        child, self._child = self._own_child(), None
        if child is not None:
            child.stop()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __call__(
        self, path: str | os.PathLike[str], num_frames: int = 8, *, timeout_s: float = DEFAULT_DECODE_TIMEOUT
    ) -> tuple[np.ndarray, np.ndarray]:
        path = os.fspath(path)
        request = pickle.dumps((path, num_frames, timeout_s))
        end = time.monotonic() + timeout_s + HARD_LIMIT_GRACE_S
        # A child that died while idle (killed from outside, say) was reading nothing: it is replaced
        # without cost. The child acknowledges a request before it starts on it, so a death before
        # the acknowledgement is that case too, and only a death after it is this file's.
        for attempt in range(2):
            child = self._own_child()
            if child is None or child.process.poll() is not None:
                self.close()
                child = self._start()
            try:
                child.requests.send_bytes(request)
                self._wait(child, path, end, timeout_s)
                child.replies.recv_bytes()  # the acknowledgement
            except (EOFError, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 1:
                    raise DecoderStartError("the decoder process dies before it takes a request") from None
                continue
            return self._receive(child, path, end, timeout_s)
        raise AssertionError("unreachable")

    # -- internals --------------------------------------------------------------------------

    def _own_child(self) -> _Child | None:
        if self._child is not None and self._child.owner != os.getpid():
            self._child = None  # inherited through a fork: the parent's child, not ours to use or kill
        return self._child

    def _start(self) -> _Child:
        to_child, requests_fd = os.pipe()
        replies_fd, from_child = os.pipe()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "vidlora.data.watchdog", str(to_child), str(from_child)],
                pass_fds=(to_child, from_child),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as err:
            os.close(requests_fd)
            os.close(replies_fd)
            raise DecoderStartError(f"cannot start a decoder process: {err}") from err
        finally:
            # The child's ends live in the child now.
            os.close(to_child)
            os.close(from_child)
        child = _Child(
            process,
            Connection(requests_fd, readable=False),
            Connection(replies_fd, writable=False),
            os.getpid(),
        )
        try:
            # sys.path first, so that the function's module (a test's, say) imports in the child.
            child.requests.send_bytes(pickle.dumps({"sys_path": sys.path, "parent": os.getpid()}))
            child.requests.send_bytes(pickle.dumps(self.function))
            ready = child.replies.poll(self.startup_timeout_s) and pickle.loads(child.replies.recv_bytes())
        except (OSError, EOFError) as err:
            reason = child.exit_reason()
            child.stop()
            raise DecoderStartError(f"the decoder process failed to start ({reason}): {err}") from err
        if ready != "ready":
            child.stop()
            raise DecoderStartError(
                f"the decoder process did not start within {self.startup_timeout_s} s (got {ready!r})"
            )
        self._child = child
        # Interpreter exit stops it. A DataLoader worker leaves through os._exit, which runs no
        # finalizer: its pipes close, and the child exits at the end of its input (or, stuck, with
        # its parent through PR_SET_PDEATHSIG).
        self._finalizer = weakref.finalize(self, child.stop)
        return child

    def _kill(self) -> None:
        self.close()
        self.replaced += 1

    def _wait(self, child: _Child, path: str, end: float, timeout_s: float) -> None:
        """Wait until the child has something to read, or kill it at ``end``."""
        if not child.replies.poll(max(0.0, end - time.monotonic())):
            self._kill()
            raise TimeoutError(
                f"{path}: the decoder did not finish within timeout_s={timeout_s} s (stuck inside "
                "FFmpeg?); its process was killed and is replaced for the next file"
            )

    def _receive(
        self, child: _Child, path: str, end: float, timeout_s: float
    ) -> tuple[np.ndarray, np.ndarray]:
        try:
            self._wait(child, path, end, timeout_s)
            header = pickle.loads(child.replies.recv_bytes())
            if header[0] != "ok":
                return self._raise_reply(header, path)
            shape, dtype, indices = header[1:]
            frames = np.empty(shape, dtype=np.dtype(dtype))
            self._wait(child, path, end, timeout_s)
            child.replies.recv_bytes_into(frames.data.cast("B"))
            return frames, np.asarray(indices, dtype=np.int64)
        except (EOFError, ConnectionResetError) as err:
            reason = child.exit_reason()
            self._kill()
            raise DecoderCrashed(
                f"{path}: the decoder process died while reading this file ({reason}); it is replaced for "
                "the next file"
            ) from err

    def _raise_reply(self, header: tuple, path: str) -> tuple[np.ndarray, np.ndarray]:
        status, message = header[0], header[1]
        expected = _EXPECTED.get(status)
        if expected is not None:
            raise expected(message)
        raise RuntimeError(f"decoding {path} in the decoder process failed with a bug:\n{message}")


# -- the child ------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a stuck child must not outlive it)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(0)


def _reply_error(replies: Connection, exc: BaseException) -> None:
    for status, kind in _EXPECTED.items():
        if isinstance(exc, kind):
            replies.send_bytes(pickle.dumps((status, str(exc))))
            return
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    replies.send_bytes(pickle.dumps(("bug", text)))


def serve(requests_fd: int, replies_fd: int) -> None:
    """The child's loop: read ``(path, num_frames, timeout_s)`` requests until the parent goes away."""
    requests = Connection(requests_fd, writable=False)
    replies = Connection(replies_fd, readable=False)
    setup = pickle.loads(requests.recv_bytes())
    _die_with_parent(setup["parent"])
    sys.path.extend(p for p in setup["sys_path"] if p not in sys.path)
    function = pickle.loads(requests.recv_bytes())
    replies.send_bytes(pickle.dumps("ready"))
    while True:
        try:
            path, num_frames, timeout_s = pickle.loads(requests.recv_bytes())
        except EOFError:
            return
        replies.send_bytes(b"")  # taken: a death from here on is this file's
        try:
            frames, indices = function(path, num_frames, timeout_s=timeout_s)
            frames = np.ascontiguousarray(frames)
        except Exception as exc:
            _reply_error(replies, exc)
            continue
        replies.send_bytes(pickle.dumps(("ok", frames.shape, frames.dtype.str, np.asarray(indices).tolist())))
        replies.send_bytes(frames.data.cast("B"))


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
