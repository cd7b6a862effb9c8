"""Errors a user can cause (bad config, missing or damaged data or checkpoints).

Raised with one clear message naming the bad value and what is expected; the command-line
entry points print the message and exit non-zero instead of showing a traceback.
"""


class MicronetError(ValueError):
    """A problem with the user's input, explained in its message."""


class DataError(MicronetError):
    """A data set is missing, damaged, or not what was asked for."""


class CheckpointError(MicronetError):
    """A checkpoint is missing, damaged, or does not fit the model."""


class ConfigError(MicronetError):
    """A configuration value is invalid."""


class LaunchError(MicronetError):
    """The processes of a multi-host job cannot start together (no coordinator, a missing
    peer, processes started with different configs). The command line exits with status 2."""
