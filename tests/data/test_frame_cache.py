"""FrameCache: a hit returns the uncached decode's exact pixels; changed content (same size, same
mtime) or a changed setting never reuses an entry; damaged entries are counted, removed and
recomputed; two processes filling one cache leave identical valid entries; a bad file fails exactly
as without the cache; `vidlora cache` fills, reruns as all hits and names a broken video."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vidlora.cli import main as vidlora
from vidlora.data.dataset import MediaFolders, SampleError, SupervisedDataset
from vidlora.data.frame_cache import TENSOR_NAME, CacheStats, FrameCache, content_id, entry_key
from vidlora.data.media import MediaError
from vidlora.data.processor import Processor
from vidlora.data.records import load_records
from vidlora.data.synthetic import generate_dataset
from vidlora.model.tokenizer import build_tiny_tokenizer

SIZE, T = 16, 4


def _processor(**changes) -> Processor:
    fields = dict(
        template="v1",
        prompt_tokenization="whole_prompt",
        image_size=SIZE,
        image_tokens=4,
        video_tokens=12,
        num_frames=T,
        mm_vision_select_layer=-2,
        model_max_length=None,
    )
    return Processor(**{**fields, **changes})


def write_raw_video(path, seed: int, num_frames: int = 6, side: int = 20) -> None:
    """An uncompressed video: any two with the same shape have the same size, whatever the pixels."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=8)
        stream.width = stream.height = side
        stream.pix_fmt = "rgb24"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (side, side, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture
def media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    for k in range(3):
        write_raw_video(root / f"v{k}.avi", seed=k)
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "p.png")
    (root / "text.avi").write_text("this is not a video\n")
    return root


def _entries(cache_root):
    return sorted(cache_root.glob("*/*.safetensors"))


def test_hit_gives_the_uncached_pixels_exactly(media, tmp_path):
    processor = _processor()
    cache = FrameCache(tmp_path / "cache")
    fresh_video = processor.load_video(media / "v0.avi")
    fresh_image = processor.load_image(media / "p.png")
    first = cache.load_video(processor, media / "v0.avi")
    assert cache.stats == CacheStats(misses=1, bytes_written=cache.stats.bytes_written)
    second = cache.load_video(processor, media / "v0.avi")
    assert cache.stats.hits == 1 and cache.stats.misses == 1
    assert second.dtype == torch.float32 and second.shape == (T, 3, SIZE, SIZE)
    assert torch.equal(first, fresh_video) and torch.equal(second, fresh_video)
    assert torch.equal(cache.load_image(processor, media / "p.png"), fresh_image)
    assert torch.equal(cache.load_image(processor, media / "p.png"), fresh_image)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (2, 2, 0)
    # Layout: root/<first two hex digits>/<key>.safetensors; the key is the content + settings.
    entries = _entries(cache.root)
    assert len(entries) == 2 and all(p.parent.name == p.stem[:2] for p in entries)
    key, _ = entry_key(content_id(media / "v0.avi"), processor.media_settings("video"))
    assert cache.entry_path(key) in entries
    # What a fresh process sees: the bytes on disk, counted; the header names the source file.
    assert cache.stats.bytes_written == sum(p.stat().st_size for p in entries)
    with open(cache.entry_path(key), "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert header["__metadata__"]["source"] == str(media / "v0.avi")
    assert header[TENSOR_NAME]["shape"] == [T, 3, SIZE, SIZE] and header[TENSOR_NAME]["dtype"] == "F32"


def test_changed_content_with_the_same_size_and_mtime_misses(media, tmp_path):
    processor = _processor()
    cache = FrameCache(tmp_path / "cache")
    video = media / "v0.avi"
    old = cache.load_video(processor, video)
    st = os.stat(video)
    write_raw_video(video, seed=99)  # other pixels, same byte count
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(video).st_size == st.st_size and os.stat(video).st_mtime_ns == st.st_mtime_ns
    new = cache.load_video(processor, video)
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert torch.equal(new, processor.load_video(video)) and not torch.equal(new, old)
    assert len(_entries(cache.root)) == 2


def test_every_setting_is_part_of_the_key(media, tmp_path):
    cache = FrameCache(tmp_path / "cache")
    video, image = media / "v1.avi", media / "p.png"
    base = _processor()
    # Videos: frames and input size; images: aspect handling and input size.
    variants = {
        "video": [base, _processor(num_frames=3, video_tokens=9), _processor(image_size=8)],
        "image": [base, _processor(image_aspect_ratio="square"), _processor(image_size=8)],
    }
    for kind, processors in variants.items():
        path = video if kind == "video" else image
        keys = {entry_key(content_id(path), p.media_settings(kind))[0] for p in processors}
        assert len(keys) == len(processors)
        for processor in processors:
            load = processor.load_video if kind == "video" else processor.load_image
            got = cache.get(path, kind, processor, lambda: load(path)).pixels  # noqa: B023
            assert torch.equal(got, load(path))
    assert cache.stats.misses == 6 and cache.stats.hits == 0
    # The images' aspect setting does not touch videos: the same video entry is found again.
    cache.load_video(_processor(image_aspect_ratio="square"), video)
    assert cache.stats.hits == 1


def _flip_tensor_bytes(path):
    data = bytearray(path.read_bytes())
    data[-40:-20] = bytes(255 - b for b in data[-40:-20])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _empty(path):
    path.write_bytes(b"")


def _wrong_shape(path):
    # A well-formed file carrying the right metadata, but the tensor of another shape.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({TENSOR_NAME: torch.zeros(T - 1, 3, SIZE, SIZE)}, str(path), metadata=metadata)


@pytest.mark.parametrize("damage", [_flip_tensor_bytes, _truncate, _empty, _wrong_shape])
def test_a_damaged_entry_is_counted_removed_and_recomputed(media, tmp_path, damage):
    processor = _processor()
    cache = FrameCache(tmp_path / "cache")
    video = media / "v2.avi"
    cache.load_video(processor, video)
    (entry,) = _entries(cache.root)
    damage(entry)
    got = cache.load_video(processor, video)
    assert torch.equal(got, processor.load_video(video))
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (0, 1, 1)
    # The replacement is valid: a fresh cache (another process) reads it as a hit.
    again = FrameCache(cache.root)
    assert torch.equal(again.load_video(processor, video), got) and again.stats.hits == 1


def test_an_entry_under_another_key_is_corrupt(media, tmp_path):
    processor = _processor()
    cache = FrameCache(tmp_path / "cache")
    cache.load_video(processor, media / "v0.avi")
    (entry_a,) = _entries(cache.root)
    key_b, _ = entry_key(content_id(media / "v1.avi"), processor.media_settings("video"))
    target = cache.entry_path(key_b)
    target.parent.mkdir(exist_ok=True)
    shutil.copy(entry_a, target)  # v0's pixels where v1's belong
    got = cache.load_video(processor, media / "v1.avi")
    assert cache.stats.corrupt == 1 and torch.equal(got, processor.load_video(media / "v1.avi"))


def test_a_bad_file_fails_exactly_as_without_the_cache(media, tmp_path):
    processor = _processor()
    cache = FrameCache(tmp_path / "cache")
    with pytest.raises(MediaError) as uncached:
        processor.load_video(media / "text.avi")
    with pytest.raises(MediaError) as cached:
        cache.load_video(processor, media / "text.avi")
    assert str(cached.value) == str(uncached.value) and _entries(cache.root) == []
    with pytest.raises(MediaError) as missing:
        cache.load_video(processor, media / "absent.avi")
    assert "absent.avi" in str(missing.value)
    # Through the dataset: the same SampleError naming the sample and the file.
    records = tmp_path / "train.json"
    turns = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "red"}]
    records.write_text(json.dumps([{"id": "bad", "video": "text.avi", "conversations": turns}]))
    messages = []
    for frame_cache in (None, cache):
        dataset = SupervisedDataset(
            load_records(records),
            processor=processor,
            tokenizer=build_tiny_tokenizer(),
            folders=MediaFolders(media, media),
            frame_cache=frame_cache,
        )
        with pytest.raises(SampleError) as err:
            dataset[0]
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "'bad'" in messages[0] and "text.avi" in messages[0]


def _fill_in_child(root, paths, barrier) -> None:
    cache = FrameCache(root)
    processor = _processor()
    barrier.wait()
    for path in paths:
        cache.load_video(processor, path)


def test_two_processes_filling_one_cache(media, tmp_path):
    root = tmp_path / "cache"
    paths = [media / f"v{k}.avi" for k in range(3)] * 2
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    children = [
        context.Process(target=_fill_in_child, args=(root, order, barrier)) for order in (paths, paths[::-1])
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    processor = _processor()
    reader = FrameCache(root)
    for path in paths[:3]:
        assert torch.equal(reader.load_video(processor, path), processor.load_video(path))
    assert reader.stats == CacheStats(hits=3)
    assert len(_entries(root)) == 3 and reader.temp_files() == []
    assert [p for p in root.rglob("*") if p.is_file() and p.suffix != ".safetensors"] == []
    # The entries one process alone writes: same files, metadata and tensors (safetensors orders the
    # metadata of each writer its own way, so the bytes are not compared).
    alone = FrameCache(tmp_path / "alone")
    for path in paths[:3]:
        alone.load_video(processor, path)
    names = [p.relative_to(alone.root) for p in _entries(alone.root)]
    assert names == [p.relative_to(root) for p in _entries(root)]
    for name in names:
        (meta_a, pixels_a), (meta_b, pixels_b) = (_read_entry(r / name) for r in (alone.root, root))
        assert meta_a == meta_b and torch.equal(pixels_a, pixels_b)


def _read_entry(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), handle.get_tensor(TENSOR_NAME)


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    cache = FrameCache(tmp_path / "cache")
    (cache.root / "ab").mkdir()
    old, fresh = cache.root / "ab" / ".abc.1.tmp", cache.root / "ab" / ".abc.2.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (1, 1))
    assert cache.temp_files() == [old, fresh]
    assert cache.remove_stale_temp_files() == 1 and cache.temp_files() == [fresh]


# -- `vidlora cache` ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, 6, 0, seed=0, size=32, num_frames=8)
    return root


def _cache_cli(root, cache, *paths, workers=1):
    argv = [
        "cache",
        "--data_path",
        *map(str, paths),
        "--video_folder",
        str(root),
        "--image_folder",
        str(root),
    ]
    return vidlora([*argv, "--frame_cache", str(cache), "--workers", str(workers), "--no_progress"])


def _counts(out):
    found = re.search(r"hits (\d+), misses (\d+), corrupt \(recomputed\) (\d+), written ([\d.]+) MB", out)
    assert found, out
    return tuple(int(x) for x in found.groups()[:3]), float(found.group(4))


def _media_of(records):
    """The distinct videos and images the records name, counted from the JSON itself."""
    videos = {r["video"] for r in records if "video" in r}
    images = {
        i for r in records for i in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", []))
    }
    return videos, images


def test_cache_command_fills_then_hits(synth, tmp_path, capsys):
    records = json.loads((synth / "train.json").read_text())
    videos, images = _media_of(records)
    n = len(videos) + len(images)
    assert n > 2
    cache = tmp_path / "cache"
    assert _cache_cli(synth, cache, synth / "train.json", workers=2) == 0
    out = capsys.readouterr().out
    assert _counts(out)[0] == (0, n, 0) and _counts(out)[1] > 0
    assert f"{len(videos)} video(s) and {len(images)} image(s) named by {len(records)} sample(s)" in out
    sizes = [p.stat().st_size for p in _entries(cache)]
    assert len(sizes) == n
    assert f"cache directory: {n} entries, {sum(sizes) / 1e6:.3f} MB" in out
    assert re.search(r"video entries \d+, mean [\d.]+ MB; image entries \d+, mean [\d.]+ MB; total", out)
    assert "OK: every media file is cached" in out

    assert _cache_cli(synth, cache, synth / "train.json") == 0
    assert _counts(capsys.readouterr().out) == ((n, 0, 0), 0.0)


def test_cache_command_names_a_broken_video_and_fills_the_rest(synth, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    records = json.loads((data / "train.json").read_text())
    broken = next(r for r in records if "video" in r)
    (data / broken["video"]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    cache = tmp_path / "cache"
    assert _cache_cli(data, cache, data / "train.json") == 1
    out = capsys.readouterr().out
    videos, images = _media_of(records)
    # Every file but the broken one is computed and cached; the broken one counts as no lookup.
    assert _counts(out)[0] == (0, len(videos) + len(images) - 1, 0)
    assert len(_entries(cache)) == len(videos) + len(images) - 1
    line = next(line for line in out.splitlines() if broken["video"] in line)
    assert f"id {broken['id']!r}" in line and "[unreadable_media]" in line
    assert "FAILED: 1 sample media file(s)" in out


def test_check_with_a_frame_cache_fills_it_as_the_cache_command_would(synth, tmp_path, capsys):
    videos, images = _media_of(json.loads((synth / "train.json").read_text()))
    n = len(videos) + len(images)
    cache = tmp_path / "cache"
    argv = ["check", "--data_path", str(synth / "train.json"), "--video_folder", str(synth)]
    argv += ["--image_folder", str(synth), "--frame_cache", str(cache), "--no_progress"]
    assert vidlora(argv) == 0
    out = capsys.readouterr().out
    assert f"frame cache {cache}: " in out and _counts(out)[0] == (0, n, 0)
    assert _cache_cli(synth, cache, synth / "train.json") == 0
    assert _counts(capsys.readouterr().out) == ((n, 0, 0), 0.0)


def test_the_content_hash_is_memoised_only_while_the_file_is_unchanged(media, tmp_path, monkeypatch):
    import vidlora.data.frame_cache as frame_cache

    hashed = []

    def counting(path):
        hashed.append(path)
        return content_id(path)

    monkeypatch.setattr(frame_cache, "content_id", counting)
    monkeypatch.setattr(frame_cache, "_RACY_NS", 0)  # memoise even a file written a moment ago
    processor = _processor()
    cache = FrameCache(tmp_path / "cache")
    video = media / "v0.avi"
    cache.load_video(processor, video)
    cache.load_video(processor, video)
    assert len(hashed) == 1 and cache.stats.hits == 1
    st = os.stat(video)
    time.sleep(0.05)  # past the file system's timestamp granularity
    write_raw_video(video, seed=98)  # same size; the old mtime is restored, the ctime cannot be
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = cache.load_video(processor, video)
    assert len(hashed) == 2 and cache.stats.misses == 2
    assert torch.equal(got, processor.load_video(video))


def test_cache_command_flag_errors(synth, tmp_path, capsys):
    argv = ["cache", "--data_path", str(synth / "train.json"), "--no_progress"]
    assert vidlora(argv) == 2
    assert "--frame_cache DIR is required" in capsys.readouterr().err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert vidlora([*argv, "--frame_cache", str(not_a_dir)]) == 2
    assert f"--frame_cache {not_a_dir}: cannot create the directory" in capsys.readouterr().err


def test_dataloader_workers_fill_and_read_one_cache(media, tmp_path):
    from torch.utils.data import DataLoader

    turns = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "red"}]
    records = tmp_path / "train.json"
    records.write_text(
        json.dumps([{"id": f"s{k}", "video": f"v{k}.avi", "conversations": turns} for k in range(3)])
    )
    processor, tokenizer = _processor(), build_tiny_tokenizer()
    cache = FrameCache(tmp_path / "cache")

    def dataset(frame_cache):
        return SupervisedDataset(
            load_records(records),
            processor=processor,
            tokenizer=tokenizer,
            folders=MediaFolders(media, media),
            frame_cache=frame_cache,
        )

    expected = [item["pixel_values_videos"] for item in dataset(None)]
    for _ in range(2):  # the first epoch fills the cache in the workers, the second reads it
        loader = DataLoader(dataset(cache), batch_size=None, num_workers=2)
        assert all(
            torch.equal(item["pixel_values_videos"], e) for item, e in zip(loader, expected, strict=True)
        )
    assert len(_entries(cache.root)) == 3 and cache.temp_files() == []
    # The workers counted their own lookups; a process reading the cache now finds every entry.
    reader = FrameCache(cache.root)
    assert [reader.load_video(processor, media / f"v{k}.avi").shape for k in range(3)] == [
        (T, 3, SIZE, SIZE)
    ] * 3
    assert reader.stats == CacheStats(hits=3)
