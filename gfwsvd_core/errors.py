"""The user-error contract: what the CLI and the app show as one line, and what is a bug.

Every check of user input (model names, options, data files, ranks, exported folders) raises a
:class:`GfwsvdUserError` subclass at the boundary where the input enters the library. The CLI
prints those as ``error: ...`` and exits 2; any other exception is a bug and keeps its traceback.
``GfwsvdUserError`` derives from ``ValueError`` so that callers catching ``ValueError`` keep working.
"""

from __future__ import annotations


class GfwsvdUserError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do instead."""


class ModelLoadError(GfwsvdUserError):
    """A model or tokenizer that cannot be loaded (missing offline, remote code, invalid config)."""


class DataError(GfwsvdUserError):
    """Calibration or evaluation data that cannot be read or is not enough for the task."""


class ConfigurationError(GfwsvdUserError):
    """An invalid option, method, task, sample unit, rank or ratio."""


class OutputPathError(GfwsvdUserError):
    """An output folder that may not be written (not empty, outside the output root, ...)."""


__all__ = ["ConfigurationError", "DataError", "GfwsvdUserError", "ModelLoadError", "OutputPathError"]
