"""``dvc repro`` of one stage without starting processes: DVC's Python API, and the stage's own
``genre <stage>`` command called **in this process**.

Why: a stage task used to start two interpreters, ``dvc`` and then ``genre <stage>``, each
importing its libraries again (DVC ~1 s; pandas, torch, Great Expectations, MLflow 1-3 s per
stage): most of the cost of a stage task on the feedback retrain path. An Airflow task process
is forked from a worker that preloaded those libraries (``genre_airflow.local_settings``), so the
stage starts with everything imported. A task runs one or two stages and then ends, so nothing a
stage leaves in memory outlives its task (``airflow dags test`` runs a whole DAG in one process:
there, stages share it one after the other).

Not a fork of the task process: a fork inherits whatever the task process did before, e.g. an
OpenMP thread pool started by torch (the child's first parallel region then waits forever for
threads that do not exist: seen with ``airflow dags test``, where ``embed_shard`` had encoded
in the process), or lazy proxies and pooled connections to services the child cannot reach.

What stays as with the ``dvc`` process: DVC decides everything it decides for ``dvc repro``
(skip, restore from the run-cache, pull, lock); the command sees the environment and working
directory DVC gives its commands (``DVC_ROOT``, ``DVC_STAGE``; restored afterwards); what it
prints on stdout/stderr and DVC's own messages are logged line by line (``| ...``) at INFO, so a
stage's progress bars never reach the task's stderr (which Airflow logs at error level); the
stage's loggers (``genre.*``) go to the task log at their own level; its exit code is the
``genre`` process's (0; 1 refused input; 2 bad params; 1 with the traceback for an unexpected
exception). Only commands whose program is in :data:`INPROCESS` run here; any other stage
command runs as DVC runs it (a shell process).

``$GENRE_STAGE_INPROCESS=0`` turns this off (``dvc repro`` as a process, the stage command as
DVC starts it).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from unittest.mock import patch  # patch.dict: os.environ changed and restored exactly

from genre_tasks.registry import dvc_yaml, runcache

INPROCESS_ENV = "GENRE_STAGE_INPROCESS"
#: stage programs called in this process: program name -> "module:function", function(argv) -> exit code
INPROCESS: dict[str, str] = {"genre": "genre_tasks.cli:main"}
#: exit code reported when DVC itself failed (not the stage command)
DVC_FAILED = 255

Echo = Callable[[str], None]


def enabled() -> bool:
    """Stage commands in this process unless ``$GENRE_STAGE_INPROCESS`` is 0/false/no/off."""
    return os.environ.get(INPROCESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def target_of(cmd: str) -> tuple[str, list[str]] | None:
    """("module:function", argv) when ``cmd`` is one command of an :data:`INPROCESS` program
    with plain arguments (no shell syntax), else None (DVC runs it in a shell)."""
    if any(ch in cmd for ch in ";&|<>`$\n(){}*?=\\"):
        return None
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if not words or words[0] not in INPROCESS:
        return None
    return INPROCESS[words[0]], words[1:]


class _LineStream(io.TextIOBase):
    """A text stream that sends each complete line to ``echo`` (what the stage prints)."""

    def __init__(self, echo: Echo) -> None:
        super().__init__()
        self.echo, self.buffer_ = echo, ""
        #: a write made *by* ``echo`` (a logging handler writing to the current sys.stderr, e.g.
        #: logging's last resort, outside Airflow) goes to the real stderr, not round in a loop
        self._echoing = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # progress bars: plain lines, no cursor control
        return False

    def _send(self, line: str) -> None:
        self._echoing = True
        try:
            self.echo(line)
        finally:
            self._echoing = False

    def write(self, text: str) -> int:
        if self._echoing:
            if sys.__stderr__ is not None:
                sys.__stderr__.write(text)
            return len(text)
        self.buffer_ += text.replace("\r", "\n")
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            if line.strip():
                self._send(line)
        return len(text)

    def flush(self) -> None:
        if self._echoing:
            return
        if self.buffer_.strip():
            self._send(self.buffer_)
        self.buffer_ = ""


def run_here(target: str, argv: Sequence[str], env: dict[str, str], echo: Echo) -> int:
    """Call ``target(argv)`` in this process with ``env`` added to ``os.environ`` (restored
    afterwards) and stdout/stderr sent line by line to ``echo``; return its exit code. An
    ``Exception`` is exit code 1 with its traceback echoed; anything else (a task timeout, an
    interrupt) propagates."""
    module, function = target.split(":")
    call = getattr(importlib.import_module(module), function)
    stream = _LineStream(echo)
    with patch.dict(os.environ, env), contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            result = call(list(argv))
            code = result if isinstance(result, int) else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # noqa: BLE001 - the process would have died with this traceback
            traceback.print_exc()
            code = 1
        stream.flush()
    return code


@contextlib.contextmanager
def commands_here(echo: Echo) -> Iterator[None]:
    """While DVC's Python API reproduces stages, call their :data:`INPROCESS` commands in this
    process (:func:`run_here`, in DVC's working directory with DVC's variables); other commands
    run as DVC runs them."""
    from dvc.stage import run as dvc_run
    from dvc.stage.exceptions import StageCmdFailedError

    original = dvc_run._run

    def _run(executable, cmd, **kwargs):
        target = target_of(cmd)
        if target is None:
            return original(executable, cmd, **kwargs)
        dvc_vars = {k: v for k, v in kwargs["env"].items() if k.startswith("DVC_") and os.environ.get(k) != v}
        with contextlib.chdir(kwargs["cwd"]):
            code = run_here(target[0], target[1], dvc_vars, echo)
        if code != 0:
            raise StageCmdFailedError(cmd, code)
        return None

    dvc_run._run = _run
    try:
        yield
    finally:
        dvc_run._run = original


class _Lines(logging.Handler):
    def __init__(self, echo: Echo, warn: Echo) -> None:
        super().__init__(logging.INFO)
        self.echo, self.warn = echo, warn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not fail the stage
            message = str(record.msg)
        out = self.echo if record.levelno < logging.WARNING else self.warn
        for line in message.splitlines() or [""]:
            out(line)


@contextlib.contextmanager
def dvc_messages(echo: Echo, warn: Echo | None = None) -> Iterator[None]:
    """DVC's log messages, line by line: INFO to ``echo``, WARNING and up to ``warn`` (default
    ``echo``), instead of the handlers DVC installs on import (stdout, and stderr for warnings,
    which an Airflow task would log at error level)."""
    logger = logging.getLogger("dvc")
    handler = _Lines(echo, warn or echo)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    for h in saved[2]:
        logger.removeHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h in saved[2]:
            logger.addHandler(h)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def reproduce(path: str | Path, stage: str, pull: bool, echo: Echo, warn: Echo | None = None) -> tuple[int, str]:
    """``dvc repro --single-item [--pull] <stage>`` in ``path`` through DVC's Python API (call it
    with ``os.environ`` and cwd set as for the ``dvc`` process), with ``--pull`` fetching only
    this stage's run-cache entries (:mod:`genre_tasks.registry.runcache`); returns (exit code, output) in
    the ``dvc`` process's terms: 0, or the stage command's ``exited with N``, or
    :data:`DVC_FAILED`."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    lines: list[str] = []

    def both(line: str) -> None:
        lines.append(line)
        echo(line)

    def warned(line: str) -> None:
        lines.append(line)
        (warn or echo)(line)

    code = 0
    with dvc_messages(both, warned), commands_here(both), dvc_yaml.parsed_once():
        try:
            with Repo(str(path)) as repo, (runcache.fetch_on_lookup(repo) if pull else contextlib.nullcontext()):
                repo.reproduce(targets=[stage], single_item=True, pull=pull)
        except DvcException as exc:
            causes, cause = [], exc
            while cause is not None and len(causes) < 5:
                causes.append(str(cause))
                cause = cause.__cause__ or cause.__context__
            both("ERROR: " + ": ".join(causes))
            code = DVC_FAILED
    return code, "".join(line + "\n" for line in lines)
