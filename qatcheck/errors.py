"""One exception family, so the plugin can turn every user mistake into one readable line.

Each error names the thing the user has to fix (a file, a field, a value); the plugin prints the
message without a traceback through qatcheck's internals.
"""
from __future__ import annotations


class QatcheckError(Exception):
    """Base class: a problem the user can act on (bad input, missing baseline, unknown name)."""


class ConfigError(QatcheckError):
    """A recipe field, option or name is invalid (unknown mode, calibrator, layer...)."""


class DataError(QatcheckError):
    """A dataset or calibration source is missing, empty or has the wrong shape."""


class ArtifactError(QatcheckError):
    """A checkpoint or ONNX file cannot be read or does not match the recipe's input spec."""


class BaselineError(QatcheckError):
    """A baseline file is malformed; it is never rewritten while in that state."""
