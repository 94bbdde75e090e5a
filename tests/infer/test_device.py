"""--device / --dtype: the one rule, checked with the machine's facts given as arguments."""

from __future__ import annotations

import pytest
import torch

from vidlora.errors import UsageError
from vidlora.infer.chat import build_parser as chat_parser
from vidlora.infer.device import resolve_device_and_dtype
from vidlora.infer.merge import build_parser as merge_parser
from vidlora.infer.predict import PredictOptions

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def resolve(
    device=None, dtype=None, *, cuda=True, bf16=True, checkpoint=None, purpose="inference", rank=None
):
    placement = resolve_device_and_dtype(
        device, dtype, cuda_available=cuda, bf16_supported=bf16,
        checkpoint_dtype=checkpoint, purpose=purpose, local_rank=rank,
    )  # fmt: skip
    return str(placement.device), placement.dtype


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # inference: bf16 on a GPU (fp16 without bf16), float32 on the CPU, whatever the checkpoint
        ({"cuda": True}, ("cuda", BF16)),
        ({"cuda": True, "bf16": False}, ("cuda", FP16)),
        ({"cuda": True, "checkpoint": FP32}, ("cuda", BF16)),
        ({"cuda": False, "checkpoint": BF16}, ("cpu", FP32)),
        ({"cuda": True, "device": "cpu"}, ("cpu", FP32)),
        # under torchrun every rank takes its own GPU, bare "cuda" included; an explicit index stays
        ({"cuda": True, "rank": 3}, ("cuda:3", BF16)),
        ({"cuda": True, "rank": 3, "device": "cuda"}, ("cuda:3", BF16)),
        ({"cuda": True, "rank": 3, "device": "cuda:1"}, ("cuda:1", BF16)),
        ({"cuda": False, "rank": 3}, ("cpu", FP32)),
        # merge: the checkpoint's dtype on either device, float32 when it declares none
        ({"purpose": "merge", "cuda": False, "checkpoint": BF16}, ("cpu", BF16)),
        ({"purpose": "merge", "cuda": True, "checkpoint": FP16}, ("cuda", FP16)),
        ({"purpose": "merge", "cuda": True, "checkpoint": FP32}, ("cuda", FP32)),
        ({"purpose": "merge", "cuda": False, "checkpoint": None}, ("cpu", FP32)),
        # an explicit dtype wins
        ({"purpose": "merge", "cuda": False, "checkpoint": BF16, "dtype": "float32"}, ("cpu", FP32)),
        ({"cuda": False, "dtype": "bfloat16"}, ("cpu", BF16)),
        ({"cuda": True, "dtype": "float32", "device": "auto"}, ("cuda", FP32)),
    ],
)
def test_choice(kwargs, expected):
    assert resolve(**kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cuda": False, "device": "cuda"}, "no CUDA GPU"),
        ({"cuda": False, "device": "cuda:0"}, "no CUDA GPU"),
        ({"device": "meta"}, "--device meta"),
        ({"device": "gpu0"}, "--device gpu0"),
        ({"dtype": "fp8"}, "--dtype fp8"),
        ({"cuda": True, "bf16": False, "dtype": "bfloat16"}, "no bfloat16"),
        ({"purpose": "merge", "cuda": True, "bf16": False, "checkpoint": BF16}, "no bfloat16"),
    ],
)
def test_impossible_requests_are_user_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        resolve(**kwargs)


def test_every_command_has_the_flags_defaulting_to_auto():
    options = PredictOptions.from_argv(["--model_path", "m", "--data_path", "d.json", "--out", "o"])
    assert (options.device, options.dtype) == ("auto", "auto")
    chat = chat_parser().parse_args(["--model_path", "m", "--device", "cpu", "--dtype", "bfloat16"])
    assert (chat.device, chat.dtype) == ("cpu", "bfloat16")
    merge = merge_parser().parse_args(["--model_path", "m", "--out", "o"])
    assert (merge.device, merge.dtype) == ("auto", "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_one_line_and_exit_2(tmp_path, capsys):
    from vidlora.cli import main as vidlora

    code = vidlora(["merge", "--model_path", "tiny", "--out", str(tmp_path / "m"), "--device", "cuda"])
    assert code == 2
    assert "vidlora merge: error: --device cuda: no CUDA GPU is visible here" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
