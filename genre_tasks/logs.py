"""Stage logging: what a stage read, what it wrote and how long it took."""
from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    else:
        root.setLevel(level)
    for noisy in ("httpx", "urllib3", "great_expectations", "filelock", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class StageLog:
    name: str
    logger: logging.Logger
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def read(self, path: str | Path, what: str = "") -> None:
        self.reads.append(str(path))
        self.logger.info("read %s%s", path, f" ({what})" if what else "")

    def wrote(self, path: str | Path, what: str = "") -> None:
        self.writes.append(str(path))
        self.logger.info("wrote %s%s", path, f" ({what})" if what else "")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ru_maxrss is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def stage(name: str, paths=None) -> Iterator[StageLog]:
    """Context manager every stage runs in; logs a one-line summary at the end.

    With ``paths`` (a :class:`genre_tasks.schema.Paths`), a successful stage also records the
    content hashes of what it logged as read and written (:mod:`genre_tasks.manifests`).
    """
    setup_logging()
    logger = logging.getLogger(f"genre.{name}")
    log = StageLog(name, logger)
    logger.info("stage %s: start", name)
    try:
        yield log
    except Exception:
        logger.error("stage %s: FAILED after %.1fs", name, log.seconds)
        raise
    if paths is not None:
        from genre_tasks import manifests

        logger.info("recorded %s", manifests.write(paths, name, log.reads, log.writes))
    logger.info("stage %s: done in %.1fs (read %d, wrote %d file(s), peak RSS %.0f MB)",
                name, log.seconds, len(log.reads), len(log.writes), peak_rss_mb())


@contextlib.contextmanager
def hf_quiet() -> Iterator[None]:
    """No transformers "Loading weights" progress bar per model load inside the block (the
    previous setting is restored). Imports transformers: call it where a model is loaded."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()
