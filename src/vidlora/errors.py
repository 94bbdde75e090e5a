"""The one base class for problems with what a user gave vidlora, and two common kinds of it.

Every error a user can fix — a bad flag, a malformed record, a missing file, a checkpoint that
does not match the model, an undecodable video — derives from :class:`VidloraError`. The CLI
catches it in one place and prints ``vidlora <command>: error: <message>`` (exit 2); anything
else escaping a command is a bug and keeps its traceback. The subclasses also derive from the
built-in exception they refine, so ``except ValueError`` / ``except FileNotFoundError`` in
callers keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class VidloraError(Exception):
    """A problem with the user's input; the message says what and where, and how to fix it."""


class UsageError(VidloraError, ValueError):
    """A value the user gave that cannot work (a flag, an option, a request)."""


class NotFoundError(VidloraError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what was expected)."""


class AlreadyExistsError(VidloraError, FileExistsError):
    """An output the user named already holds something a command will not overwrite unasked."""


def run_command(name: str, command: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run one command's ``main``: a :class:`VidloraError` becomes one line on stderr and exit status 2."""
    try:
        return int(command(argv) or 0)
    except VidloraError as err:
        print(f"vidlora {name}: error: {err}", file=sys.stderr)
        return 2
