"""Issue 9, item 6: the feedback store's safety. The lock is taken before the store is read
(two runs at once apply shared events once); only regular files inside the landing folder
are read (symlinks, fifos: refused unread); per-batch byte / row limits; every entry of the
landing folder is processed or reported; invalid UTF-8 and U+FFFD are refused in batches.
Tiny fixtures only (conftest's MovieLens: 5 items, 4 users, 12 interactions).
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT
from test_feedback import LOGICAL, T0, params, paths, rows  # noqa: F401 (fixtures)

from genre_tasks.data import adapters
from genre_tasks import feedback
from genre_tasks import schema as S


@pytest.fixture
def fp(paths) -> feedback.FeedbackPaths:  # noqa: F811
    """The feedback paths, with the landing folder created."""
    fp = feedback.FeedbackPaths(paths)
    fp.incoming.mkdir(parents=True)
    return fp


def store_rows(paths: S.Paths) -> int:
    return int(adapters.read_store(paths.source)[0].shape[0])


def store_events_unique(paths: S.Paths) -> bool:
    store = adapters.read_store(paths.source)[0]
    return not feedback.event_keys(store).duplicated().any()


# --- the lock ---------------------------------------------------------------------------------
def lock_is_held(fp: feedback.FeedbackPaths) -> bool:
    """Try the store lock from another open file: held by someone iff it would block."""
    with open(fp.lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def test_apply_reads_the_store_only_under_the_lock(params, paths, fp, monkeypatch):
    """The double-apply race: apply_batches used to read the store before taking the lock, so
    a second run checked "already in the store" against a copy missing the first run's apply."""
    fp.lock.parent.mkdir(parents=True, exist_ok=True)
    rows(("1", "3", T0, 4.0)).to_parquet(fp.incoming / "a.parquet", index=False)
    assert feedback.validate_batch(params, paths, "a", LOGICAL)["status"] == "valid"
    seen = []
    real = feedback.load_store

    def spy(s, fp_):
        seen.append(lock_is_held(fp_))
        return real(s, fp_)

    monkeypatch.setattr(feedback, "load_store", spy)
    out = feedback.apply_batches(params, paths, ["a"], LOGICAL)
    assert out["applied"] == ["a"] and seen == [True]
    rows(("2", "3", T0, 4.0)).to_parquet(fp.incoming / "b.parquet", index=False)
    monkeypatch.setattr(feedback, "load_store", real)
    assert feedback.validate_batch(params, paths, "b", LOGICAL)["status"] == "valid"
    monkeypatch.setattr(feedback, "load_store", spy)
    assert feedback.apply_batch(params, paths, "b", LOGICAL)["status"] == "applied"
    assert seen == [True, True]


def test_a_stale_validation_is_caught_under_the_lock(params, paths, fp):
    """Batch b is validated against the store before another run applies batch a holding the
    same event; b's apply (a later lock holder) sees a and quarantines b."""
    shared = ("1", "3", T0, 4.0)
    rows(shared, ("2", "1", T0 + 1, 3.0)).to_parquet(fp.incoming / "a.parquet", index=False)
    rows(shared, ("3", "2", T0 + 2, 5.0)).to_parquet(fp.incoming / "b.parquet", index=False)
    for b in ("a", "b"):
        assert feedback.validate_batch(params, paths, b, LOGICAL)["status"] == "valid"
    assert feedback.apply_batches(params, paths, ["a"], LOGICAL)["applied"] == ["a"]  # "run 1"
    out = feedback.apply_batches(params, paths, ["b"], LOGICAL)  # "run 2", validated earlier
    assert [r["status"] for r in out["batches"]] == ["quarantined"]
    assert store_rows(paths) == 2 and store_events_unique(paths)


def _cli(root: Path, override: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, "-m", "genre_tasks.cli", "--root", str(root), "--params",
           str(root / "params.yaml"), "--override", str(override), "feedback", "run",
           "--logical-date", LOGICAL, "--no-prequential", "--no-dvc"]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_concurrent_runs_apply_overlapping_events_once(params, paths, tmp_path):
    """Two `genre feedback run` processes at once, each with its own landing folder, whose
    batches share events: every event ends up in the store once."""
    root = paths.root
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shared = [(str(u), str(1 + u % 5), T0 + u, 4.0) for u in range(1, 41)]
    own1 = [(str(u), "1", T0 + 1000 + u, 3.0) for u in range(1, 11)]
    own2 = [(str(u), "2", T0 + 2000 + u, 5.0) for u in range(1, 11)]
    for n, events in ((1, shared + own1), (2, shared + own2)):
        incoming = root / f"data/feedback/in{n}"
        incoming.mkdir(parents=True)
        rows(*events).to_parquet(incoming / f"run{n}.parquet", index=False)
        (tmp_path / f"o{n}.yaml").write_text(yaml.safe_dump(
            {"feedback": {"incoming": f"data/feedback/in{n}", "workdir": f"data/feedback/w{n}"}}))
    before = store_rows(paths)
    procs = [_cli(root, tmp_path / f"o{n}.yaml") for n in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    statuses = [json.loads(o)["batches"] for o, _ in outs]
    after = store_rows(paths)
    print(f"\nconcurrent feedback runs: store rows before {before}, after {after}; "
          f"batches {statuses}")
    applied = [s for st in statuses for s in st.values()]
    assert sorted(applied) == ["applied", "quarantined"], statuses
    assert before == 0 and after == len(shared) + 10 and store_events_unique(paths)


# --- what the landing folder may hold ----------------------------------------------------------
def test_symlinks_fifos_and_hidden_files_are_refused_or_reported(params, paths, fp, tmp_path):
    secret = tmp_path / "outside" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text("user_id,item_id,timestamp,rating\nTOP-SECRET,1,1700000000,4\n")
    valid_outside = tmp_path / "outside" / "valid.parquet"
    rows(("1", "3", T0, 4.0)).to_parquet(valid_outside, index=False)
    (fp.incoming / "etc.csv").symlink_to(secret)
    (fp.incoming / "good-elsewhere.parquet").symlink_to(valid_outside)
    (fp.incoming / "dangling.csv").symlink_to(tmp_path / "nowhere.csv")
    os.mkfifo(fp.incoming / "pipe.csv")
    (fp.incoming / "folder.csv").mkdir()
    rows(("2", "3", T0, 4.0)).to_parquet(fp.incoming / ".hidden.parquet", index=False)
    (fp.incoming / "notes.txt").write_text("hello")
    rows(("3", "3", T0, 4.0)).to_parquet(fp.incoming / "ok.parquet", index=False)

    started = time.perf_counter()
    out = feedback.run(params, paths, LOGICAL)
    assert time.perf_counter() - started < 60  # the fifo was not waited on
    assert out["applied"] == ["ok"] and out["batches"] == {"ok": "applied"}
    assert set(out["refused"]) == {"etc.csv", "good-elsewhere.parquet", "dangling.csv",
                                   "pipe.csv", "folder.csv"}
    assert "symlink" in out["refused"]["etc.csv"] and "fifo" in out["refused"]["pipe.csv"]
    assert set(out["not_processed"]) == {".hidden.parquet", "notes.txt"}
    assert "hidden file" in out["not_processed"][".hidden.parquet"]
    assert sorted(p.name for p in fp.incoming.iterdir()) == [".hidden.parquet", "notes.txt"]
    link = fp.quarantine / "etc.csv" / "etc.csv"
    assert link.is_symlink() and os.readlink(link) == str(secret)  # moved, not followed
    assert "regular file" in (fp.quarantine / "etc.csv" / "message.txt").read_text()
    for f in fp.quarantine.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert b"TOP-SECRET" not in f.read_bytes(), f
    assert secret.read_text().startswith("user_id") and valid_outside.exists()
    assert store_rows(paths) == 1 and set(adapters.read_ledger(paths.source)) == {"ok"}


def test_only_hidden_files_are_reported_not_called_no_batch(params, paths, fp, caplog):
    rows(("2", "3", T0, 4.0)).to_parquet(fp.incoming / ".2026-W01.parquet", index=False)
    out = feedback.run(params, paths, LOGICAL)
    assert out["batches"] == {} and list(out["not_processed"]) == [".2026-W01.parquet"]
    assert ".2026-W01.parquet: hidden file" in caplog.text
    assert "1 other entr(ies) reported" in caplog.text


# --- limits -------------------------------------------------------------------------------------
def test_per_batch_row_and_byte_limits_quarantine_with_a_reason(params, paths, fp):
    params["feedback"].update({"max_batch_rows": 100, "max_batch_bytes": 4000})
    big = pd.concat([rows(("1", "3", T0, 4.0))] * 5000, ignore_index=True)  # tiny file
    big.to_parquet(fp.incoming / "many-rows.parquet", index=False)
    assert (fp.incoming / "many-rows.parquet").stat().st_size < 4000
    csv_rows = rows(*[(str(u), "3", T0 + u, 4.0) for u in range(300)])
    csv_rows.to_csv(fp.incoming / "many-bytes.csv", index=False)
    assert (fp.incoming / "many-bytes.csv").stat().st_size > 4000
    params2 = {**params, "feedback": {**params["feedback"], "max_batch_bytes": 10**6}}
    csv_rows.to_csv(fp.incoming / "many-csv-rows.csv", index=False)
    out = feedback.run(params, paths, LOGICAL)
    assert set(out["quarantined"]) == {"many-rows", "many-bytes", "many-csv-rows"}
    msg = (fp.quarantine / "many-rows" / "message.txt").read_text()
    assert "5,000 rows is over the per-batch limit feedback.max_batch_rows = 100" in msg
    msg = (fp.quarantine / "many-bytes" / "message.txt").read_text()
    assert "bytes is over the per-batch limit feedback.max_batch_bytes = 4,000" in msg
    csv_rows.to_csv(fp.incoming / "many-csv-rows.csv", index=False)
    out = feedback.run(params2, paths, LOGICAL)
    assert out["quarantined"] == ["many-csv-rows"]
    assert "max_batch_rows = 100" in (fp.quarantine / "many-csv-rows" / "message.txt").read_text()
    assert store_rows(paths) == 0


@pytest.mark.parametrize("section,error", [({"max_batch_rows": 0}, "max_batch_rows"),
                                           ({"max_batch_bytes": -1}, "max_batch_bytes")])
def test_limit_params_are_checked(params, section, error):
    from genre_tasks.config import ParamsError

    with pytest.raises(ParamsError, match=error):
        feedback.settings({**params, "feedback": section})


# --- encoding -------------------------------------------------------------------------------------
def test_non_utf8_byte_in_a_batch_is_refused_at_its_line(params, paths, fp):
    """Issue 9: a non-UTF-8 byte used to be applied as user 'u\\ufffd3'."""
    (fp.incoming / "w1.csv").write_bytes(b"user_id,item_id,timestamp,rating\n"
                                         b"1,3,1700000000,4\nu\xff3,1,1700000060,2\n")
    out = feedback.run(params, paths, LOGICAL)
    assert out["quarantined"] == ["w1"] and store_rows(paths) == 0
    msg = (fp.quarantine / "w1" / "message.txt").read_text()
    print("\n" + msg)
    assert "data/feedback/incoming/w1.csv line 3, column user_id: b'u\\xff3'" in msg
    assert "valid UTF-8" in msg


def test_replacement_character_in_a_parquet_batch_is_refused_with_its_row(params, paths, fp):
    rows(("1", "3", T0, 4.0), ("u\ufffd3", "1", T0 + 60, 2.0)).to_parquet(
        fp.incoming / "w2.parquet", index=False)
    out = feedback.run(params, paths, LOGICAL)
    assert out["quarantined"] == ["w2"] and store_rows(paths) == 0
    msg = (fp.quarantine / "w2" / "message.txt").read_text()
    assert "user_id is valid UTF-8 (no U+FFFD" in msg
    assert "data/feedback/incoming/w2.parquet row 2: user_id='u\\ufffd3'" in msg, msg


def quarantined_message(params, paths, fp, name: str, content: str) -> str:
    """Drop ``content`` as landing-folder file ``name``, run; it must be quarantined alone."""
    (fp.incoming / name).write_text(content)
    out = feedback.run(params, paths, LOGICAL)
    assert out["quarantined"] == [Path(name).stem] and store_rows(paths) == 0
    return (fp.quarantine / Path(name).stem / "message.txt").read_text()


def test_unparseable_batch_values_are_refused_with_line_and_column(params, paths, fp):
    msg = quarantined_message(params, paths, fp, "w3.csv", "user_id,item_id,timestamp,rating\n"
                              "1,3,1700000000,five\n2,3,yesterday,4\n")
    assert "w3.csv line 2, column rating: 'five' - rule: rating is a number" in msg
    assert "w3.csv line 3, column timestamp: 'yesterday'" in msg


def test_validation_samples_point_at_batch_lines(params, paths, fp):
    """A GX rule's sample rows name the batch file's own lines (a blank line is skipped)."""
    msg = quarantined_message(params, paths, fp, "w4.csv", "user_id,item_id,timestamp,rating\n\n"
                              "1,3,1700000000,4\n2,3,1700000001,11\n")
    assert "data/feedback/incoming/w4.csv line 4: " in msg and "rating=11.0" in msg, msg
