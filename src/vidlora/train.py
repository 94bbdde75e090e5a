"""`vidlora train` / `python -m vidlora.train`: the original's LoRA command, on today's stack.

Launch it as the original does — the DeepSpeed launcher spells `-m` as `--module`:
`deepspeed --module vidlora.train --deepspeed configs/zero3.json …` — or with
`torchrun -m vidlora.train …`, `accelerate launch -m vidlora.train …`, or plainly; a YAML file of
flags may come first (`vidlora train config.yaml --flag value`, the flags win). Every flag is
checked before any model is loaded (all problems at once); the recipe is
:mod:`vidlora.training.recipe`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vidlora.args import parse_train_config


def main(argv: list[str] | None = None) -> int:
    """Parse, train, and exit 1 when training itself fails (a non-finite loss, a lost rank); user
    errors raise."""
    model_args, data_args, train_args, config = parse_train_config(argv)
    from vidlora.training.callbacks import NonFiniteTrainingError
    from vidlora.training.distributed import peer_lost_error
    from vidlora.training.recipe import run, summary_line

    assert train_args.output_dir is not None  # TrainingArguments.__post_init__ fills in a default
    Path(train_args.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        trainer = run(model_args, data_args, train_args, config)
        if train_args.process_index == 0:
            print(summary_line(Path(train_args.output_dir), trainer))
    except NonFiniteTrainingError as err:
        print(f"vidlora train: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        # gloo says only "Connection closed by peer" / "Timed out waiting"; say which rank and what next.
        lost = peer_lost_error(err, train_args.output_dir)
        if lost is None:
            raise
        print(f"vidlora train: {lost}", file=sys.stderr)
        return 1
    finally:
        # Left to interpreter exit, the process group's threads can be torn down while still
        # running ("terminate called without an active exception", exit code -6 after a run
        # that finished and saved: seen once in three ZeRO-3 resume runs).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from vidlora.errors import run_command

    raise SystemExit(run_command("train", main, sys.argv[1:]))
