"""Event triggers for asset watchers (Airflow 3 event-driven scheduling).

:class:`LandingFolderTrigger` watches the feedback landing folder and fires an event whenever a
new batch file has appeared there (and stopped growing), so the asset it watches is updated and
``genre_feedback`` starts within seconds instead of at the next cron tick. Unlike the standard
provider's ``FileDeleteTrigger`` it never deletes or moves anything: the feedback DAG validates,
applies or quarantines the batch and moves the file itself.

The trigger runs for as long as the watching DAG exists, yielding one event per change; its
memory of seen files is per triggerer process, so after a triggerer restart the files still
waiting in the folder fire once more (a feedback run that finds them processed applies
nothing, and emits no store update).
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

#: batch file types of the landing folder (= genre_tasks.feedback.params.BATCH_SUFFIXES)
BATCH_SUFFIXES = (".parquet", ".csv")


def scan(directory: str | Path, suffixes: tuple[str, ...] = BATCH_SUFFIXES) -> dict[str, tuple[int, int]]:
    """``{file name: (size, mtime_ns)}`` of the visible batch files in ``directory`` (none if it
    does not exist). Hidden files and other suffixes are the feedback DAG's business to report."""
    out: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(suffixes):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # moved away between listing and stat
            continue
        out[entry.name] = (st.st_size, st.st_mtime_ns)
    return out


def new_files(before: dict[str, tuple[int, int]], now: dict[str, tuple[int, int]]) -> list[str]:
    """Names in ``now`` that are not in ``before`` or changed (size / mtime)."""
    return sorted(name for name, sig in now.items() if before.get(name) != sig)


class LandingFolderTrigger(BaseEventTrigger):
    """Fire when a new batch file lands in ``directory`` (polled every ``poke_interval`` s).

    A file must keep the same size and mtime over one poll before it counts (a batch still
    being copied in is not announced half-written). Event payload: ``{"directory", "batches"}``.
    """

    def __init__(self, directory: str, poke_interval: float = 2.0,
                 suffixes: tuple[str, ...] | list[str] = BATCH_SUFFIXES) -> None:
        super().__init__()
        if not directory:
            raise ValueError("LandingFolderTrigger: directory is required")
        if poke_interval <= 0:
            raise ValueError(f"LandingFolderTrigger: poke_interval must be > 0, got {poke_interval}")
        self.directory = str(directory)
        self.poke_interval = float(poke_interval)
        self.suffixes = tuple(suffixes)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"directory": self.directory, "poke_interval": self.poke_interval,
                 "suffixes": list(self.suffixes)})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        announced: dict[str, tuple[int, int]] = {}
        pending: dict[str, tuple[int, int]] = {}
        while True:
            now = scan(self.directory, self.suffixes)
            # a file counts once it looked the same in two consecutive polls
            stable = {n: s for n, s in now.items() if pending.get(n) == s}
            fresh = new_files(announced, stable)
            if fresh:
                self.log.info("new batch file(s) in %s: %s", self.directory, fresh)
                yield TriggerEvent({"directory": self.directory, "batches": fresh})
            # forget what left the folder, so the same name dropped again fires again
            announced = {n: s for n, s in {**announced, **stable}.items() if n in now}
            pending = now
            await asyncio.sleep(self.poke_interval)
