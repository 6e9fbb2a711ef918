"""Errors a user can act on. The CLI prints these without a traceback and exits with code 2."""


class DaytuneError(Exception):
    """Base class: the message says what was wrong and how to fix it."""


class ConfigError(DaytuneError):
    """A config file or command-line value is invalid."""


class DataError(DaytuneError):
    """A data file is missing or malformed (the message names file and line)."""


class ModelError(DaytuneError):
    """A model reference cannot be resolved or loaded."""


class RunError(DaytuneError):
    """A run folder is missing, incomplete or cannot be resumed."""
