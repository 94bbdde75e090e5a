"""train -> chat -> predict -> merge from each hub repo's own file layout, addressed by its hub id.

The repos are tiny copies in the session hub cache (``hub_repos``): the original
``LanguageBind/Video-LLaVA-7B`` (sharded pickles, a SentencePiece tokenizer without
``tokenizer.json``), the transformers port ``-hf`` (sharded safetensors, ``tokenizer.json``) and
``lmsys/vicuna-7b-v1.5`` + the two LanguageBind towers. A merged model must compute what the
adapter computes; the command line must print no warning a user would have to decode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_repos import HF_REPO, IMAGE_TOWER_REPO, ORIGINAL_REPO, VICUNA_REPO, VIDEO_TOWER_REPO

LAYOUTS = {
    "original": (ORIGINAL_REPO,),
    "hf": (HF_REPO,),
    "llm+towers": (VICUNA_REPO, "--video_tower", VIDEO_TOWER_REPO, "--image_tower", IMAGE_TOWER_REPO),
}
# Where DeepSpeed is installed but no GPU exists, importing it says so; true, and for GPU users absent.
KNOWN_NOTICES = (
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
)


def _flags(data: Path, out: Path, cache: Path, model: tuple[str, ...]) -> list[str]:
    return [
        "--model_name_or_path", model[0], *model[1:], "--cache_dir", str(cache),
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--data_path", str(data / "train.json"), "--video_folder", str(data), "--image_folder", str(data),
        "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2",
        "--tf32", "False", "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True",
        "--gradient_checkpointing", "True", "--group_by_modality_length", "True",
        "--dataloader_num_workers", "0",  # two steps: worker start-up would cost more than it saves
    ]  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_chat_predict_merge(layout, hub_cache, synth_dir, tmp_path):
    from vidlora.args import parse_train_args
    from vidlora.cli import main as vidlora
    from vidlora.data.records import Turn
    from vidlora.infer.chat import chat_loop
    from vidlora.infer.generate import Generator, Request
    from vidlora.infer.load import load_for_inference
    from vidlora.training.recipe import run

    out = tmp_path / "run"
    run(*parse_train_args(_flags(synth_dir, out, hub_cache.root, LAYOUTS[layout])))
    for where in (out, out / "checkpoint-2"):
        assert (where / "vidlora_config.json").is_file() and (where / "adapter_model.safetensors").is_file()

    loaded = load_for_inference(str(out))
    generator = Generator(loaded)
    record = next(
        r for r in json.loads((synth_dir / "eval.json").read_text()) if "video" in r and "image" not in r
    )
    video = synth_dir / record["video"]
    lines = iter(["What is moving?", "And its colour?", ""])
    turns = chat_loop(
        generator, video, [], lambda: next(lines), lambda _: None, max_new_tokens=3, temperature=0.0
    )
    assert [t.role for t in turns] == ["human", "gpt", "human", "gpt"]
    # chat's first answer is generate()'s for the same conversation
    alone = generator.generate([Request("chat", [Turn("human", turns[0].value)], video)], max_new_tokens=3)
    assert turns[1].value == alone[0]

    preds = tmp_path / "preds.jsonl"
    common = ["--data_path", str(synth_dir / "eval.json"), "--video_folder", str(synth_dir),
              "--image_folder", str(synth_dir), "--max_new_tokens", "2"]  # fmt: skip
    assert vidlora(["predict", "--model_path", str(out), *common, "--out", str(preds)]) == 0
    records = json.loads((synth_dir / "eval.json").read_text())
    assert len(preds.read_text().splitlines()) == sum(
        sum(t["from"] == "gpt" for t in r["conversations"]) for r in records
    )

    merged_dir = tmp_path / "merged"
    assert vidlora(["merge", "--model_path", str(out), "--out", str(merged_dir)]) == 0
    merged = load_for_inference(str(merged_dir))
    assert merged.processor == loaded.processor
    item = generator.prepare(Request("x", [Turn("human", record["conversations"][0]["value"])], video))
    batch = generator.collate([item])
    batch.pop("ids")
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(**batch).logits, loaded.model(**batch).logits, atol=1e-4, rtol=1e-4
        )
    # The port has no temporal attention: its merge is written for transformers' own class.
    expected_type = "video_llava" if layout == "hf" else "vidlora_video_llava"
    assert json.loads((merged_dir / "config.json").read_text())["model_type"] == expected_type


def _user_warnings(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]
    return [line for line in lines if not any(notice in line for notice in KNOWN_NOTICES)]


def test_the_command_line_prints_no_warning_a_user_would_have_to_decode(hub_cache, synth_dir, tmp_path):
    """`vidlora train` -> `chat` -> `merge` on the original's layout with its SentencePiece-only tokenizer."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def vidlora(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "vidlora", *argv], input=stdin, capture_output=True,
                                text=True, env=env, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert _user_warnings(result.stdout + result.stderr) == [], result.stderr
        return result

    out = tmp_path / "run"
    train = vidlora("train", *_flags(synth_dir, out, hub_cache.root, LAYOUTS["original"]))
    assert (
        "loaded with legacy=True, the default of transformers 4.31" in train.stderr
    )  # said once, in the report
    video = next(p for p in (synth_dir / "videos").iterdir())
    chat = vidlora(
        "chat", "--model_path", str(out), "--file", str(video), "--max_new_tokens", "3", stdin="Hi\n\n"
    )
    assert "USER:" in chat.stdout
    vidlora("merge", "--model_path", str(out), "--out", str(tmp_path / "merged"))
