"""Shared, generic test fixtures: tiny source files in every supported input format.

Nothing here is real data: every file is written by the fixture into ``tmp_path``.

* ``movielens_source`` / ``mind_source`` / ``tabular_source``: a ``data/source``-style folder
  holding a tiny dataset in that format (use with ``make_ingest_params``).
* ``make_ingest_params(**overrides)``: ``IngestParams`` from params.yaml's ``ingest`` section
  with nested overrides deep-merged, e.g. ``make_ingest_params(adapter="mind", max_users=2)``.
* ``tiny_paths``: a project root (``Paths``) whose ``data/raw`` holds the tiny MovieLens
  fixture already ingested (5 items, 4 users, 12 interactions), for downstream stage tests.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# --- tiny MovieLens-100k (RecBole atomic files) ------------------------------------------
ML_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
    "3\tFour Rooms\t1995\tThriller\n"
    "4\tBlade Runner\t1982\tFilm-Noir Sci-Fi\n"
    "5\tCasablanca\t1942\tDrama Romance War\n"
)
ML_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "10\t1\t4\t881250949\n"
    "2\t3\t3\t881250950\n"
    "1\t2\t5\t881250951\n"
    "3\t4\t2\t881250952\n"
    "10\t5\t1\t881250953\n"
    "1\t1\t4\t881250954\n"
    "2\t4\t5\t881250955\n"
    "3\t5\t3\t881250956\n"
    "1\t5\t4\t881250957\n"
    "2\t2\t2\t881250958\n"
    "10\t3\t5\t881250959\n"
    "3\t1\t1\t881250960\n"
)
ML_N_ITEMS, ML_N_INTERACTIONS, ML_N_USERS = 5, 12, 4

# --- tiny MIND (news.tsv / behaviors.tsv, no headers) --------------------------------------
MIND_NEWS = [
    # NewsID, Category, SubCategory, Title, Abstract, URL, TitleEntities, AbstractEntities
    ("N1", "sports", "football", "Team wins the cup", "A great game.", "https://x/1", "[]", "[]"),
    ("N2", "news", "politics", "Vote today", "", "https://x/2", "[]", "[]"),
    ("N3", "sports", "tennis", 'The "ace" serve', "Fast, very fast.", "https://x/3", "[]", "[]"),
    ("N4", "lifestyle", "food", "Cake", "Sweet; with cream", "https://x/4", "[]", "[]"),
]
MIND_BEHAVIORS = [
    # ImpressionID, UserID, Time, History, Impressions
    ("1", "U1", "11/15/2019 8:55:22 AM", "N1 N2", "N3-1 N4-0"),
    ("2", "U2", "11/15/2019 9:00:00 AM", "", "N1-0 N3-1"),
    ("3", "U1", "11/14/2019 10:00:00 PM", "N1 N2", "N4-1"),
]


def write_movielens(source: Path, item: str = ML_ITEM, inter: str = ML_INTER) -> Path:
    """Write ``ml-100k/ml-100k.item`` + ``.inter`` under ``source``; return ``source``."""
    folder = Path(source) / "ml-100k"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.item").write_text(item, encoding="utf-8")
    (folder / "ml-100k.inter").write_text(inter, encoding="utf-8")
    return Path(source)


def write_mind(source: Path, news=MIND_NEWS, behaviors=MIND_BEHAVIORS) -> Path:
    """Write MIND ``news.tsv`` + ``behaviors.tsv`` (tuples of fields) under ``source``."""
    source = Path(source)
    source.mkdir(parents=True, exist_ok=True)
    (source / "news.tsv").write_text("".join("\t".join(r) + "\n" for r in news), encoding="utf-8")
    (source / "behaviors.tsv").write_text("".join("\t".join(r) + "\n" for r in behaviors),
                                          encoding="utf-8")
    return source


def write_tabular(source: Path, items: pd.DataFrame, interactions: pd.DataFrame,
                  items_name: str = "items.csv", interactions_name: str = "interactions.csv"
                  ) -> Path:
    """Write the two frames under ``source`` in the format their extension names."""
    source = Path(source)
    source.mkdir(parents=True, exist_ok=True)
    for df, name in ((items, items_name), (interactions, interactions_name)):
        path = source / name
        if name.endswith(".parquet"):
            df.to_parquet(path, index=False)
        else:
            df.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
    return source


def tabular_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A tiny tabular dataset in params.yaml's default column names (ratings, datetime strings)."""
    items = pd.DataFrame({
        "item_id": ["a", "b", "c"],
        "title": ["Alpha", "Beta, the sequel", 'Gamma "quoted"'],
        "genres": ["Drama|Comedy", "", "Sci-Fi"],
        "year": ["2001", "2002", "2003"],
    })
    interactions = pd.DataFrame({
        "user_id": ["u2", "u1", "u1", "u3"],
        "item_id": ["a", "b", "c", "a"],
        "timestamp": ["1000", "2019-11-15T08:55:22Z", "1573808122", "2019-11-15 08:55:23"],
        "rating": ["4", "3.5", "5", "1"],
    })
    return items, interactions


@pytest.fixture
def movielens_source(tmp_path: Path) -> Path:
    """A source folder with the tiny MovieLens-100k fixture in ``ml-100k/``."""
    return write_movielens(tmp_path / "source")


@pytest.fixture
def mind_source(tmp_path: Path) -> Path:
    """A source folder with the tiny MIND fixture (``news.tsv``, ``behaviors.tsv``)."""
    return write_mind(tmp_path / "source")


@pytest.fixture
def tabular_source(tmp_path: Path) -> Path:
    """A source folder with ``items.csv`` / ``interactions.csv`` (see :func:`tabular_frames`)."""
    return write_tabular(tmp_path / "source", *tabular_frames())


@pytest.fixture
def make_ingest_params():
    """Factory: ``IngestParams`` from params.yaml ``ingest`` deep-merged with ``overrides``."""
    from genre_tasks import config
    from genre_tasks.data.adapters.params import IngestParams

    base = yaml.safe_load((ROOT / "params.yaml").read_text())["ingest"]

    def make(**overrides) -> IngestParams:
        return config.from_dict(IngestParams, config.deep_merge(base, overrides), "ingest")

    return make


@pytest.fixture
def tiny_paths(tmp_path: Path, make_ingest_params):
    """``Paths`` of a project root whose ``data/raw`` holds the ingested tiny MovieLens set."""
    from genre_tasks.data import ingest
    from genre_tasks.schema import Paths

    paths = Paths(tmp_path / "project")
    write_movielens(paths.source)
    ingest.run(make_ingest_params(adapter="movielens-100k", max_users=None), paths)
    return paths


def pytest_collection_modifyitems(config, items):
    """Tests marked ``integration`` (tests/test_integration.py: the whole production topology,
    ~30 min) run only when the marker expression names them (``pytest -m integration``)."""
    import pytest

    if "integration" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="production-topology run: select it with -m integration (make integration)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)
