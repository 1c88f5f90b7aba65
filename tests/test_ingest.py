"""`source` and `ingest` stages: files on disk, idempotency, the real MovieLens-100k."""
from __future__ import annotations

import importlib.util

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ML_N_INTERACTIONS, ML_N_ITEMS, ML_N_USERS, ROOT, write_mind

from genre_tasks import cli, schema
from genre_tasks.data import ingest
from genre_tasks.data import source
from genre_tasks.errors import StageError
from genre_tasks.schema import Paths


def test_ingest_writes_canonical_parquet(tiny_paths):
    items = pd.read_parquet(tiny_paths.raw_items)
    inter = pd.read_parquet(tiny_paths.raw_interactions)
    assert len(items) == ML_N_ITEMS and len(inter) == ML_N_INTERACTIONS
    assert dict(inter.dtypes.astype(str)) == schema.INTERACTION_DTYPES
    assert items[schema.ITEM_ID].dtype == "string"
    sch = pq.read_schema(tiny_paths.raw_items)
    assert sch.field(schema.GENRES).type == pa.list_(pa.string())
    assert list(items[schema.GENRES][0]) == ["Animation", "Children's", "Comedy"]


def test_ingest_is_idempotent(tiny_paths, make_ingest_params):
    before = (tiny_paths.raw_items.read_bytes(), tiny_paths.raw_interactions.read_bytes())
    summary = ingest.run(make_ingest_params(), tiny_paths)
    assert (tiny_paths.raw_items.read_bytes(), tiny_paths.raw_interactions.read_bytes()) == before
    assert summary["n_items"] == ML_N_ITEMS and summary["n_users"] == ML_N_USERS
    assert summary["n_interactions"] == ML_N_INTERACTIONS
    assert summary["adapter"] == "movielens-100k" and summary["seconds"] >= 0


def test_ingest_empty_tables_keep_the_schema(tmp_path, make_ingest_params):
    paths = Paths(tmp_path)
    write_mind(paths.source, news=[], behaviors=[])
    summary = ingest.run(make_ingest_params(adapter="mind"), paths)
    assert summary["n_items"] == summary["n_interactions"] == summary["n_users"] == 0
    assert pq.read_schema(paths.raw_items).field(schema.GENRES).type == pa.list_(pa.string())
    inter = pd.read_parquet(paths.raw_interactions)
    assert dict(inter.dtypes.astype(str)) == schema.INTERACTION_DTYPES


def test_source_checks_user_files(tmp_path, make_ingest_params):
    paths = Paths(tmp_path)
    with pytest.raises(StageError, match=r"(?s)news\.tsv.*ingest\.mind\.news.*Put your files"):
        source.run(make_ingest_params(adapter="mind"), paths)
    write_mind(paths.source)
    assert source.run(make_ingest_params(adapter="mind"), paths)["copied"] == 0
    with pytest.raises(StageError, match=r"items\.csv"):
        source.run(make_ingest_params(adapter="tabular"), paths)
    with pytest.raises(StageError, match="unknown adapter"):
        source.run(make_ingest_params(adapter="nope"), paths)


def test_source_without_recbole(tmp_path, make_ingest_params, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(StageError, match="recbole.*pip install --no-deps recbole"):
        source.run(make_ingest_params(), Paths(tmp_path))


@pytest.mark.slow
def test_source_copies_movielens_once(tmp_path, make_ingest_params):
    paths = Paths(tmp_path)
    first = source.run(make_ingest_params(), paths)
    assert first["copied"] == 2
    files = [paths.source / "ml-100k" / n for n in ("ml-100k.item", "ml-100k.inter")]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert source.run(make_ingest_params(), paths)["copied"] == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps
    files[0].write_text("tampered\n")
    assert source.run(make_ingest_params(), paths)["copied"] == 1
    assert files[0].read_text().startswith("item_id:token")


@pytest.mark.slow
def test_real_movielens_100k(tmp_path):
    """`genre source` + `genre ingest` through the CLI on the real data (in tmp_path)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] = {**params["ingest"], "adapter": "movielens-100k", "max_users": None}
    cli.run_stage("source", params, tmp_path)
    summary = cli.run_stage("ingest", params, tmp_path)
    counts = (summary["n_items"], summary["n_interactions"], summary["n_users"])
    assert counts == (1682, 100_000, 943)
    inter = pd.read_parquet(Paths(tmp_path).raw_interactions)
    assert inter[schema.RATING].between(1, 5).all()
    assert inter[schema.TIMESTAMP].between(874_000_000, 894_000_000).all()  # Sep 1997 - Apr 1998
