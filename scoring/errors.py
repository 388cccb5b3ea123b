"""The scoring errors: bad input (the message names it) and what a user should know about a run."""
from __future__ import annotations


class ScoringError(ValueError):
    """Bad input to the scorer: weights, variant, option, image list or output (the message names it)."""


class ScoringWarning(UserWarning):
    """Something the user should know about a scoring run (batch-coupled scores, an empty folder)."""
