"""Errors a stage raises when it refuses its input."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable


class StageError(RuntimeError):
    """A stage refused its input; the message names the file, row(s) and rule."""


class DataValidationError(StageError):
    """Input data broke validation rules; ``report`` holds the machine-readable summary."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


def exit_code(command: str, body: Callable[[], object]) -> int:
    """Run ``body`` for `genre <command>`: a dict result is printed as JSON (exit 0), an int is
    the exit code; bad params exit 2 and input a stage refused exits 1, each with its message."""
    from genre_tasks.config import ParamsError

    try:
        result = body()
    except ParamsError as exc:
        print(f"genre {command}: bad params: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"genre {command}: FAILED\n{exc}", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0
