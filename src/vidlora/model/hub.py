"""Checkpoint files: a local directory for a name (hub snapshots included), its weight files, their tensors.

Weights are read from safetensors (sharded index too; every header checked first,
:mod:`~vidlora.model.safetensors_check`) or, for legacy files, with
``torch.load(weights_only=True)`` only: vidlora never unpickles arbitrary objects. Zip-format
``.bin`` files (every ``torch.save`` since torch 1.6, the original's shards included) are memory-mapped,
so reading a shard does not first copy all of it into host memory.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from vidlora.errors import NotFoundError, UsageError
from vidlora.jsonl import read_json_object
from vidlora.model.report import CheckpointLoadError
from vidlora.model.safetensors_check import check_safetensors

CONFIG_NAME = "config.json"
# Non-weight files fetched from the hub before deciding which weight files are needed.
_HUB_META_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]


def resolve_directory(
    name_or_path: str | Path, *, cache_dir: str | None = None, weights: bool = True
) -> Path:
    """A local directory for `name_or_path`: itself if it exists, else a hub snapshot.

    For a hub id, config/tokenizer files come first; weight files (safetensors, else legacy ``.bin``)
    only when `weights` is true. Raises with the reason when the hub cannot be reached.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise NotFoundError(f"{name} is a file; expected a checkpoint directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise NotFoundError(f"{name}: no such directory, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id=name, cache_dir=cache_dir, allow_patterns=patterns))
        except OSError as err:  # hub errors (offline, not found, HTTP) are OSErrors
            raise NotFoundError(
                f"{name}: not a local directory, and the Hugging Face Hub could not provide it "
                f"({type(err).__name__}: {err}). Download it elsewhere and pass the directory."
            ) from err

    root = download(_HUB_META_PATTERNS)
    if weights:
        root = download(["*.safetensors"])
        if not any(root.glob("*.safetensors")):
            root = download(["*.bin"])
    return root


def _weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a sharded checkpoint's index file."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UsageError(f'{index}: no "weight_map" object (not a sharded checkpoint index)')
    return weight_map


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors (sharded or not), else legacy .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = _weight_map(index)
            files = [directory / name for name in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise NotFoundError(f"{index}: shard(s) listed but not present: {', '.join(absent)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    raise NotFoundError(f"{directory}: no weights (model.safetensors, a sharded index, or pytorch_model.bin)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file. Legacy pickles are read with ``weights_only=True`` and nothing else."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path)
        return load_file(str(path))
    try:
        # Only the zip format can be mapped; a pre-1.6 pickle is read whole (weights-only still).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises UnpicklingError/RuntimeError variants; name the file
        raise CheckpointLoadError(
            f"{path}: cannot read as a weights-only torch file ({type(err).__name__}: {err}); "
            "vidlora never unpickles arbitrary objects: convert it to safetensors"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointLoadError(f"{path}: expected a flat dict of tensors (a state dict)")
    return state


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise NotFoundError(f"{directory}: no {CONFIG_NAME}")
    return read_json_object(path)


def keys_of(files: list[Path]) -> list[str]:
    """Tensor names of weight files without reading the tensors (index or safetensors headers).

    Only a single, unindexed legacy ``.bin`` has to be read in full (and small ones are the norm there).
    """
    keys: list[str] = []
    for path in files:
        index = path.parent / "pytorch_model.bin.index.json"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            check_safetensors(path)
            with safe_open(str(path), framework="pt") as handle:
                keys += list(handle.keys())
        elif index.is_file():
            keys += [key for key, name in _weight_map(index).items() if name == path.name]
        else:
            keys += list(read_tensors(path))
    return keys
