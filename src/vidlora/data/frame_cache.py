"""A disk cache of decoded, pre-processed media: every epoch reads pixels instead of decoding videos.

An entry holds one file's pixels exactly as :class:`~vidlora.data.processor.Processor` produces them
(video float32 ``[T, 3, S, S]``, image float32 ``[3, S, S]``). Its key is the file's *content*
(size + blake2b of every byte: a path or an mtime says nothing about what is in the file now),
every pre-processing setting (:meth:`Processor.media_settings`), the decoding libraries' versions
and :data:`PREPROCESS_VERSION`; a changed file or setting therefore finds no entry, never a stale one.

Entries are safetensors files ``root/ab/abcdef….safetensors`` carrying their key fields, a checksum
of the tensor bytes and the source path. They are written to a temporary file in the same directory
and renamed into place, so DataLoader workers and processes filling one cache at once never see half
an entry. An entry that is unreadable, fails its checksum, has the wrong shape/dtype or another key
is counted as corrupt, removed and recomputed: it never reaches the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import PIL
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from vidlora.data.media import DEFAULT_DECODE_TIMEOUT, VideoReader, read_video
from vidlora.errors import UsageError, VidloraError

if TYPE_CHECKING:
    from vidlora.data.processor import Processor

#: Bump whenever decoding or pre-processing (media.py, transforms.py) changes the pixels it returns:
#: every existing entry then misses and is recomputed.
PREPROCESS_VERSION = 2  # 2: video frames resized and cropped before normalising
#: What a cache entry's metadata says it is (entries of another format are corrupt here).
ENTRY_FORMAT = "vidlora-frame-cache"
TENSOR_NAME = "pixels"
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
# A file changed this recently may change again within the file system's timestamp granularity
# without its stat changing (git's "racy" entries); its content hash is then not memoised.
_RACY_NS = 2_000_000_000
_HASH_CHUNK = 1 << 20
#: A temporary file this old belongs to a writer that was killed (a write takes well under a second).
STALE_TEMP_S = 3600.0


class FrameCacheError(VidloraError):
    """The cache directory cannot be read or written (permissions, a full disk); names the file."""


class CorruptEntry(Exception):
    """An entry that must not be used (why: the message); the cache removes and recomputes it."""


@dataclass
class CacheStats:
    """What one process's lookups found; every lookup is exactly one of hit, miss or corrupt."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # an entry was there but unusable: removed and recomputed
    bytes_written: int = 0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: CacheStats) -> CacheStats:
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.corrupt

    def format(self) -> str:
        return (
            f"hits {self.hits}, misses {self.misses}, corrupt (recomputed) {self.corrupt}, "
            f"written {self.bytes_written / 1e6:.1f} MB"
        )


@dataclass(frozen=True)
class ContentId:
    """A file's content: its size and the blake2b digest of all its bytes."""

    size: int
    blake2b: str


@dataclass(frozen=True)
class CacheEntry:
    """A lookup's result: the pixels, the entry file (None when the pixels could not be cached)."""

    pixels: torch.Tensor
    path: Path | None
    outcome: str  # "hit", "miss", "corrupt" or "uncached"


def content_id(path: str | Path) -> ContentId:
    """Size and blake2b of every byte of ``path`` (~20 ms for 16 MB)."""
    digest = hashlib.blake2b(digest_size=32)
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return ContentId(size, digest.hexdigest())


def library_versions() -> dict[str, str]:
    """The libraries whose upgrade may change decoded pixels (FFmpeg through PyAV, Pillow, torch)."""
    return {"av": av.__version__, "pillow": PIL.__version__, "torch": torch.__version__}


def entry_key(content: ContentId, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(key, fields)``: the hex key of an entry and the fields it is derived from."""
    key_fields = {
        "preprocess_version": PREPROCESS_VERSION,
        "content": {"size": content.size, "blake2b": content.blake2b},
        "settings": settings,
        "libraries": library_versions(),
    }
    text = json.dumps(key_fields, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest(), key_fields


def expected_shape(settings: dict[str, Any]) -> tuple[int, ...]:
    """The shape the processor's loader returns for these settings."""
    size = settings["image_size"]
    if settings["kind"] == "video":
        return (settings["num_frames"], 3, size, size)
    return (3, size, size)


def tensor_checksum(tensor: torch.Tensor) -> str:
    """blake2b of a tensor's bytes (C order)."""
    return hashlib.blake2b(tensor.contiguous().numpy().data, digest_size=16).hexdigest()


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise CorruptEntry("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as err:
        raise CorruptEntry(f"unreadable header ({err})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CorruptEntry("no metadata")
    return metadata


def _stat_signature(st: os.stat_result) -> tuple[int, ...]:
    # ctime cannot be set back by a user (os.utime sets it to now), unlike mtime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class FrameCache:
    """The frame cache under ``root`` (created if missing); see the module docstring.

    ``stats`` counts this process's lookups; a DataLoader worker counts its own.
    """

    root: Path
    stats: CacheStats = field(default_factory=CacheStats)
    # (path, stat signature) -> content; only for files not changed within the last _RACY_NS.
    _memo: dict[tuple[str, tuple[int, ...]], ContentId] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--frame_cache {self.root}: cannot create the directory ({err})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise UsageError(f"--frame_cache {self.root}: the directory is not writable")

    @classmethod
    def from_flag(cls, root: str | os.PathLike[str] | None) -> FrameCache | None:
        """The cache a ``--frame_cache`` flag names, or None without the flag."""
        return None if root is None else cls(Path(root))

    # -- lookups ---------------------------------------------------------------------------

    def load_video(
        self,
        processor: Processor,
        path: str | Path,
        *,
        timeout_s: float = DEFAULT_DECODE_TIMEOUT,
        read: VideoReader = read_video,
    ) -> torch.Tensor:
        """:meth:`Processor.load_video` through the cache."""
        return self.get(
            path, "video", processor, lambda: processor.load_video(path, timeout_s=timeout_s, read=read)
        ).pixels

    def load_image(self, processor: Processor, path: str | Path) -> torch.Tensor:
        """:meth:`Processor.load_image` through the cache."""
        return self.get(path, "image", processor, lambda: processor.load_image(path)).pixels

    def get(
        self,
        path: str | Path,
        kind: str,
        processor: Processor,
        compute: Callable[[], torch.Tensor],
    ) -> CacheEntry:
        """The cached pixels of ``path`` under ``processor``'s ``kind`` settings, else ``compute()``'s (stored).

        ``compute``'s exceptions pass through unchanged: a bad file fails exactly as without a cache.
        """
        path = Path(path)
        try:
            before = os.stat(path)
            content = self._content(path, before)
        except OSError:
            # The loader names the problem (missing, unreadable) in its own words.
            return CacheEntry(compute(), None, "uncached")
        settings = processor.media_settings(kind)
        key, key_fields = entry_key(content, settings)
        entry = self.entry_path(key)
        shape = expected_shape(settings)
        outcome = "miss"
        try:
            pixels = self._read(entry, key, shape)
        except CorruptEntry:
            outcome = "corrupt"
            self._remove(entry)
            pixels = None
        if pixels is not None:
            self.stats.hits += 1
            return CacheEntry(pixels, entry, "hit")
        pixels = compute()
        if outcome == "corrupt":
            self.stats.corrupt += 1
        else:
            self.stats.misses += 1
        try:
            unchanged = _stat_signature(os.stat(path)) == _stat_signature(before)
        except OSError:
            unchanged = False
        # A file that changed while it was decoded would file new pixels under the old content;
        # a loader returning another shape than its settings say would be refused on every read.
        if not unchanged or tuple(pixels.shape) != shape or pixels.dtype != torch.float32:
            return CacheEntry(pixels, None, outcome)
        self._write(entry, pixels, key, key_fields, path)
        return CacheEntry(pixels, entry, outcome)

    def entry_path(self, key: str) -> Path:
        """Where the entry with ``key`` lives (sharded by its first two hex digits)."""
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def disk_usage(self) -> tuple[int, int]:
        """``(entries, bytes)`` of every entry under ``root``."""
        sizes = [p.stat().st_size for p in self.root.glob(f"*/*{SUFFIX}")]
        return len(sizes), sum(sizes)

    def temp_files(self) -> list[Path]:
        """Temporary files of writes in progress (or of writers that were killed)."""
        return sorted(self.root.glob(f"*/.*{TEMP_SUFFIX}"))

    def remove_stale_temp_files(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Remove temporary files a killed writer left (older than any write takes); returns how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for temp in self.temp_files():
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished meanwhile
                continue
            except OSError as err:
                raise FrameCacheError(f"frame cache {temp}: cannot remove ({err})") from None
        return removed

    # -- internals -------------------------------------------------------------------------

    def _content(self, path: Path, st: os.stat_result) -> ContentId:
        memo_key = (str(path.resolve()), _stat_signature(st))
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        started = time.time_ns()
        content = content_id(path)
        if started - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            self._memo[memo_key] = content
        return content

    def _read(self, entry: Path, key: str, shape: Sequence[int]) -> torch.Tensor | None:
        """The entry's pixels; None when there is no entry; CorruptEntry when it is unusable."""
        try:
            data = entry.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise FrameCacheError(f"frame cache entry {entry}: cannot read ({err})") from None
        metadata = _header_metadata(data)
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise CorruptEntry(f"unreadable tensors ({err})") from None
        if metadata.get("format") != ENTRY_FORMAT or metadata.get("key") != key:
            raise CorruptEntry("another entry's key")
        if list(tensors) != [TENSOR_NAME]:
            raise CorruptEntry(f"tensors {sorted(tensors)}, expected [{TENSOR_NAME!r}]")
        pixels = tensors[TENSOR_NAME]
        if pixels.dtype != torch.float32 or tuple(pixels.shape) != tuple(shape):
            raise CorruptEntry(f"{pixels.dtype} {tuple(pixels.shape)}, expected float32 {tuple(shape)}")
        if tensor_checksum(pixels) != metadata.get("checksum"):
            raise CorruptEntry("checksum mismatch")
        return pixels

    def _write(
        self, entry: Path, pixels: torch.Tensor, key: str, key_fields: dict[str, Any], source: Path
    ) -> None:
        pixels = pixels.contiguous()
        metadata = {
            "format": ENTRY_FORMAT,
            "key": key,
            "fields": json.dumps(key_fields, sort_keys=True),
            "checksum": tensor_checksum(pixels),
            "source": str(source),  # for people looking into the cache; not part of the key
        }
        data = save_safetensors({TENSOR_NAME: pixels}, metadata=metadata)
        temp: str | None = None
        try:
            entry.parent.mkdir(exist_ok=True)
            # Unique per writer, in the entry's directory: the rename below is atomic there.
            handle, temp = tempfile.mkstemp(prefix=f".{key}.", suffix=TEMP_SUFFIX, dir=entry.parent)
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temp, entry)
            temp = None
        except OSError as err:
            raise FrameCacheError(f"frame cache entry {entry}: cannot write ({err})") from None
        finally:
            if temp is not None:
                Path(temp).unlink(missing_ok=True)
        self.stats.bytes_written += len(data)

    def _remove(self, entry: Path) -> None:
        try:
            entry.unlink(missing_ok=True)
        except OSError as err:
            raise FrameCacheError(
                f"frame cache entry {entry}: corrupt and cannot be removed ({err})"
            ) from None


def video_pixels(
    processor: Processor,
    path: str | Path,
    cache: FrameCache | None,
    *,
    timeout_s: float = DEFAULT_DECODE_TIMEOUT,
    read: VideoReader = read_video,
) -> torch.Tensor:
    """:meth:`Processor.load_video`, through ``cache`` when there is one (training, check, predict);
    ``read`` decodes on a miss."""
    if cache is None:
        return processor.load_video(path, timeout_s=timeout_s, read=read)
    return cache.load_video(processor, path, timeout_s=timeout_s, read=read)


def image_pixels(processor: Processor, path: str | Path, cache: FrameCache | None) -> torch.Tensor:
    """:meth:`Processor.load_image`, through ``cache`` when there is one."""
    return processor.load_image(path) if cache is None else cache.load_image(processor, path)
