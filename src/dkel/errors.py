"""Errors that reach the user as one line, without a traceback."""


class DkelError(Exception):
    """A problem with the user's input or environment, reported as `error: <message>`."""


class ConfigError(DkelError):
    pass


class DataError(DkelError):
    pass


class TrainingStopped(DkelError):
    """Training stopped on purpose (non-finite loss, collapse); the last good state is kept."""
