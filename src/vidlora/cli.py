"""The `vidlora` command: one entry point, one module per sub-command.

Each sub-command lives in its own module and exposes ``main(argv) -> int``; this file only
dispatches, importing the chosen module lazily so that `vidlora info` never pays for the
training stack and `vidlora train` keeps the seed's flags parsed by its own dataclasses.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module exposing main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vidlora.model.info", "parameter counts per part, trainable vs frozen under a LoRA recipe"),
    "synth": ("vidlora.data.synthetic", "write a synthetic video/image QA dataset (real mp4 files)"),
    "check": ("vidlora.data.check", "read every sample the way training would and report every problem"),
    "train": ("vidlora.train", "LoRA fine-tuning with the seed's flags (launchable by deepspeed/torchrun)"),
    "demo": ("vidlora.demo", "synth data, score, fine-tune the tiny model, score again"),
    "chat": ("vidlora.infer.chat", "interactive chat about a video or image"),
    "predict": ("vidlora.infer.predict", "batched generation over a dataset"),
    "merge": ("vidlora.infer.merge", "merge a LoRA checkpoint into its base model"),
    "eval": ("vidlora.eval.score", "score predictions (exact match, judge protocol)"),
}


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
        raise
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
