"""Project exception types.

Every error a user can cause (bad file, bad option, wrong checkpoint) is raised as a
:class:`ComtipError` subclass whose message is one line that names the file and the fix.
The CLI prints ``error: <message>`` and exits with status 2; the widgets show the same
message as a napari notification. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class ComtipError(Exception):
    """Base class of the errors a user can fix."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.hint = hint
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message.rstrip("."))
        if hint:
            parts.append(f". {hint.rstrip('.')}")
        parts.append(".")
        super().__init__("".join(parts))


class InputError(ComtipError):
    """A slide, spot table, expression matrix or option that cannot be used as given."""


class CheckpointError(ComtipError):
    """A checkpoint file that is missing, not ours, of another version, or of another gene panel."""


class ConfigError(ComtipError):
    """A configuration file or value that is not understood."""


class TrainingError(ComtipError):
    """Training cannot continue (e.g. the loss became NaN); the last good checkpoint is kept."""


class Cancelled(ComtipError):
    """The user cancelled a long-running operation."""
