"""Errors caused by the user's input.

`main.py` prints such an error as a single line and exits with status 2, without a traceback.
Programming errors are ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in a file, folder or setting the user gave us; the message names it and says the fix."""


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or is out of range."""


class DatasetError(UserError):
    """The dataset folder is missing, empty, or holds files that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, or does not fit the config."""


class LaunchError(UserError):
    """The launcher's environment variables (torchrun, Slurm, Open MPI) are missing, half set or inconsistent."""


def exit_status(action: Callable[[], int | None]) -> int:
    """Run a command-line action and return its exit status: a UserError prints one line `error: ...` on stderr
    and gives 2, Ctrl-C gives 130, otherwise the action's own status (None = 0). Shared by main.py,
    evaluate.sh and filter.sh so that every entry point reports user mistakes the same way."""
    try:
        return action() or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
