"""Errors a stage raises when it refuses its input."""
from __future__ import annotations


class StageError(RuntimeError):
    """A stage refused its input; the message names the file, row(s) and rule."""


class DataValidationError(StageError):
    """Input data broke validation rules; ``report`` holds the machine-readable summary."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}
