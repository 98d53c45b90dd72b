"""Errors that reach the user as one line, without a traceback.

Exit codes of the `dkel` command: 2 for an error (bad input, data, storage), 3 when training
stopped on purpose (non-finite loss, divergence, collapse), 130 on Ctrl-C and 143 on SIGTERM."""


class DkelError(Exception):
    """A problem with the user's input or environment, reported as `error: <message>`."""


class ConfigError(DkelError):
    pass


class DataError(DkelError):
    pass


class StorageError(DkelError):
    """A file could not be written or read (disk full, read-only, permissions)."""


class RunFolderError(DkelError):
    """A run folder cannot be used as asked (not a run, in use, would lose someone's files)."""


class TrainingStopped(DkelError):
    """Training stopped on purpose (non-finite loss, divergence, collapse); the last good state is kept."""


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so every `finally` runs."""
