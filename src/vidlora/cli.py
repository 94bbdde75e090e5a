"""The `vidlora` command: one entry point, one module per sub-command, one error policy.

Each sub-command lives in its own module and exposes ``main(argv) -> int``; this file dispatches,
importing the chosen module lazily so that `vidlora info` never pays for the training stack, and
turns a :class:`~vidlora.errors.VidloraError` into ``vidlora <cmd>: error: …`` with exit status 2.
Modules started by a launcher (``deepspeed --module vidlora.train``, ``torchrun -m
vidlora.infer.predict``) go through the same :func:`~vidlora.errors.run_command`.
"""

from __future__ import annotations

import importlib
import sys

from vidlora.errors import run_command

# name -> (module exposing main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vidlora.info", "parameter counts per part, trainable vs frozen under a LoRA recipe"),
    "synth": ("vidlora.data.synthetic", "write a synthetic video/image QA dataset (real mp4 files)"),
    "check": ("vidlora.check", "read every sample the way training would and report every problem"),
    "train": (
        "vidlora.train",
        "LoRA fine-tuning with the original's flags (launchable by deepspeed/torchrun)",
    ),
    "demo": ("vidlora.demo", "synth data, score, fine-tune the tiny model, score again"),
    "chat": ("vidlora.infer.chat", "interactive chat about a video or image"),
    "predict": ("vidlora.infer.predict", "batched generation over a dataset"),
    "serve": ("vidlora.serve.app", "an OpenAI-compatible API (text, images, video; several adapters)"),
    "merge": ("vidlora.infer.merge", "merge a LoRA checkpoint into its base model"),
    "eval": ("vidlora.eval.score", "score predictions (exact match, judge protocol)"),
    "cache": ("vidlora.cache", "decode and pre-process every video/image once into a frame cache"),
    "plan": ("vidlora.plan", "predict peak GPU memory of a training run and which settings fit"),
    "bench": ("vidlora.bench", "measure training throughput, data wait, padding and memory vs baselines"),
    "webui": ("vidlora.webui", "web UI: chat with a checkpoint, launch and follow training, check data"),
}


# Packages of the optional extras, by the extra that installs them.
EXTRAS: dict[str, str] = {"fastapi": "serve", "uvicorn": "serve", "gradio": "webui"}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: vidlora <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `vidlora <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vidlora import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vidlora: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
            print(f"vidlora: the {name!r} command is not available in this version", file=sys.stderr)
            return 2
        extra = EXTRAS.get((err.name or "").split(".")[0])
        if extra is not None:
            print(f"vidlora {name} needs {err.name}: pip install 'vidlora[{extra}]'", file=sys.stderr)
            return 2
        raise
    return run_command(name, module.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
