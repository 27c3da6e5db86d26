"""The few exception types a user can cause. Each message says what went wrong and how to fix it.

Internal invariants use ``assert``; anything caused by a config, a data path or a checkpoint raises
one of these.
"""


class SSLKitError(Exception):
    """Base class for user-facing sslkit errors."""


class ConfigError(SSLKitError, ValueError):
    """A config value is invalid or inconsistent (wrong key, wrong type, impossible combination)."""


class DataError(SSLKitError, RuntimeError):
    """Data is missing, empty, unreadable or too small for the requested crop."""


class CheckpointError(SSLKitError, RuntimeError):
    """A checkpoint is missing, corrupt, from another architecture or of an unknown format."""


class TrainingError(SSLKitError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss)."""


class ErrorExit(SystemExit):
    """A command's exit (status 2) after it printed the user error ``error``. A ``SystemExit``, so a command
    exits 2; a sweeper tells it from other exits (a preemption's) and records the trial as failed."""

    def __init__(self, error: SSLKitError) -> None:
        super().__init__(2)
        self.error = error
