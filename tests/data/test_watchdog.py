"""DecodeWatchdog: the same frames as decoding in-process, from one persistent child; a stuck decoder
is killed at its bound and replaced, a crashed one is replaced, and the next file decodes either way;
bad files come back as the same errors; a child belongs to its process and dies with it."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from misbehaving_decoders import CRASH, STUCK, mark, raise_a_bug, read_video_or_misbehave
from vidlora.data.media import MediaError, read_video
from vidlora.data.synthetic import pick_h264_encoder, write_video
from vidlora.data.watchdog import HARD_LIMIT_GRACE_S, DecoderCrashed, DecodeWatchdog

TIMEOUT_S = 1.0
# A killed child is replaced by a fresh interpreter importing PyAV: ~0.5 s here, far more on a
# loaded machine; the bound only says "returned instead of hanging".
SLACK_S = 20.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers; it is dead if the kernel says so.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether ``pid`` is dead by ``within_s`` (an orphan is reaped by init a moment after it exits)."""
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("watchdog")
    rng = np.random.default_rng(0)
    paths = []
    for k, (frames, height, width) in enumerate([(10, 24, 32), (5, 32, 32), (12, 16, 16)]):
        path = root / f"v{k}.mp4"
        write_video(
            rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8), path, 8, pick_h264_encoder()
        )
        paths.append(path)
    return paths


@pytest.fixture
def watchdog():
    dog = DecodeWatchdog(read_video_or_misbehave)
    yield dog
    dog.close()


def _same_as_in_process(dog: DecodeWatchdog, path: Path, num_frames: int = 8) -> None:
    frames, indices = dog(path, num_frames, timeout_s=10)
    want_frames, want_indices = read_video(path, num_frames, timeout_s=10)
    assert frames.dtype == np.uint8 and frames.shape == want_frames.shape
    np.testing.assert_array_equal(frames, want_frames)
    np.testing.assert_array_equal(indices, want_indices)
    assert indices.dtype == np.int64


def test_frames_equal_in_process_decoding_from_one_persistent_child(videos):
    dog = DecodeWatchdog()  # the real reader, as training uses it
    try:
        assert dog.pid is None  # started on first use
        _same_as_in_process(dog, videos[0])
        pid = dog.pid
        assert pid is not None and pid != os.getpid()
        for path in videos:
            _same_as_in_process(dog, path, num_frames=4)
        assert dog.pid == pid and dog.replaced == 0  # one child served every call
    finally:
        dog.close()
    assert dog.pid is None and not _alive(pid)


def test_bad_files_come_back_as_the_same_errors(watchdog, videos, tmp_path):
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n")
    with pytest.raises(MediaError) as info:
        watchdog(text, 8, timeout_s=10)
    with pytest.raises(MediaError) as direct:
        read_video(text, 8, timeout_s=10)
    assert str(info.value) == str(direct.value) and str(text) in str(info.value)
    with pytest.raises(MediaError, match="file not found"):
        watchdog(tmp_path / "missing.mp4", 8, timeout_s=10)
    with pytest.raises(ValueError, match="num_frames must be positive"):
        watchdog(videos[0], 0, timeout_s=10)
    pid = watchdog.pid
    _same_as_in_process(watchdog, videos[1])
    assert watchdog.pid == pid and watchdog.replaced == 0  # a bad file costs no child


def test_a_stuck_decoder_is_killed_at_its_bound_and_replaced(watchdog, videos, tmp_path):
    _same_as_in_process(watchdog, videos[0])
    first = watchdog.pid
    stuck = tmp_path / "stuck.mp4"
    stuck.write_bytes(videos[1].read_bytes())
    mark(stuck, STUCK)
    began = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        watchdog(stuck, 8, timeout_s=TIMEOUT_S)
    waited = time.monotonic() - began
    assert TIMEOUT_S + HARD_LIMIT_GRACE_S <= waited < TIMEOUT_S + HARD_LIMIT_GRACE_S + SLACK_S
    message = str(info.value)
    assert str(stuck) in message and f"timeout_s={TIMEOUT_S}" in message and "killed" in message
    assert not _alive(first) and watchdog.replaced == 1 and watchdog.pid is None
    # The next file decodes, in a fresh child.
    _same_as_in_process(watchdog, videos[2])
    assert watchdog.pid not in (None, first)


def test_a_crashed_decoder_is_replaced(watchdog, videos, tmp_path):
    crash = tmp_path / "crash.mp4"
    crash.write_bytes(videos[0].read_bytes())
    mark(crash, CRASH)
    _same_as_in_process(watchdog, videos[1])
    first = watchdog.pid
    with pytest.raises(DecoderCrashed) as info:
        watchdog(crash, 8, timeout_s=10)
    assert str(crash) in str(info.value) and "killed by SIGSEGV" in str(info.value)
    assert isinstance(info.value, MediaError) and watchdog.replaced == 1 and not _alive(first)
    _same_as_in_process(watchdog, videos[1])
    assert watchdog.pid not in (None, first)


def test_a_child_killed_while_idle_costs_no_sample(watchdog, videos):
    _same_as_in_process(watchdog, videos[0])
    first = watchdog.pid
    os.kill(first, signal.SIGKILL)
    _same_as_in_process(watchdog, videos[0])  # no error: it was not reading anything
    assert watchdog.pid != first and watchdog.replaced == 0


def test_a_bug_in_the_reader_is_not_a_bad_file(videos):
    dog = DecodeWatchdog(raise_a_bug)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)with a bug.*KeyError: 'a bug, not a bad file'"):
            dog(videos[0], 8, timeout_s=10)
    finally:
        dog.close()


def test_a_child_belongs_to_the_process_that_started_it(watchdog, videos):
    _same_as_in_process(watchdog, videos[0])
    parent_child = watchdog.pid
    copy = pickle.loads(pickle.dumps(watchdog))
    assert copy.pid is None and copy.function is read_video_or_misbehave

    class Decodes(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, k: int):
            frames, _ = watchdog(videos[k % 3], 8, timeout_s=10)
            return torch.from_numpy(frames), watchdog.pid

    # Forked DataLoader workers inherit the object; each starts its own child and leaves the parent's.
    loader = torch.utils.data.DataLoader(Decodes(), batch_size=None, num_workers=2)
    pids = set()
    for k, (frames, pid) in enumerate(loader):
        np.testing.assert_array_equal(frames.numpy(), read_video(videos[k % 3], 8)[0])
        pids.add(pid)
    assert len(pids) == 2 and parent_child not in pids
    assert watchdog.pid == parent_child and _alive(parent_child)
    assert all(_gone(pid) for pid in pids)  # gone with their workers


def test_a_stuck_child_dies_with_its_parent(videos, tmp_path):
    stuck = tmp_path / "stuck.mp4"
    stuck.write_bytes(videos[0].read_bytes())
    mark(stuck, STUCK)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = {[str(Path(__file__).resolve().parents[1])]!r}
        from misbehaving_decoders import read_video_or_misbehave
        from vidlora.data.watchdog import DecodeWatchdog
        dog = DecodeWatchdog(read_video_or_misbehave)
        dog({str(videos[0])!r}, 8, timeout_s=10)
        print(dog.pid, flush=True)
        dog({str(stuck)!r}, 8, timeout_s=3600)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(0.5)  # let it take the stuck request
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait()
    assert _gone(child)
