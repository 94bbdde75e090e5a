"""Tiny checkpoints in the exact file layouts of the hub repos users download, for tests.

* ``write_sp_tokenizer``: a LLaMA SentencePiece tokenizer as Vicuna / Video-LLaVA ship it
  (``tokenizer.model`` + ``tokenizer_config.json`` + ``special_tokens_map.json``, no
  ``tokenizer.json``), trained offline with LLaMA's settings (BPE, byte fallback, dummy prefix,
  digits split, whitespace kept), ``legacy`` true, false or absent.
* ``write_original_repo``: ``LanguageBind/Video-LLaVA-7B`` (``LlavaLlamaForCausalLM`` config with
  the llava fields, sharded ``pytorch_model-0000K-of-0000N.bin`` + index, towers embedded,
  ``generation_config.json``, the SentencePiece tokenizer).
* ``write_hf_repo``: ``LanguageBind/Video-LLaVA-7B-hf`` (sharded safetensors + index in the
  converter's key names, ``tokenizer.json``, ``processor_config.json``, ``preprocessor_config.json``).
* ``write_languagebind_repo``: ``LanguageBind/LanguageBind_Video_merge`` / ``_Image`` (a CLIP
  model: ``vision_model.*`` plus the text side, ``pytorch_model.bin``).
* ``write_vicuna_repo``: ``lmsys/vicuna-7b-v1.5`` (``LlamaForCausalLM``, sharded ``.bin``).
* ``hub_snapshot``: where a repo lives in a Hugging Face hub cache, so that hub ids resolve
  offline (``HF_HUB_OFFLINE=1`` + ``cache_dir``) exactly as they do for users.

Key names are written from explicit prefix tables here, not through vidlora's key maps, so a
wrong map in vidlora cannot write the checkpoint it then reads back.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from vidlora.model.tokenizer import TINY_CORPUS

SP_VOCAB_SIZE = 600
SP_CORPUS_EXTRA = (
    "What is the man doing? What is happening in this video? Describe the image in detail.",
    "USER: ASSISTANT: USER ASSISTANT",
)


@functools.cache
def sp_model_bytes(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A SentencePiece BPE model with LLaMA's trainer settings (deterministic: one thread)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((list(TINY_CORPUS) + list(SP_CORPUS_EXTRA)) * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _added_token(content: str, *, type_field: bool) -> dict[str, Any]:
    token = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if type_field else token


def write_sp_tokenizer(
    directory: Path,
    *,
    legacy: bool | None,
    added_tokens: dict[str, int] | None = None,
    pad_token: str | None = "<unk>",
) -> Path:
    """The tokenizer files of a LLaMA checkpoint saved by transformers 4.31 (slow tokenizer).

    ``legacy=None`` leaves the key out (as Vicuna v1.3 / LLaMA-1 era files do).
    ``added_tokens`` writes ``added_tokens.json`` (token -> id, ids after the SentencePiece pieces).
    ``pad_token`` is what the original's training saved (``pad_token = unk_token``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(sp_model_bytes())
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>", type_field=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>", type_field=True),
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>", type_field=True),
    }
    if legacy is not None:
        config["legacy"] = legacy
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {
        name: _added_token(tok, type_field=False)
        for name, tok in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    if pad_token is not None:
        special["pad_token"] = pad_token
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    if added_tokens:
        (directory / "added_tokens.json").write_text(json.dumps(added_tokens))
    return directory


def hub_snapshot(cache_dir: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """The snapshot folder of ``repo_id`` in a hub cache (created), with ``refs/main`` pointing at it."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# -- weights --------------------------------------------------------------------------------------


def renamed(state: dict[str, torch.Tensor], table: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Rename by the first matching (our prefix, their prefix); keys no rule covers are dropped."""
    out = {}
    for key, tensor in state.items():
        for ours, theirs in table:
            if key.startswith(ours):
                out[theirs + key[len(ours) :]] = tensor.detach().clone().contiguous()
                break
    return out


ORIGINAL_NAMES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("mm_projector.", "model.mm_projector."),
    ("image_tower.", "model.image_tower.image_tower."),
    ("video_tower.", "model.video_tower.video_tower."),
)
HF_DISK_NAMES = (
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("mm_projector.0.", "multi_modal_projector.linear_1."),
    ("mm_projector.2.", "multi_modal_projector.linear_2."),
    ("image_tower.", "image_tower.vision_model."),
    ("video_tower.", "video_tower.vision_model."),
)
VICUNA_NAMES = (("language_model.", ""),)


def save_bin_shards(state: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    """``pytorch_model-0000K-of-0000N.bin`` + ``pytorch_model.bin.index.json``, as transformers 4.31 wrote them."""
    keys = sorted(state)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: state[key] for key in keys[k::shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def save_safetensors_shards(state: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> None:
    """``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    keys = sorted(state)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[k::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def _generation_config(directory: Path, *, pad_token_id: int | None = 0) -> None:
    config = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048, "transformers_version": "4.31.0"}
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    (directory / "generation_config.json").write_text(json.dumps(config, indent=2))


def _vision_fields(config) -> dict[str, Any]:
    names = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "projection_dim",
    )
    return {k: getattr(config, k) for k in names}


def _llama_fields(text_config) -> dict[str, Any]:
    names = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "initializer_range",
        "vocab_size",
        "hidden_act",
        "rope_theta",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    fields = {k: getattr(text_config, k) for k in names if hasattr(text_config, k)}
    rope = getattr(text_config, "rope_parameters", None) or {}
    if "rope_theta" not in fields and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    return fields


def write_languagebind_repo(directory: Path, model, tower: str, *, seed: int = 0) -> Path:
    """A LanguageBind checkpoint: config.json (CLIP model, vision_config) + pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.video_config if tower == "video_tower" else model.config.image_config
    state = renamed(model.state_dict(), ((f"{tower}.", "vision_model."),))
    gen = torch.Generator().manual_seed(seed)
    width = config.hidden_size
    n_positions = (config.image_size // config.patch_size) ** 2 + 1
    state |= {
        "text_model.embeddings.token_embedding.weight": torch.randn(50, width, generator=gen),
        "text_model.embeddings.position_ids": torch.arange(7).unsqueeze(0),
        "vision_model.embeddings.position_ids": torch.arange(n_positions).unsqueeze(0),
        "visual_projection.weight": torch.randn(32, width, generator=gen),
        "text_projection.weight": torch.randn(32, width, generator=gen),
        "logit_scale": torch.tensor(2.6592),
    }
    torch.save(state, directory / "pytorch_model.bin")
    vision = _vision_fields(config)
    kind = "LanguageBindImage"
    if tower == "video_tower":
        vision |= {"num_frames": config.num_frames, "add_time_attn": config.add_time_attn}
        kind = "LanguageBindVideo"
    body = {
        "model_type": kind,
        "architectures": ["CLIPModel"],
        "projection_dim": 32,
        "logit_scale_init_value": 2.6592,
        "vision_config": vision,
        "text_config": {"hidden_size": width, "add_time_attn": False},
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
    }
    (directory / "config.json").write_text(json.dumps(body, indent=2))
    return directory


def write_original_repo(
    directory: Path, model, *, legacy: bool | None, image_tower: str, video_tower: str
) -> Path:
    """``LanguageBind/Video-LLaVA-7B``: the original's LLaVA config, sharded pickles, SP tokenizer.

    ``image_tower``/``video_tower`` are what the config names (hub ids or local paths).
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = renamed(model.state_dict(), ORIGINAL_NAMES)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    for i in range(text.num_hidden_layers):  # transformers 4.31 saved LLaMA's rotary buffers
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    n_positions = (model.config.image_config.image_size // model.config.image_config.patch_size) ** 2 + 1
    for part in ("image_tower", "video_tower"):  # LanguageBind's persistent position_ids buffer
        state[f"model.{part}.{part}.embeddings.position_ids"] = torch.arange(n_positions).unsqueeze(0)
    save_bin_shards(state, directory)
    config = _llama_fields(text) | {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": model.config.mm_hidden_size,
        "mm_image_tower": image_tower,
        "mm_video_tower": video_tower,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    _generation_config(directory)
    write_sp_tokenizer(directory, legacy=legacy)
    return directory


def write_vicuna_repo(directory: Path, model, *, legacy: bool | None = False) -> Path:
    """``lmsys/vicuna-7b-v1.5``: a plain ``LlamaForCausalLM`` with sharded pickles and the SP tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    save_bin_shards(renamed(model.state_dict(), VICUNA_NAMES), directory)
    config = _llama_fields(model.config.text_config) | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "use_cache": True,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    _generation_config(directory)
    write_sp_tokenizer(directory, legacy=legacy, pad_token=None)
    return directory


def write_hf_repo(directory: Path, model, tokenizer) -> Path:
    """``LanguageBind/Video-LLaVA-7B-hf``: transformers' VideoLlava config, converter key names, fast tokenizer.

    ``model`` must have no temporal attention (the converter drops it) and a vocabulary that already
    holds ``<image>``, ``<video>``, ``<pad>`` (``tokenizer`` has them, ids after the SentencePiece pieces).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if ".temporal_" not in k}
    save_safetensors_shards(renamed(state, HF_DISK_NAMES), directory)
    vision = model.config.image_config
    n = (vision.image_size // vision.patch_size) ** 2
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<video>", "<pad>"])
    config = VideoLlavaConfig(
        text_config=LlamaConfig(**_llama_fields(model.config.text_config)),
        vision_config=CLIPVisionConfig(**_vision_fields(vision)),
        image_token_index=ids[0],
        video_token_index=ids[1],
        pad_token_id=ids[2],
        image_seq_length=n,
        video_seq_length=model.config.num_frames * (n + 1),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor = {
        "crop_size": {"height": vision.image_size, "width": vision.image_size},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "VideoLlavaImageProcessor",
        "resample": 3,
        "size": {"shortest_edge": vision.image_size},
        "processor_class": "VideoLlavaProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    processor = {
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": "default",
        "processor_class": "VideoLlavaProcessor",
        "num_additional_image_tokens": 1,
    }
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))
    _generation_config(directory, pad_token_id=ids[2])
    return directory


# -- a hub cache with every repo ------------------------------------------------------------------

ORIGINAL_REPO = "LanguageBind/Video-LLaVA-7B"
HF_REPO = "LanguageBind/Video-LLaVA-7B-hf"
VIDEO_TOWER_REPO = "LanguageBind/LanguageBind_Video_merge"
IMAGE_TOWER_REPO = "LanguageBind/LanguageBind_Image"
VICUNA_REPO = "lmsys/vicuna-7b-v1.5"


@dataclass(frozen=True)
class HubCache:
    """A hub cache directory and the snapshot folder of each repo in it."""

    root: Path
    snapshots: dict[str, Path]

    def __getitem__(self, repo_id: str) -> Path:
        return self.snapshots[repo_id]


def tiny_sp_model(*, temporal: bool = True, vocab_size: int | None = None, seed: int = 0):
    """The tiny preset's sizes with the SentencePiece vocabulary (no media tokens yet), random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from vidlora.model.configuration import LanguageBindVideoConfig, VideoLlavaConfig
    from vidlora.model.modeling import VideoLlavaForCausalLM
    from vidlora.model.presets import PRESETS

    preset = PRESETS["tiny"]
    text = dict(preset.text) | {
        "vocab_size": vocab_size or SP_VOCAB_SIZE,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    video = dict(preset.video) | {"add_time_attn": temporal}
    config = VideoLlavaConfig(
        text_config=LlamaConfig(**text),
        image_config=CLIPVisionConfig(**preset.image),
        video_config=LanguageBindVideoConfig(**video),
        **preset.model,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoLlavaForCausalLM(config).eval()


def build_hub_cache(root: Path) -> HubCache:
    """Every repo above, tiny, in ``root`` (a hub cache directory)."""
    from transformers import AutoTokenizer

    snapshots = {
        repo: hub_snapshot(root, repo)
        for repo in (ORIGINAL_REPO, HF_REPO, VIDEO_TOWER_REPO, IMAGE_TOWER_REPO, VICUNA_REPO)
    }
    model = tiny_sp_model()
    write_languagebind_repo(snapshots[VIDEO_TOWER_REPO], model, "video_tower")
    write_languagebind_repo(snapshots[IMAGE_TOWER_REPO], model, "image_tower")
    write_original_repo(
        snapshots[ORIGINAL_REPO],
        model,
        legacy=None,
        image_tower=IMAGE_TOWER_REPO,
        video_tower=VIDEO_TOWER_REPO,
    )
    write_vicuna_repo(snapshots[VICUNA_REPO], model, legacy=False)
    # The port: 3 tokens added after the pieces, rows padded to a multiple of 64, no temporal layers.
    hf_model = tiny_sp_model(temporal=False, vocab_size=-(-(SP_VOCAB_SIZE + 3) // 64) * 64, seed=1)
    source = write_sp_tokenizer(root / "hf_tokenizer_source", legacy=False, pad_token=None)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    write_hf_repo(snapshots[HF_REPO], hf_model, tokenizer)
    return HubCache(root, snapshots)
