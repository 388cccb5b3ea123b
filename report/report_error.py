"""The report's error: a missing or unusable file or option (the message names it)."""
from __future__ import annotations


class ReportError(ValueError):
    """The report cannot be made: a missing or unusable file or option (the message names it)."""
