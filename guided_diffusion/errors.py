"""Errors caused by the user's input.

`main.py` prints such an error as a single line and exits with status 2, without a traceback.
Programming errors are ordinary exceptions and keep their traceback.
"""


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
