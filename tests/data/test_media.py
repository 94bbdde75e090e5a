"""read_video / probe_video / read_image on tiny generated files whose frames carry their own index."""

from __future__ import annotations

import struct
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vidlora.data import media
from vidlora.data.media import MediaError, probe_video, read_image, read_video

GRID_ROWS, GRID_COLS = 2, 4  # 8 bits: frame indices up to 255


def index_frame(index: int, height: int, width: int) -> np.ndarray:
    """An RGB frame whose index is written as a 2×4 grid of black/white blocks (bit 0 top-left)."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    bh, bw = height // GRID_ROWS, width // GRID_COLS
    for bit in range(GRID_ROWS * GRID_COLS):
        if (index >> bit) & 1:
            r, c = divmod(bit, GRID_COLS)
            frame[r * bh : (r + 1) * bh, c * bw : (c + 1) * bw] = 255
    return frame


def decode_index(frame: np.ndarray) -> int:
    """Read the block grid back: the mean of each block's centre half decides the bit."""
    height, width = frame.shape[:2]
    bh, bw = height // GRID_ROWS, width // GRID_COLS
    value = 0
    for bit in range(GRID_ROWS * GRID_COLS):
        r, c = divmod(bit, GRID_COLS)
        block = frame[r * bh + bh // 4 : (r + 1) * bh - bh // 4, c * bw + bw // 4 : (c + 1) * bw - bw // 4]
        value |= int(block.mean() > 127) << bit
    return value


def write_video(
    path: Path,
    frames: list[np.ndarray],
    codec: str,
    *,
    pix_fmt: str = "yuv420p",
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: float | None = None,
) -> Path:
    """Encode RGB frames with PyAV; ``pts``/``time_base`` give variable frame timing."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def indexed_clip(path: Path, n: int, codec: str, height: int = 48, width: int = 64, **kwargs) -> Path:
    return write_video(path, [index_frame(i, height, width) for i in range(n)], codec, **kwargs)


def expected_indices(n: int, t: int) -> list[int]:
    # Hand-checkable: linspace(0, n−1, t) truncated, as the original samples.
    return [int(x) for x in np.linspace(0, n - 1, t, dtype=int)]


CONTAINERS = [("mp4", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4")]


@pytest.mark.parametrize(("ext", "codec"), CONTAINERS)
def test_read_video_returns_exactly_the_sampled_frames(tmp_path: Path, ext: str, codec: str) -> None:
    clip = indexed_clip(tmp_path / f"clip.{ext}", 50, codec)
    frames, indices = read_video(clip, 8)
    assert indices.tolist() == [0, 7, 14, 21, 28, 35, 42, 49]
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    assert [decode_index(f) for f in frames] == indices.tolist()


@pytest.mark.parametrize(("ext", "codec"), CONTAINERS)
def test_short_video_repeats_indices(tmp_path: Path, ext: str, codec: str) -> None:
    clip = indexed_clip(tmp_path / f"short.{ext}", 5, codec)
    frames, indices = read_video(clip, 8)
    assert indices.tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    assert [decode_index(f) for f in frames] == [0, 0, 1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize(
    ("ext", "codec", "pix_fmt"),
    [
        ("mp4", "libx264", "yuv444p"),  # libx264 refuses odd sizes in 4:2:0
        ("webm", "libvpx-vp9", "yuv444p"),
        ("avi", "mpeg4", "yuv420p"),
    ],
)
@pytest.mark.parametrize(("height", "width"), [(97, 171), (171, 97)])
def test_odd_sizes(tmp_path: Path, ext: str, codec: str, pix_fmt: str, height: int, width: int) -> None:
    clip = indexed_clip(tmp_path / f"odd.{ext}", 12, codec, height, width, pix_fmt=pix_fmt)
    frames, indices = read_video(clip, 4)
    assert frames.shape == (4, height, width, 3)
    assert indices.tolist() == [0, 3, 7, 11]
    assert [decode_index(f) for f in frames] == [0, 3, 7, 11]


def sequential_frames(path: Path) -> list[np.ndarray]:
    """Every frame decoded in order, no seeking: the ground truth for pixel equality."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize(("num_frames", "t"), [(60, 8), (60, 40), (23, 23)])
def test_seeking_gives_the_same_pixels_as_sequential_decoding(
    tmp_path: Path, num_frames: int, t: int
) -> None:
    # Short GOPs (keyframe every 7 frames) with B-frames, so read_video seeks, reuses a running
    # decoder between close targets, and skips non-reference frames on the way; none of that may
    # change a pixel.
    rng = np.random.default_rng(3)
    frames = []
    for i in range(num_frames):
        frame = index_frame(i, 48, 64)
        frame[20:28] = rng.integers(0, 256, (8, 64, 3), dtype=np.uint8)  # texture between the bit rows
        frames.append(frame)
    clip = tmp_path / "gop.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"g": "7", "bf": "3"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    truth = sequential_frames(clip)
    got, indices = read_video(clip, t)
    assert indices.tolist() == expected_indices(num_frames, t)
    for frame, index in zip(got, indices, strict=True):
        assert np.array_equal(frame, truth[index]), f"frame {index} differs from sequential decoding"


def test_variable_frame_rate_uses_packet_timestamps(tmp_path: Path) -> None:
    # 10 frames spread over 1 s, then 30 frames packed into 0.3 s: fps × index would pick
    # frames far too late in the dense part.
    time_base = Fraction(1, 1000)
    pts = [i * 100 for i in range(10)] + [1000 + i * 10 for i in range(30)]
    clip = indexed_clip(tmp_path / "vfr.mp4", 40, "libx264", pts=pts, time_base=time_base)
    frames, indices = read_video(clip, 8)
    assert indices.tolist() == expected_indices(40, 8) == [0, 5, 11, 16, 22, 27, 33, 39]
    assert [decode_index(f) for f in frames] == [0, 5, 11, 16, 22, 27, 33, 39]


def test_misreported_frame_count_is_not_trusted(tmp_path: Path) -> None:
    clip = indexed_clip(tmp_path / "lying.avi", 30, "mpeg4")
    data = bytearray(clip.read_bytes())
    # Claim 100 frames in both AVI headers: avih.dwTotalFrames and strh.dwLength.
    avih = data.index(b"avih") + 8
    struct.pack_into("<I", data, avih + 16, 100)
    strh = data.index(b"strh") + 8
    struct.pack_into("<I", data, strh + 32, 100)
    clip.write_bytes(bytes(data))
    with av.open(str(clip)) as container:
        assert container.streams.video[0].frames == 100  # the lie is visible to a metadata reader
    frames, indices = read_video(clip, 8)
    assert indices.tolist() == expected_indices(30, 8) == [0, 4, 8, 12, 16, 20, 24, 29]
    assert [decode_index(f) for f in frames] == indices.tolist()
    assert probe_video(clip).num_frames == 30


def test_webm_without_frame_count(tmp_path: Path) -> None:
    clip = indexed_clip(tmp_path / "clip.webm", 20, "libvpx-vp9")
    with av.open(str(clip)) as container:
        assert container.streams.video[0].frames == 0
    info = probe_video(clip)
    assert (info.num_frames, info.width, info.height, info.codec, info.rotation) == (20, 64, 48, "vp9", 0)
    assert info.fps == 25.0 and info.duration_s == pytest.approx(0.8)


@pytest.mark.parametrize(("rotation", "quarter_turns"), [(-90, 1), (90, -1), (180, 2)])
def test_rotation_metadata_gives_upright_frames(tmp_path: Path, rotation: int, quarter_turns: int) -> None:
    # Upright content is portrait 64 high × 48 wide with a red marker in the top-left corner.
    # A player shows the stored frame turned counter-clockwise by `rotation` degrees, so the
    # stored frame is the upright one turned the other way.
    upright = []
    for i in range(6):
        frame = index_frame(i, 64, 48)
        frame[:8, :8] = (255, 0, 0)
        upright.append(frame)
    stored = [np.ascontiguousarray(np.rot90(f, k=quarter_turns)) for f in upright]
    clip = write_video(tmp_path / "rot.mp4", stored, "libx264", rotation=rotation)
    frames, indices = read_video(clip, 3)
    assert frames.shape == (3, 64, 48, 3)
    assert [decode_index(f) for f in frames] == indices.tolist() == [0, 2, 5]
    red = frames[:, :8, :8].reshape(3, -1, 3).mean(axis=1)
    assert (red[:, 0] > 200).all() and (red[:, 1:] < 60).all()
    info = probe_video(clip)
    assert (info.width, info.height, info.rotation) == (48, 64, rotation % 360)


def test_probe_mp4(tmp_path: Path) -> None:
    info = probe_video(indexed_clip(tmp_path / "clip.mp4", 50, "libx264"))
    assert (info.num_frames, info.fps, info.width, info.height, info.codec) == (50, 25.0, 64, 48, "h264")
    assert info.duration_s == pytest.approx(2.0)


def test_missing_empty_and_text_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(MediaError, match=r"missing\.mp4: file not found"):
        read_video(missing)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4: empty file"):
        read_video(empty)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(MediaError, match=r"notes\.mp4: not a readable video"):
        read_video(text)
    with pytest.raises(MediaError, match=r"notes\.mp4"):
        probe_video(text)
    still = tmp_path / "still.mp4"
    Image.new("RGB", (8, 8)).save(still, format="PNG")
    with pytest.raises(MediaError, match=r"still\.mp4: a still image \(png_pipe\), not a video"):
        read_video(still)
    audio = tmp_path / "audio.mp4"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(MediaError, match=r"audio\.mp4: no video stream"):
        read_video(audio)
    assert issubclass(MediaError, ValueError)


def _noise_clip(path: Path, n: int, **kwargs) -> Path:
    rng = np.random.default_rng(0)  # noise makes packets large, so a cut lands inside frame data
    return write_video(
        path, [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)], "libx264", **kwargs
    )


def test_truncated_mp4(tmp_path: Path) -> None:
    whole = _noise_clip(tmp_path / "whole.mp4", 40)
    half = tmp_path / "half.mp4"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    # PyAV writes the index (moov) last, so the first half has frame data and no index.
    with pytest.raises(MediaError, match=r"half\.mp4: not a readable video"):
        read_video(half)


def test_truncated_faststart_mp4(tmp_path: Path) -> None:
    # With the index first ("faststart"), a cut file still opens; its last packet is partial.
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(40):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    half = tmp_path / "half_fs.mp4"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(MediaError, match=r"half_fs\.mp4: truncated or corrupt video"):
        read_video(half)


def test_damaged_frame_is_refused_not_concealed(tmp_path: Path) -> None:
    # Zero the second half of frame 9's packet. FFmpeg conceals the damage (grey blocks) and
    # flags the frame corrupt; read_video must refuse it rather than return the concealed pixels.
    rng = np.random.default_rng(0)
    clip = tmp_path / "damaged.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream(
            "libx264", rate=25, options={"threads": "1"}
        )  # a reproducible bitstream
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(20):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(clip)) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size)
    _, pos, size = packets[9]
    undamaged = read_video(clip, 2)[0]
    data = bytearray(clip.read_bytes())
    data[pos + size // 2 : pos + size] = bytes(size - size // 2)
    clip.write_bytes(bytes(data))
    # Frames 0 and 19 read back unchanged: the damage is local to frame 9 (x264 codes noise
    # mostly intra, so little references it) and the decoder flags only frame 9.
    frames, indices = read_video(clip, 2)
    assert indices.tolist() == [0, 19] and np.array_equal(frames, undamaged)
    with pytest.raises(MediaError, match=r"damaged\.mp4: frame at pts 4608 decodes with errors"):
        read_video(clip, 20)


def test_timeout_during_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inject a slow frame conversion (0.1 s per frame): 8 frames cannot fit in 0.3 s, so the
    # deadline checked between frames must fire, naming the file.
    clip = indexed_clip(tmp_path / "slowdecode.mp4", 16, "libx264")
    real = media._to_rgb

    def slow_to_rgb(frame: av.VideoFrame, path: str, reformatter: object) -> np.ndarray:
        time.sleep(0.1)
        return real(frame, path, reformatter)

    monkeypatch.setattr(media, "_to_rgb", slow_to_rgb)
    with pytest.raises(
        TimeoutError, match=r"slowdecode\.mp4: reading the video took longer than timeout_s=0\.3"
    ):
        read_video(clip, 8, timeout_s=0.3)


def test_timeout_names_the_path(tmp_path: Path) -> None:
    clip = _noise_clip(tmp_path / "slow.mp4", 30)
    with pytest.raises(TimeoutError, match=r"slow\.mp4: reading the video took longer than timeout_s=1e-09"):
        read_video(clip, timeout_s=1e-9)
    frames, _ = read_video(clip, 2, timeout_s=60.0)  # the same file reads fine with a real budget
    assert frames.shape == (2, 48, 64, 3)


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:10, :10] = (255, 0, 0)  # red marker top-left of the stored (landscape) image
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display = stored turned 90° clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif.tobytes(), quality=95)
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (40, 60)  # (width, height): now portrait
    out = np.asarray(image)
    # Turned clockwise, the top-left marker lands top-right.
    assert out[:10, -10:, 0].mean() > 200 and out[:10, :10, 0].mean() < 50


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_read_image_converts_to_rgb(tmp_path: Path, mode: str) -> None:
    image = Image.fromarray(np.full((7, 9, 3), 200, dtype=np.uint8)).convert(mode)
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    out = read_image(path)
    assert out.mode == "RGB" and out.size == (9, 7)


def test_read_image_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(MediaError, match=r"bad\.jpg: not a readable image"):
        read_image(bad)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(MediaError, match=r"cut\.png"):
        read_image(cut)


def test_read_image_decompression_bomb_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)  # 5000 pixels
    with pytest.raises(MediaError, match=r"big\.png: image of 100x50 = 5000 pixels exceeds .* 4999 pixels"):
        read_image(path, max_pixels=4999)
    assert read_image(path, max_pixels=5000).size == (100, 50)
