"""One tree of expected errors.

Every stage raises a :class:`PipelineError` (or a subclass) for problems a user can fix:
a missing file, a bad setting, imagery and labels that do not overlap. ``core.cli`` turns
it into one line on stderr and exit code 1. Each message says what is wrong, which file or
setting, and how to fix it. Several classes also subclass Python's own exception so that
library code can catch them the usual way (``except FileNotFoundError``).
"""

from __future__ import annotations


class PipelineError(Exception):
    """An expected, user-fixable failure; the message says how to fix it."""


class SettingsError(PipelineError, ValueError):
    """settings.json or a --set override is invalid; the message names the key path."""


class InputMissingError(PipelineError, FileNotFoundError):
    """A file or folder an earlier stage should have made is not there."""


class RasterError(PipelineError, OSError):
    """A raster cannot be read or written (unreadable, truncated, zero bytes, ...)."""


class LabelError(PipelineError, ValueError):
    """A label file is missing, unreadable, empty, or does not match the imagery."""


class DataError(PipelineError, ValueError):
    """Inputs are readable but unusable (no roof pixels, mixed band counts, ...)."""


class OutputExistsError(PipelineError, FileExistsError):
    """A finished output exists and --overwrite was not given."""


class BlankPredictionError(DataError):
    """Every predicted mask is blank; ``results`` holds what was predicted (the outputs are written)."""

    def __init__(self, message: str, results: list | None = None) -> None:
        super().__init__(message)
        self.results = results or []


class CheckError(PipelineError):
    """The pre-flight check found at least one fatal problem."""


class BundleError(PipelineError, ValueError):
    """A bundle folder is missing, incomplete or corrupt."""


class CollapseError(PipelineError):
    """Training collapsed to predicting one class everywhere."""


class DownloadError(PipelineError):
    """The store cannot be reached or read, or nothing usable is there; the message says what to do."""
