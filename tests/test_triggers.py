"""The landing-folder event trigger (genre_airflow.triggers): fires once per new, complete batch
file, never for hidden or foreign files, never deletes anything; bad arguments are refused."""
from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("airflow")
from genre_airflow.triggers import LandingFolderTrigger, new_files, scan  # noqa: E402


def _events(trigger: LandingFolderTrigger, actions: list, polls: int) -> list[dict]:
    """Run the trigger for ``polls`` polls, doing ``actions[i]()`` before poll i."""
    async def main() -> list[dict]:
        out: list[dict] = []
        gen = trigger.run()

        async def consume():
            async for ev in gen:
                out.append(ev.payload)
        task = asyncio.create_task(consume())
        for i in range(polls):
            if i < len(actions) and actions[i]:
                actions[i]()
            await asyncio.sleep(trigger.poke_interval)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return out
    return asyncio.run(main())


def test_fires_once_per_new_complete_batch_and_keeps_the_file(tmp_path):
    inbox = tmp_path / "incoming"
    trig = LandingFolderTrigger(directory=str(inbox), poke_interval=0.05)
    actions = [None, lambda: (inbox.mkdir(), (inbox / "w1.parquet").write_bytes(b"x" * 10),
                              (inbox / ".hidden.parquet").write_bytes(b"x"),
                              (inbox / "notes.txt").write_text("x")),
               None, None, lambda: (inbox / "w2.csv").write_text("a"), None, None, None]
    events = _events(trig, actions, len(actions))
    assert [e["batches"] for e in events] == [["w1.parquet"], ["w2.csv"]]
    assert (inbox / "w1.parquet").exists() and (inbox / "w2.csv").exists()  # nothing consumed


def test_a_growing_file_is_announced_only_when_it_stops_changing(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    f = inbox / "w3.parquet"

    def grow():
        with open(f, "ab") as fh:
            fh.write(b"y" * 100)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    trig = LandingFolderTrigger(directory=str(inbox), poke_interval=0.05)
    events = _events(trig, [grow, grow, grow, None, None, None], 6)
    assert [e["batches"] for e in events] == [["w3.parquet"]]


def test_serialize_round_trip_and_bad_arguments(tmp_path):
    path, kwargs = LandingFolderTrigger(directory=str(tmp_path), poke_interval=2).serialize()
    assert path == "genre_airflow.triggers.LandingFolderTrigger"
    assert LandingFolderTrigger(**kwargs).serialize() == (path, kwargs)
    with pytest.raises(ValueError, match="directory"):
        LandingFolderTrigger(directory="")
    with pytest.raises(ValueError, match="poke_interval"):
        LandingFolderTrigger(directory=str(tmp_path), poke_interval=0)
    assert scan(tmp_path / "missing") == {}
    assert new_files({"a": (1, 1)}, {"a": (1, 1), "b": (2, 2), "c": (1, 2)}) == ["b", "c"]
