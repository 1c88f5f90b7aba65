"""Replay of real future interactions as weekly feedback batches (tiny synthetic MovieLens
files spanning five ISO weeks; the real MovieLens-100k run is marked slow)."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ML_ITEM, ROOT, write_movielens

from genre_tasks.data import adapters
from genre_tasks import feedback
from genre_tasks.data import ingest
from genre_tasks.feedback import replay
from genre_tasks import schema as S
from genre_tasks.config import from_dict
from genre_tasks.errors import StageError

LOGICAL = "2026-01-05T00:00:00+00:00"
MON_W08 = int(dt.datetime(1998, 2, 16, tzinfo=dt.timezone.utc).timestamp())  # Monday of 1998-W08
CUTOFF = "1998-03-02"  # Monday of 1998-W10
DAY = 86_400


def inter_file(n: int = 60, seed: int = 0) -> tuple[str, pd.DataFrame]:
    """``n`` ratings over 5 weeks (W08..W12) in shuffled file order, unique timestamps."""
    rng = np.random.default_rng(seed)
    ts = MON_W08 + np.sort(rng.choice(35 * DAY, size=n, replace=False))
    df = pd.DataFrame({"user_id": rng.integers(1, 7, n), "item_id": rng.integers(1, 6, n),
                       "rating": rng.integers(1, 6, n), "timestamp": ts})
    df = df.iloc[rng.permutation(n)].reset_index(drop=True)
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{r.user_id}\t{r.item_id}\t{r.rating}\t{r.timestamp}\n" for r in df.itertuples())
    return text, df


@pytest.fixture
def project(tmp_path):
    paths = S.Paths(tmp_path / "project")
    text, df = inter_file()
    write_movielens(paths.source, ML_ITEM, text)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] = {**params["ingest"], "adapter": "movielens-100k", "max_users": None,
                        "until": CUTOFF}
    params["feedback"] = {"prequential": False, "dvc": False}
    return params, paths, df


def canon_sorted(df: pd.DataFrame) -> pd.DataFrame:
    df = adapters.canonical_interactions(df)
    return df.sort_values([S.TIMESTAMP, S.USER_ID, S.ITEM_ID]).reset_index(drop=True)


def test_week_ids_sort_in_time_order():
    assert replay.week_id(MON_W08) == "1998-W08"
    assert replay.week_id(MON_W08 - 1) == "1998-W07"  # Sunday 23:59:59
    assert replay.week_id(int(dt.datetime(1998, 12, 31, tzinfo=dt.timezone.utc).timestamp())) == "1998-W53"
    assert replay.week_id(int(dt.datetime(1999, 1, 4, tzinfo=dt.timezone.utc).timestamp())) == "1999-W01"


def test_init_cuts_weekly_batches_that_complete_the_initial_store(project):
    params, paths, full = project
    out = replay.init(params, paths)
    assert out["initialised"] and out["pending"] == ["1998-W10", "1998-W11", "1998-W12"]
    rp = replay.ReplayPaths(feedback.FeedbackPaths(paths))
    batches = [adapters.read_part(rp.pending / f"{b}.parquet") for b in out["pending"]]
    # each batch is one ISO week, batches follow each other in time, source order kept inside
    for b, df in zip(out["pending"], batches):
        assert {replay.week_id(t) for t in df[S.TIMESTAMP]} == {b}
        assert dict(df.dtypes.astype(str)) == S.INTERACTION_DTYPES
        pos = {int(t): i for i, t in enumerate(full[S.TIMESTAMP])}  # timestamps are unique
        order = pd.Series([pos[int(t)] for t in df[S.TIMESTAMP]])
        assert order.is_monotonic_increasing
    assert all(a[S.TIMESTAMP].max() < b[S.TIMESTAMP].min() for a, b in zip(batches, batches[1:]))
    # the initial store (ingest.until) + the batches = the full data set, nothing more or less
    p = from_dict(ingest.IngestParams, params["ingest"], "ingest")
    _, initial = adapters.load(p, paths.source)
    assert (initial[S.TIMESTAMP] < p.until_timestamp()).all()
    assert out["initial_rows"] == len(initial) and out["total_rows"] == len(full)
    pd.testing.assert_frame_equal(canon_sorted(pd.concat([initial, *batches])), canon_sorted(full))
    # idempotent
    again = replay.init(params, paths)
    assert not again["initialised"] and again["pending"] == out["pending"]


def test_init_needs_the_cutoff_to_be_ingest_until(project):
    params, paths, _ = project
    with pytest.raises(StageError, match='ingest.until: "1998-03-09"'):
        replay.init(params, paths, cutoff="1998-03-09")
    params["ingest"]["until"] = None
    with pytest.raises(StageError, match="Set `ingest.until`"):
        replay.init(params, paths)


def test_next_releases_batches_in_order_and_the_loop_applies_them(project):
    params, paths, full = project
    replay.init(params, paths)
    fp = feedback.FeedbackPaths(paths)
    p = from_dict(ingest.IngestParams, params["ingest"], "ingest")
    n_initial = len(adapters.load(p, paths.source)[1])
    released = []
    for _ in range(3):
        out = replay.next_batch(params, paths)
        released.append(out["released_now"])
        assert [b.batch_id for b in feedback.list_batches(fp)] == [out["released_now"]]
        run = feedback.run(params, paths, LOGICAL)
        assert run["applied"] == [out["released_now"]]
    assert released == ["1998-W10", "1998-W11", "1998-W12"]
    done = replay.next_batch(params, paths)
    assert done["released_now"] is None and done["pending"] == []
    summary = ingest.run(p, paths)
    assert summary["n_interactions"] == len(full) > n_initial
    assert summary["feedback_batches"] == released
    # the base rows after ingest.until are not input (the replay re-released them as batches):
    # validation sees each event once and passes
    assert summary["slice"]["dropped_by_until"] == len(full) - n_initial
    assert summary["slice"]["rows_kept"] == len(full) and not paths.raw_input_interactions.exists()
    from genre_tasks.data.validate_params import ValidateParams
    from genre_tasks.data.validate import run as validate_run

    checked = validate_run(from_dict(ValidateParams, params["validate"], "validate"), paths, p)
    assert checked["success"], checked
    # a new --init with another cutoff needs --reset, which restores the base-only store
    params["ingest"]["until"] = "1998-03-09"
    with pytest.raises(StageError, match="--reset"):
        replay.init(params, paths, cutoff="1998-03-09")
    out = replay.init(params, paths, cutoff="1998-03-09", reset=True)
    assert out["pending"] == ["1998-W11", "1998-W12"] and adapters.read_ledger(paths.source) == {}


def test_corrupt_batch_is_quarantined_and_the_real_batch_stays_pending(project, capsys):
    params, paths, _ = project
    params_file = paths.root / "params.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(params))
    base = ["--root", str(paths.root), "--params", str(params_file), "replay"]
    assert feedback.feedback_cli([*base, "--init"]) == 0
    capsys.readouterr()
    assert feedback.feedback_cli([*base, "--next", "--corrupt"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["released_now"] == "1998-W10-corrupt" and out["pending"][0] == "1998-W10"
    assert len(out["defects"]) == 5
    run = feedback.run(params, paths, LOGICAL)
    assert run["quarantined"] == ["1998-W10-corrupt"] and run["applied"] == []
    fp = feedback.FeedbackPaths(paths)
    message = (fp.quarantine / "1998-W10-corrupt" / "message.txt").read_text()
    for rule in ("rating is between 0 and 5", "item_id exists in items",
                 "not after the run's logical date", "events are unique",
                 "already in the interaction store"):
        assert rule in message, rule
    assert adapters.read_ledger(paths.source) == {}
    assert replay.next_batch(params, paths)["released_now"] == "1998-W10"


@pytest.mark.slow
def test_real_movielens_replay(tmp_path):
    """MovieLens-100k from the recbole wheel with the default cutoff: 78,177 + 8 weekly batches."""
    from genre_tasks.data import source

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] = {**params["ingest"], "adapter": "movielens-100k", "max_users": None,
                        "until": replay.DEFAULT_CUTOFF}
    paths = S.Paths(tmp_path)
    p = from_dict(ingest.IngestParams, params["ingest"], "ingest")
    source.run(p, paths)
    out = replay.init(params, paths)
    assert out["initial_rows"] == 78_177 and out["total_rows"] == 100_000
    assert out["pending"] == [f"1998-W{w}" for w in range(10, 18)]
    assert sum(out["batch_rows"].values()) == 21_823
