"""Errors that reach the user.

Every problem caused by input (a missing path, a bad option, a corrupt file) raises a
`SlmkitError` subclass whose message says what was wrong and what to do about it. The CLI
prints that message as one line and exits with status 2; Python callers can catch it.
"""

from __future__ import annotations


class SlmkitError(Exception):
    """Base class for user-facing errors: one line, actionable."""


class InputError(SlmkitError):
    """A path, file or value given by the user cannot be used."""


class OutputExistsError(SlmkitError):
    """The output path exists and overwriting was not asked for."""


class TokenizerError(SlmkitError):
    """A tokenizer cannot be trained, loaded or applied as asked."""


class ExportError(SlmkitError):
    """A model cannot be written in the asked format, or the written file does not reproduce it."""


class MissingExtraError(SlmkitError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"{module} is not installed; run: pip install 'slmkit[{extra}]'")


class QualityBudgetError(SlmkitError):
    """A result misses the quality budget the user set (e.g. --max-ppl-increase)."""


class DeviceError(SlmkitError):
    """The asked device or dtype does not exist on this machine."""
