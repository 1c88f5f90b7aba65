"""Tests of the validate stage: tiny canonical tables written to parquet under tmp_path."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from genre_tasks import config
from genre_tasks.errors import DataValidationError
from genre_tasks.schema import INTERACTION_DTYPES, Paths
from genre_tasks.data.validate import failure_path, main, run
from genre_tasks.data.validate_params import ValidateParams

REPO = Path(__file__).resolve().parents[1]
VOCAB = ("unknown", "Action", "Animation", "Comedy", "Drama")
PARAMS = ValidateParams(genre_vocabulary=VOCAB, sample_rows=3)


def good_items() -> pd.DataFrame:
    """Three items; item "3" has no interactions (so editing it never breaks other rules)."""
    return pd.DataFrame({
        "item_id": ["1", "2", "3"],
        "title": ["Toy Story", "GoldenEye", "Four Rooms"],
        "text": ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)"],
        "genres": [["Animation", "Comedy"], ["Action"], []],
        "year": ["1995", "1995", "1995"],
    })


def good_interactions() -> pd.DataFrame:
    """Six MovieLens-like events (ratings, no labels, no impressions) on items 1 and 2."""
    return pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u2", "u3", "u3"],
        "item_id": ["1", "2", "1", "2", "1", "2"],
        "timestamp": [881250949, 891717742, 878887116, 880606923, 886397596, 884182806],
        "rating": [3.0, 5.0, 1.0, 4.0, 2.0, 5.0],
        "label": [None] * 6,
        "impression_id": [None] * 6,
    }).astype(INTERACTION_DTYPES)


def write(root: Path, items: pd.DataFrame, interactions: pd.DataFrame) -> Paths:
    paths = Paths(root)
    paths.raw_items.parent.mkdir(parents=True, exist_ok=True)
    items.to_parquet(paths.raw_items, index=False)
    interactions.to_parquet(paths.raw_interactions, index=False)
    return paths


def outputs(paths: Paths) -> dict[str, bool]:
    return {
        "summary": paths.validation_summary.exists(),
        "docs": (paths.validation_dir / "docs" / "index.html").exists(),
        "metrics": paths.metrics("validate").exists(),
    }


def test_good_dataset_passes_and_writes_outputs(tmp_path: Path) -> None:
    paths = write(tmp_path, good_items(), good_interactions())
    summary = run(PARAMS, paths)
    assert summary["success"] is True
    assert outputs(paths) == {"summary": True, "docs": True, "metrics": True}
    assert not failure_path(paths).exists()

    written = json.loads(paths.validation_summary.read_text())
    assert written["success"] is True
    items, inter = written["tables"]["items"], written["tables"]["interactions"]
    assert (items["rows"], inter["rows"]) == (3, 6)
    assert items["path"] == "data/raw/items.parquet"
    n_items = len(items["expectations"])
    assert items["evaluated_expectations"] == items["successful_expectations"] == n_items
    rules = {e["rule"] for t in (items, inter) for e in t["expectations"]}
    assert {"item ids are unique", "item_id exists in items", "label is 0 or 1",
            "title is valid UTF-8 (no U+FFFD replacement character)"} <= rules
    assert any(r.startswith("genre is in the vocabulary") for r in rules)
    assert any(r.startswith("events are unique") for r in rules)
    metrics = json.loads(paths.metrics("validate").read_text())
    assert metrics == {"success": True, "items_rows": 3, "interactions_rows": 6,
                       "expectations_evaluated": written["evaluated_expectations"],
                       "expectations_successful": written["evaluated_expectations"]}
    html = (paths.validation_dir / "docs" / "index.html").read_text()
    assert "interactions" in html and "items" in html


def test_main_reads_params_yaml_section(tmp_path: Path) -> None:
    """The real params.yaml section (MovieLens vocabulary) accepts a MovieLens-like dataset;
    label-only (MIND-like) interactions are accepted too."""
    params = config.load_params(REPO / "params.yaml")
    inter = good_interactions().assign(rating=pd.array([None] * 6, dtype="float64"),
                                       label=pd.array([1, 0, 0, 1, 1, 0], dtype="Int8"),
                                       impression_id=pd.array(["i1"] * 6, dtype="string"))
    paths = write(tmp_path, good_items(), inter)
    summary = main(params, paths)
    written = json.loads(paths.validation_summary.read_text())
    assert summary["success"] and written["params"]["genre_vocabulary"][0] == "unknown"


def _set(frame: str, row: int, col: str, value) -> Callable:
    def edit(items: pd.DataFrame, inter: pd.DataFrame) -> None:
        df = items if frame == "items" else inter
        df.at[row, col] = value
    return edit


def _duplicate_item(items: pd.DataFrame, inter: pd.DataFrame) -> None:
    items.at[2, "item_id"] = "2"


def _bad_genre(items: pd.DataFrame, inter: pd.DataFrame) -> None:
    items.at[1, "genres"] = ["Action", "Space-Opera"]


def _duplicate_event(items: pd.DataFrame, inter: pd.DataFrame) -> None:
    inter.loc[6] = inter.loc[3]


def _no_feedback(items: pd.DataFrame, inter: pd.DataFrame) -> None:
    inter.at[2, "rating"] = float("nan")


YEAR_2150 = int(dt.datetime(2150, 6, 1, tzinfo=dt.timezone.utc).timestamp())

# (case id, edit of the good tables, table, rule words, column, text(s) in the message)
BAD_CASES = [
    ("unknown-item", _set("inter", 2, "item_id", "999"),
     "interactions", "item_id exists in items", "item_id",
     ["row 2: user_id='u2', item_id='999'"]),
    ("duplicate-item-id", _duplicate_item,
     "items", "item ids are unique", "item_id",
     ["row 1: item_id='2'", "row 2: item_id='2'"]),
    ("rating-11", _set("inter", 4, "rating", 11.0),
     "interactions", "rating is between 0 and 5", "rating",
     ["row 4:", "rating=11.0"]),
    ("null-user-id", _set("inter", 1, "user_id", None),
     "interactions", "value is not null", "user_id",
     ["row 1: user_id=None"]),
    ("empty-title", _set("items", 1, "title", ""),
     "items", "title is not empty or blank", "title",
     ["row 1: item_id='2', title=''"]),
    ("blank-title", _set("items", 1, "title", "   "),
     "items", "title is not empty or blank", "title",
     ["row 1:"]),
    ("non-utf8-text", _set("items", 0, "text", "Toy Story \ufffd(1995)"),
     "items", "text is valid UTF-8 (no U+FFFD", "text",
     ["row 0:", "\\ufffd"]),
    ("genre-outside-vocabulary", _bad_genre,
     "items", "genre is in the vocabulary", "genres",
     ["row 1: item_id='2', genres=['Action', 'Space-Opera']",
      "unexpected values (sample): 'Space-Opera'"]),
    ("duplicate-event", _duplicate_event,
     "interactions", "events are unique on (user_id, item_id, timestamp, impression_id)",
     "user_id, item_id, timestamp, impression_id",
     ["row 3:", "row 6:"]),
    ("timestamp-2150", _set("inter", 5, "timestamp", YEAR_2150),
     "interactions", "timestamp is between 1990-01-01 and 2030-01-01", "timestamp",
     ["row 5:", f"timestamp={YEAR_2150} (2150-06-01 00:00:00 UTC)"]),
    ("no-rating-no-label", _no_feedback,
     "interactions", "each row has a rating or a label", "rating, label",
     ["row 2:"]),
    ("label-2", _set("inter", 0, "label", 2),
     "interactions", "label is 0 or 1", "label",
     ["row 0:"]),
]


@pytest.mark.parametrize("edit,table,rule,column,rows",
                         [pytest.param(*c[1:], id=c[0]) for c in BAD_CASES])
def test_bad_row_is_rejected(tmp_path: Path, edit: Callable, table: str, rule: str, column: str,
                             rows: list[str]) -> None:
    items, inter = good_items(), good_interactions()
    edit(items, inter)
    paths = write(tmp_path, items, inter)
    with pytest.raises(DataValidationError) as info:
        run(PARAMS, paths)
    msg = str(info.value)
    path = f"data/raw/{table}.parquet"
    assert f"table {table} ({path}" in msg
    assert f"FAILED column {column}: {rule}" in msg
    assert " unexpected of " in msg
    for marker in rows:
        assert marker in msg, marker
    assert outputs(paths) == {"summary": False, "docs": False, "metrics": False}
    assert msg.endswith("full report: data/validation/failure.json")
    report = json.loads(failure_path(paths).read_text())
    assert report["success"] is False and report["tables"][table]["success"] is False
    failed = [e for e in report["tables"][table]["expectations"] if not e["success"]]
    assert any(rule in e["rule"] and e["samples"] for e in failed)
    assert info.value.report["success"] is False


def test_missing_column_is_reported_and_dependents_skipped(tmp_path: Path) -> None:
    paths = write(tmp_path, good_items().drop(columns=["text"]), good_interactions())
    with pytest.raises(DataValidationError) as info:
        run(PARAMS, paths)
    msg = str(info.value)
    assert "table items (data/raw/items.parquet, 3 rows): 1 of" in msg
    assert "FAILED column text: column exists [expect_column_to_exist]" in msg
    assert "skipped: text is valid UTF-8 (no U+FFFD replacement character) (column text): " \
           "column text is missing" in msg
    assert "table interactions (data/raw/interactions.parquet, 6 rows): all" in msg
    assert outputs(paths) == {"summary": False, "docs": False, "metrics": False}


def test_missing_rating_and_label_is_one_failed_rule(tmp_path: Path) -> None:
    paths = write(tmp_path, good_items(), good_interactions().drop(columns=["rating", "label"]))
    expected = r"FAILED column rating: column exists \(at least one of rating / label\)"
    with pytest.raises(DataValidationError, match=expected):
        run(PARAMS, paths)


@pytest.mark.parametrize("which", ["items", "interactions"])
def test_empty_table_is_rejected(tmp_path: Path, which: str) -> None:
    items, inter = good_items(), good_interactions()
    if which == "items":
        items = items.iloc[0:0]
    else:
        inter = inter.iloc[0:0]
    paths = write(tmp_path, items, inter)
    with pytest.raises(DataValidationError) as info:
        run(PARAMS, paths)
    msg = str(info.value)
    assert f"table {which} (data/raw/{which}.parquet, 0 rows)" in msg
    assert "FAILED table: table has at least 1 row" in msg and "observed: 0" in msg
    assert outputs(paths) == {"summary": False, "docs": False, "metrics": False}


def test_wrong_dtype_is_rejected(tmp_path: Path) -> None:
    inter = good_interactions().assign(timestamp=lambda d: d["timestamp"].astype(str))
    paths = write(tmp_path, good_items(), inter)
    with pytest.raises(DataValidationError) as info:
        run(PARAMS, paths)
    msg = str(info.value)
    assert "FAILED column timestamp: column type is int64" in msg
    assert "observed: 'string'" in msg or "observed: 'str'" in msg


def test_stale_summary_is_removed_when_a_later_validation_fails(tmp_path: Path) -> None:
    paths = write(tmp_path, good_items(), good_interactions())
    run(PARAMS, paths)
    assert paths.validation_summary.exists()
    inter = good_interactions()
    inter.at[0, "item_id"] = "404"
    write(tmp_path, good_items(), inter)
    with pytest.raises(DataValidationError, match="row 0"):
        run(PARAMS, paths)
    assert not paths.validation_summary.exists()
    assert failure_path(paths).exists()
    # fixed data: validation passes again and the failure report is gone
    write(tmp_path, good_items(), good_interactions())
    run(PARAMS, paths)
    assert paths.validation_summary.exists() and not failure_path(paths).exists()


def test_missing_input_file(tmp_path: Path) -> None:
    paths = write(tmp_path, good_items(), good_interactions())
    paths.raw_interactions.unlink()
    expected = r"interactions \(data/raw/interactions.parquet\): file not found"
    with pytest.raises(DataValidationError, match=expected):
        run(PARAMS, paths)


def test_sample_rows_limit(tmp_path: Path) -> None:
    inter = good_interactions().assign(rating=[9.0] * 6)
    paths = write(tmp_path, good_items(), inter)
    with pytest.raises(DataValidationError) as info:
        run(ValidateParams(sample_rows=2), paths)
    msg = str(info.value)
    assert "6 unexpected of 6 rows" in msg
    assert "row 0:" in msg and "row 1:" in msg and "row 2:" not in msg


@pytest.mark.parametrize("section,error", [
    ({"rating_min": 5.0, "rating_max": 1.0}, "rating_min"),
    ({"timestamp_min": "yesterday"}, "not an ISO date"),
    ({"timestamp_min": "2030-01-01", "timestamp_max": "1990-01-01"}, "after"),
    ({"text_min_chars": 10, "text_max_chars": 5}, "text_min_chars"),
    ({"sample_rows": 0}, "sample_rows"),
    ({"genre_vocabulary": []}, "genre_vocabulary"),
    ({"colour": "red"}, "unknown key"),
])
def test_bad_params_are_rejected(section: dict, error: str) -> None:
    with pytest.raises(config.ParamsError, match=error):
        config.section(ValidateParams, "validate", {"validate": section})


def test_params_yaml_section_loads() -> None:
    p = config.section(ValidateParams, "validate", config.load_params(REPO / "params.yaml"))
    assert p.timestamp_bounds() == (631152000, 1893456000)
    assert isinstance(p.genre_vocabulary, tuple) and "Sci-Fi" in p.genre_vocabulary


def test_null_timestamp_is_reported_by_row(tmp_path: Path) -> None:
    """ingest keeps a timestamp column with unparseable values as nullable Int64."""
    inter = good_interactions().astype({"timestamp": "Int64"})
    inter.at[3, "timestamp"] = pd.NA
    paths = write(tmp_path, good_items(), inter)
    with pytest.raises(DataValidationError) as info:
        run(PARAMS, paths)
    msg = str(info.value)
    assert "FAILED column timestamp: value is not null" in msg and "row 3:" in msg
    assert "column type" not in msg
