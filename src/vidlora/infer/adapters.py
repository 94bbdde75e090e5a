"""One loaded base model serving several LoRA adapters, each with its own projector.

`vidlora serve` and `vidlora webui` answer for any of the adapters of one base without loading the
base twice: PEFT keeps every adapter's LoRA matrices side by side (`load_adapter`, `set_adapter`),
and the non-LoRA trainables each checkpoint saved (its projector) are copied in when that adapter is
switched on. Every entry keeps its own processor (template, frames), checked against the one base.
Switching is under a lock: :meth:`ModelSet.use` hands out the model to one caller at a time.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vidlora.checkpoint import (
    ADAPTER_WEIGHTS,
    NON_LORA_FILE,
    RECORD_FILE,
    is_adapter_dir,
    read_record,
    read_trainables,
)
from vidlora.errors import UsageError
from vidlora.infer.device import AUTO, DEVICE_HELP, DTYPE_HELP
from vidlora.infer.generate import Generator
from vidlora.infer.load import InferenceModel, holds_projector, load_base, load_for_inference
from vidlora.model.lora import quiet_peft, strip_peft_prefix
from vidlora.model.safetensors_check import check_safetensors
from vidlora.quiet import quiet_imports

#: The name the bare base model is served under when ``--model_path`` is an adapter.
BASE_NAME = "base"


@dataclass
class _Entry:
    """A served model: which PEFT adapter is on (None: none), its trainables and its generator."""

    adapter: str | None
    trainables: dict[str, torch.Tensor]
    generator: Generator
    path: str


def add_model_set_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The flags that say which models to load: one set for `vidlora serve` and `vidlora webui`."""
    parser.add_argument(
        "--model_path",
        required=required,
        default=None,
        help="a checkpoint (adapter), a base/merged model, a preset",
    )
    parser.add_argument(
        "--model_base", default=None, help="the base of a LoRA --model_path, instead of the recorded one"
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="more LoRA checkpoints on the same base",
    )
    parser.add_argument(
        "--served_model_name", default=None, help="the name of --model_path (default: its folder's name)"
    )
    parser.add_argument("--device", default=AUTO, help=DEVICE_HELP)
    parser.add_argument("--dtype", default=AUTO, help=DTYPE_HELP)
    parser.add_argument(
        "--cache_dir", default=None, help="hub cache for the base model (default: the recorded one)"
    )


def load_model_set(args: argparse.Namespace, **generator_options: Any) -> ModelSet:
    """:meth:`ModelSet.load` from the flags of :func:`add_model_set_arguments`."""
    return ModelSet.load(
        args.model_path,
        args.model_base,
        adapters=parse_adapters(args.adapters),
        served_name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        **generator_options,
    )


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` flags as an ordered mapping; a malformed or repeated name is an error."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UsageError(f"--adapters {spec!r}: write NAME=PATH")
        if name in adapters:
            raise UsageError(f"--adapters: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


class ModelSet:
    """Named models sharing one base (see the module docstring); ``names[0]`` is the default."""

    def __init__(self, model: Any, entries: dict[str, _Entry]) -> None:
        self.model = model
        self._entries = entries
        self._active: str | None = None
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def parent_of(self, name: str) -> str | None:
        """The served name of the base an adapter runs on; None for the base itself."""
        if self._entries[self._known(name)].adapter is None:
            return None
        return next((n for n, e in self._entries.items() if e.adapter is None), None)

    def path_of(self, name: str) -> str:
        return self._entries[self._known(name)].path

    def generator(self, name: str) -> Generator:
        """The generator of ``name`` for work that does not run the model (``prepare``)."""
        return self._entries[self._known(name)].generator

    @contextmanager
    def use(self, name: str) -> Iterator[Generator]:
        """Hold the model with ``name``'s adapter and trainables switched on."""
        entry = self._entries[self._known(name)]
        with self._lock:
            if self._active != name:
                self._switch(entry)
                self._active = name
            yield entry.generator

    def _known(self, name: str) -> str:
        if name not in self._entries:
            raise UsageError(f"unknown model {name!r}: serving {', '.join(self._entries)}")
        return name

    def _switch(self, entry: _Entry) -> None:
        if any(e.adapter is not None for e in self._entries.values()):  # a PeftModel
            # The bare base runs with every adapter off.
            if entry.adapter is None:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(entry.adapter)
        params = {strip_peft_prefix(n): p for n, p in self.model.named_parameters()}
        with torch.no_grad():
            for key, tensor in entry.trainables.items():
                params[key].copy_(tensor)

    @classmethod
    def load(
        cls,
        model_path: str,
        model_base: str | None = None,
        *,
        adapters: Mapping[str, str] | None = None,
        served_name: str | None = None,
        device: str = AUTO,
        dtype: str = AUTO,
        cache_dir: str | None = None,
        **generator_options: Any,
    ) -> ModelSet:
        """Load ``model_path`` (an adapter, or a base/merged model) and ``adapters`` on its base.

        Names: ``served_name`` (default: the folder's name) for ``model_path``; ``base`` for its
        base without the adapter when ``model_path`` is an adapter; each adapter's own name.
        ``generator_options`` go to every :class:`Generator` (decode timeout, frame cache).
        """
        from vidlora.infer.device import detect_placement

        adapters = dict(adapters or {})
        placement = detect_placement(device, dtype, purpose="inference")
        options: dict[str, Any] = {
            "torch_dtype": placement.dtype,
            "device": str(placement.device),
            "cache_dir": cache_dir,
        }
        first = Path(model_path)
        first_name = served_name or first.name or model_path
        first_is_adapter = first.is_dir() and is_adapter_dir(first)
        lora: dict[str, str] = ({first_name: model_path} if first_is_adapter else {}) | adapters
        # Trained on an LLM plus a pre-trained projector file (the original's recipe) with the
        # projector saved: the base is then loaded without that file, so it has no usable projector
        # of its own: it is not served, and every adapter must bring its own.
        record = read_record(first) if first_is_adapter else None
        projectorless = bool(
            record is not None and record.base.pretrain_mm_mlp_adapter and holds_projector(first)
        )
        if projectorless:
            lacking = [n for n, p in adapters.items() if not holds_projector(Path(p))]
            if lacking:
                raise UsageError(
                    f"--adapters {', '.join(lacking)}: no projector of their own, and the base of "
                    f"{model_path} is served without its pre-trained projector file"
                )
        names = [first_name, *([BASE_NAME] if first_is_adapter and not projectorless else []), *adapters]
        if len(set(names)) != len(names):
            raise UsageError(f"served model names must differ: {names}")
        if first_is_adapter and not (first / ADAPTER_WEIGHTS).is_file():
            # A legacy Video-LLaVA output: loaded by its own path, alone.
            if adapters:
                raise UsageError(f"{model_path}: a legacy adapter is served alone (no --adapters)")
            loaded = load_for_inference(model_path, model_base, strict=True, **options)
            return cls(
                loaded.model,
                {first_name: _Entry(None, {}, Generator(loaded, **generator_options), model_path)},
            )
        for name, path in adapters.items():
            _check_adapter(name, path)
        base = load_base(model_path, model_base, **options)
        if first_is_adapter:
            _check_same_base(model_path, adapters)
        processors = {name: _processor_of(path, base) for name, path in lora.items()}
        keys = sorted({key for path in lora.values() for key in _trainable_keys(Path(path))})
        params = dict(base.model.named_parameters())
        unknown = [k for k in keys if k not in params]
        if unknown:
            raise UsageError(f"adapters hold tensors the base does not have: {unknown[:5]}")
        base_state = {k: params[k].detach().clone() for k in keys}
        model = base.model
        # PEFT's adapter names become module attributes: a served name like "train" would clash.
        peft_names = {name: f"adapter{index}" for index, name in enumerate(lora)}
        for index, (name, path) in enumerate(lora.items()):
            check_safetensors(Path(path) / ADAPTER_WEIGHTS)  # PEFT reads it next, unchecked
            with quiet_peft():
                if index == 0:
                    with quiet_imports():
                        from peft import PeftModel

                    model = PeftModel.from_pretrained(model, path, adapter_name=peft_names[name])
                else:
                    model.load_adapter(path, adapter_name=peft_names[name])
        model.eval()
        trainables = {name: _trainables(Path(path), base_state, params) for name, path in lora.items()}
        entries: dict[str, _Entry] = {}
        for name in names:
            adapter = peft_names.get(name)
            processor = processors.get(name, base.processor)
            inference = InferenceModel(model, base.tokenizer, processor, f"{name} on {model_path}")
            entries[name] = _Entry(
                adapter,
                trainables.get(name, base_state),
                Generator(inference, **generator_options),
                lora.get(name, model_base or model_path),
            )
        models = cls(model, entries)
        with models.use(names[0]):
            pass
        return models


def _check_adapter(name: str, path: str) -> None:
    directory = Path(path)
    if not (directory.is_dir() and is_adapter_dir(directory)):
        raise UsageError(f"--adapters {name}={path}: not a LoRA checkpoint directory")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"--adapters {name}={path}: no {ADAPTER_WEIGHTS} (legacy adapters are served alone)")
    if read_record(directory) is None:
        raise UsageError(f"--adapters {name}={path}: no {RECORD_FILE}, so its settings are unknown")


#: What makes two recorded bases the same weights (the projector comes with each adapter, checked
#: by name and shape; the attention kernel and the hub cache do not change the weights).
_BASE_IDENTITY = ("model_name_or_path", "video_tower", "image_tower")


def _check_same_base(model_path: str, adapters: Mapping[str, str]) -> None:
    """Every adapter was trained on the base ``model_path``'s adapter was trained on."""
    first = read_record(model_path)
    for name, path in adapters.items():
        record = read_record(path)
        if first is None or record is None:
            continue
        differ = [
            f"{field} {getattr(record.base, field)} vs {getattr(first.base, field)}"
            for field in _BASE_IDENTITY
            if getattr(record.base, field) != getattr(first.base, field)
        ]
        if differ:
            raise UsageError(
                f"--adapters {name}={path} was trained on another base than {model_path} "
                f"({'; '.join(differ)}): one server shares one base"
            )


def _processor_of(path: str, base: InferenceModel):
    """The adapter's recorded processor; its model-side settings must be the loaded base's."""
    record = read_record(path)
    if record is None:
        return base.processor
    processor = record.processor_for(base.model.config)
    if processor.config_overrides != base.processor.config_overrides:
        raise UsageError(
            f"{path} was trained with {processor.config_overrides}, the served base with "
            f"{base.processor.config_overrides}: serve it from its own base"
        )
    return processor


def _trainable_keys(path: Path) -> list[str]:
    from vidlora.model.hub import keys_of

    file = path / NON_LORA_FILE
    return list(keys_of([file])) if file.is_file() else []


def _trainables(
    path: Path, base_state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every switched tensor for the adapter at ``path``: its own where saved, else the base's."""
    file = path / NON_LORA_FILE
    saved = read_trainables(file) if file.is_file() else {}
    state = {}
    for key, tensor in base_state.items():
        value = saved.get(key, tensor)
        if value.shape != tensor.shape:
            raise UsageError(f"{file}: {key} has shape {tuple(value.shape)}, the base {tuple(tensor.shape)}")
        state[key] = value.to(device=params[key].device, dtype=params[key].dtype)
    return state
