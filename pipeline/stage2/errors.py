"""The errors stage two raises: a run that cannot start or go on, and a run whose loss diverged."""
from __future__ import annotations


class TrainError(ValueError):
    """A training run that cannot start or continue; the message is one line."""


class TrainingDiverged(FloatingPointError):
    """The loss or gradient became NaN/inf; the last good adapter was saved first."""
