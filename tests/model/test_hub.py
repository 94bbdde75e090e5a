"""Legacy ``.bin`` weights: zip-format files are memory-mapped, pre-1.6 pickles still read, weights-only both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vidlora.model.hub import read_tensors
from vidlora.model.report import CheckpointLoadError

MAPS = Path("/proc/self/maps")


def _mapped_file(address: int) -> str | None:
    """The file a virtual address of this process is mapped from (Linux), None for anonymous memory."""
    for line in MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5].strip() if len(fields) == 6 else None
    return None


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 32, generator=generator).to(torch.bfloat16),
        "b": torch.randn(64, generator=generator),
        "ids": torch.arange(5),
    }


@pytest.mark.skipif(not MAPS.is_file(), reason="needs /proc/self/maps (Linux)")
def test_zip_format_bin_is_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "pytorch_model-00001-of-00002.bin"
    torch.save(_state(), path)
    read = read_tensors(path)
    for key, tensor in _state().items():
        assert read[key].dtype == tensor.dtype
        assert torch.equal(read[key], tensor)
    # The tensors' memory is the file itself (a private mapping), not a heap copy of it.
    assert _mapped_file(read["w"].data_ptr()) == str(path.resolve())


def test_pre_zip_pickle_is_read_whole(tmp_path):
    path = tmp_path / "non_lora_trainables.bin"
    torch.save(_state(), path, _use_new_zipfile_serialization=False)
    read = read_tensors(path)
    assert all(torch.equal(read[key], tensor) for key, tensor in _state().items())
    if MAPS.is_file():
        assert _mapped_file(read["w"].data_ptr()) != str(path.resolve())


@pytest.mark.parametrize("zip_format", [True, False])
def test_objects_are_refused_in_either_format(tmp_path, zip_format):
    path = tmp_path / "mm_projector.bin"
    torch.save({"w": torch.zeros(1), "note": object()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointLoadError, match=f"{path.name}.*weights-only"):
        read_tensors(path)
