"""Training from the hub repos' own file layouts, and what a checkpoint must carry to inference.

Every model here is a tiny copy of a real repo in the session hub cache (``hub_repos``),
addressed by its hub id: the original ``LanguageBind/Video-LLaVA-7B`` (sharded pickles, a
SentencePiece tokenizer without ``tokenizer.json``), the transformers port ``-hf``, and
``lmsys/vicuna-7b-v1.5`` with one LanguageBind tower (a video-only or an image-only model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hub_repos import HF_REPO, IMAGE_TOWER_REPO, ORIGINAL_REPO, VICUNA_REPO, VIDEO_TOWER_REPO


@pytest.fixture(scope="module")
def modality_data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic sets with one modality each (plus text), 16 frames per video."""
    from vidlora.data.synthetic import generate_dataset

    out = {}
    for name, mix in (("video", {"video": 0.8, "text": 0.2}), ("image", {"image": 0.8, "text": 0.2})):
        out[name] = tmp_path_factory.mktemp(f"{name}_only")
        generate_dataset(out[name], 8, 4, seed=2, mix=mix, multi_turn=0.0)
    return out


def short_run(
    original_argv, out: Path, model: str, hub_cache, data_dir: Path | None = None, *extra: str
) -> list[str]:
    """The original's flags on ``model`` from the hub cache: 2 optimizer steps, no evaluation, no grouping."""
    argv = original_argv(
        out,
        model_name_or_path=model,
        cache_dir=str(hub_cache.root),
        max_steps="2",
        save_steps="2",
        evaluation_strategy="no",
        group_by_modality_length="False",
        gradient_checkpointing="False",
    )
    if data_dir is not None:
        for flag, value in (
            ("--data_path", data_dir / "train.json"),
            ("--video_folder", data_dir),
            ("--image_folder", data_dir),
        ):
            argv[argv.index(flag) + 1] = str(value)
    return [*argv, *extra]


def test_original_repo_with_sentencepiece_tokenizer_loads(hub_cache):
    from vidlora.model.loading import load_pretrained

    assert not (hub_cache[ORIGINAL_REPO] / "tokenizer.json").exists()
    loaded = load_pretrained(ORIGINAL_REPO, cache_dir=str(hub_cache.root))
    assert loaded.report.ok
    assert loaded.tokenizer.legacy is True  # no `legacy` key: transformers 4.31's default
    assert any("legacy" in note for note in loaded.report.notes)


@pytest.mark.parametrize(
    ("model", "towers", "expected"),
    [
        (ORIGINAL_REPO, {}, "split_at_media"),
        (VICUNA_REPO, {"video_tower": VIDEO_TOWER_REPO, "image_tower": IMAGE_TOWER_REPO}, "split_at_media"),
        (HF_REPO, {}, "whole_prompt"),
        ("tiny", {}, "whole_prompt"),
    ],
)
def test_the_layout_decides_how_prompts_are_tokenized(hub_cache, model, towers, expected):
    """The original's way (cut at media) for the original and its pretrain -> fine-tune path; the
    processor's (whole prompt) for the transformers port; vidlora's own preset keeps its convention."""
    from vidlora.model.loading import load_pretrained

    loaded = load_pretrained(model, cache_dir=str(hub_cache.root), device="meta", **towers)
    assert loaded.model.config.prompt_tokenization == expected


def test_sentencepiece_and_protobuf_are_dependencies():
    from importlib.metadata import requires

    names = {
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requires("vidlora")
    }
    assert {"sentencepiece", "protobuf"} <= names


def _trained_and_loaded(trainer, out: Path):
    from vidlora.infer.load import load_for_inference

    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    return trained, load_for_inference(str(out))


def _video_batch(loaded, data_dir: Path):
    """One training item of the first video sample, read the way inference reads it."""
    from vidlora.data.records import Turn
    from vidlora.infer.generate import Generator, Request

    record = next(
        r for r in json.loads((data_dir / "train.json").read_text()) if "video" in r and "image" not in r
    )
    generator = Generator(loaded)
    request = Request(
        record["id"], [Turn("human", record["conversations"][0]["value"])], data_dir / record["video"]
    )
    item = generator.prepare(request)
    batch = generator.collate([item])
    batch.pop("ids")
    return generator, request, batch


def test_select_layer_and_frames_survive_to_inference(
    original_argv, train_in_process, hub_cache, tmp_path, synth_dir
):
    """-1 and 16 frames (the -hf video tower has no temporal embedding to fix the count) reach chat/predict."""
    out = tmp_path / "run"
    trainer = train_in_process(
        short_run(
            original_argv,
            out,
            HF_REPO,
            hub_cache,
            None,
            "--mm_vision_select_layer",
            "-1",
            "--num_frames",
            "16",
        )
    )
    trained, loaded = _trained_and_loaded(trainer, out)
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    assert base.config.mm_vision_select_layer == -1
    assert loaded.processor.num_frames == 16
    generator, request, batch = _video_batch(loaded, synth_dir)
    assert batch["pixel_values_videos"].shape[1] == 16
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(**batch).logits, trained(**batch).logits, atol=1e-5, rtol=1e-5
        )
    assert isinstance(generator.generate([request], max_new_tokens=3)[0], str)


@pytest.mark.parametrize("modality", ["video", "image"])
def test_single_tower_model_trains_checks_and_predicts(
    modality, original_argv, train_in_process, hub_cache, modality_data, tmp_path
):
    from vidlora.cli import main as vidlora

    data = modality_data[modality]
    tower_flag, tower = (
        ("--video_tower", VIDEO_TOWER_REPO) if modality == "video" else ("--image_tower", IMAGE_TOWER_REPO)
    )
    modality_flag = "Video" if modality == "video" else "Image"
    out = tmp_path / "run"
    argv = short_run(original_argv, out, VICUNA_REPO, hub_cache, data, tower_flag, tower)
    argv[argv.index("--X") + 1 : argv.index("--X") + 3] = [modality_flag]
    train_in_process(argv)
    assert (out / "adapter_model.safetensors").is_file()
    common = [
        "--data_path",
        str(data / "eval.json"),
        "--video_folder",
        str(data),
        "--image_folder",
        str(data),
    ]
    check = [
        "--model_name_or_path",
        VICUNA_REPO,
        tower_flag,
        tower,
        "--cache_dir",
        str(hub_cache.root),
        "--X",
        modality_flag,
        "--no_progress",
        *common,
    ]
    assert vidlora(["check", *check]) == 0
    preds = tmp_path / "preds.jsonl"
    assert (
        vidlora(["predict", "--model_path", str(out), *common, "--out", str(preds), "--max_new_tokens", "2"])
        == 0
    )
    assert len(preds.read_text().splitlines()) == len(json.loads((data / "eval.json").read_text()))
