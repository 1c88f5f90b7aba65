"""Source adapters -> canonical tables (tiny fixtures written by conftest)."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import (MIND_BEHAVIORS, MIND_NEWS, ML_INTER, ML_ITEM, ML_N_INTERACTIONS, ML_N_ITEMS,
                      tabular_frames, write_mind, write_movielens, write_tabular)

from genre_tasks import schema
from genre_tasks.data import adapters
from genre_tasks.data.adapters import to_timestamp
from genre_tasks.config import ParamsError
from genre_tasks.errors import StageError

U1_FIRST = 1573768800  # 11/14/2019 10:00:00 PM UTC (U1's earliest impression)
T1 = 1573808122  # 11/15/2019 8:55:22 AM UTC
T2 = 1573808400  # 11/15/2019 9:00:00 AM UTC


def assert_canonical(items: pd.DataFrame, interactions: pd.DataFrame) -> None:
    """Exact canonical columns and dtypes (see schema.py)."""
    assert list(items.columns[:4]) == list(schema.ITEM_COLUMNS)
    for c in items.columns:
        if c != schema.GENRES:
            assert items[c].dtype == "string", c
    assert all(isinstance(g, list) and all(isinstance(x, str) for x in g)
               for g in items[schema.GENRES])
    assert dict(interactions.dtypes.astype(str)) == schema.INTERACTION_DTYPES
    assert list(interactions.columns) == list(schema.INTERACTION_COLUMNS)


def sort_frames(items: pd.DataFrame, interactions: pd.DataFrame):
    items = items.sort_values(schema.ITEM_ID).reset_index(drop=True)
    interactions = interactions.sort_values(list(schema.INTERACTION_COLUMNS)).reset_index(drop=True)
    return items, interactions


# ----------------------------------------------------------------------------- movielens
def test_movielens(movielens_source, make_ingest_params):
    items, inter = adapters.load(make_ingest_params(adapter="movielens-100k"), movielens_source)
    assert_canonical(items, inter)
    assert len(items) == ML_N_ITEMS and len(inter) == ML_N_INTERACTIONS
    assert list(items.columns) == [*schema.ITEM_COLUMNS, "year"]
    first = items.iloc[0]
    assert first[schema.ITEM_ID] == "1" and first[schema.TITLE] == "Toy Story"
    assert first[schema.GENRES] == ["Animation", "Children's", "Comedy"]
    assert first[schema.TEXT] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert first["year"] == "1995"
    # source row order, ratings from the file, no label / impression
    assert inter[schema.USER_ID].tolist()[:3] == ["10", "2", "1"]
    assert inter[schema.TIMESTAMP].tolist()[:2] == [881250949, 881250950]
    assert inter[schema.RATING].tolist()[:3] == [4.0, 3.0, 5.0]
    assert inter[schema.LABEL].isna().all() and inter[schema.IMPRESSION_ID].isna().all()


def test_max_users_numeric_order(movielens_source, make_ingest_params):
    items, inter = adapters.load(make_ingest_params(max_users=3), movielens_source)
    assert set(inter[schema.USER_ID]) == {"1", "2", "3"}  # numeric: 10 is the largest
    assert len(items) == ML_N_ITEMS  # items are all kept
    full = adapters.load(make_ingest_params(), movielens_source)[1]
    expected = full[full[schema.USER_ID] != "10"].reset_index(drop=True)
    pd.testing.assert_frame_equal(inter, expected)


def test_max_users_string_order(mind_source, make_ingest_params):
    _, inter = adapters.load(make_ingest_params(adapter="mind", max_users=1), mind_source)
    assert set(inter[schema.USER_ID]) == {"U1"}


# ----------------------------------------------------------------------------- mind
def test_mind(mind_source, make_ingest_params):
    items, inter = adapters.load(make_ingest_params(adapter="mind"), mind_source)
    assert_canonical(items, inter)
    assert list(items.columns) == [*schema.ITEM_COLUMNS, "category", "subcategory", "abstract"]
    assert items[schema.TEXT].tolist() == ["Team wins the cup. A great game.", "Vote today",
                                           'The "ace" serve. Fast, very fast.',
                                           "Cake. Sweet; with cream"]
    assert items[schema.GENRES].tolist() == [["sports"], ["news"], ["sports"], ["lifestyle"]]
    assert items["abstract"].isna().tolist() == [False, True, False, False]

    rows = [tuple(None if pd.isna(v) else v for v in r)
            for r in inter[[schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP, schema.LABEL,
                            schema.IMPRESSION_ID]].itertuples(index=False)]
    h = U1_FIRST - 1  # history precedes all of U1's impressions
    assert rows == [
        ("U1", "N1", h, 1, None), ("U1", "N2", h, 1, None),  # history, once per user
        ("U1", "N3", T1, 1, "1"), ("U1", "N4", T1, 0, "1"),
        ("U2", "N1", T2, 0, "2"), ("U2", "N3", T2, 1, "2"),
        ("U1", "N4", U1_FIRST, 1, "3"),
    ]
    assert inter[schema.RATING].isna().all()


def test_mind_global_history_timestamp(mind_source, make_ingest_params):
    p = make_ingest_params(adapter="mind", mind={"history_timestamp": "global_first_impression"})
    _, inter = adapters.load(p, mind_source)
    hist = inter[inter[schema.IMPRESSION_ID].isna()]
    assert (hist[schema.TIMESTAMP] == U1_FIRST - 1).all() and len(hist) == 2


def test_mind_and_tabular_agree(tmp_path, make_ingest_params):
    """The same items and events as MIND files and as tabular files -> identical tables."""
    m_items, m_inter = adapters.load(make_ingest_params(adapter="mind"),
                                     write_mind(tmp_path / "mind"))
    news = pd.DataFrame(MIND_NEWS, columns=["item_id", "category", "subcategory", "title",
                                            "abstract", "url", "te", "ae"])
    items = news[["item_id", "category", "subcategory", "title", "abstract"]].assign(
        genres=news["category"])
    events = []
    for imp, user, time, history, impressions in MIND_BEHAVIORS:
        for item in history.split():
            if (user, item) not in {(e[0], e[1]) for e in events}:
                events.append((user, item, str(U1_FIRST - 1), "1", ""))  # unix seconds
        for entry in impressions.split():
            item, label = entry.split("-")
            events.append((user, item, time, label, imp))  # MIND date-time strings
    interactions = pd.DataFrame(events, columns=["uid", "item_id", "when", "click", "imp"])
    src = write_tabular(tmp_path / "tab", items, interactions, "items.tsv", "interactions.csv")
    p = make_ingest_params(adapter="tabular", tabular={
        "items": "items.tsv", "text_fields": ["title", "abstract"],
        "columns": {"user_id": "uid", "item_id": "item_id", "timestamp": "when",
                    "rating": None, "label": "click", "impression_id": "imp"}})
    t_items, t_inter = adapters.load(p, src)
    assert_canonical(t_items, t_inter)
    for a, b in zip(sort_frames(m_items, m_inter), sort_frames(t_items, t_inter)):
        pd.testing.assert_frame_equal(a, b)


# ----------------------------------------------------------------------------- tabular
def test_tabular(tabular_source, make_ingest_params):
    items, inter = adapters.load(make_ingest_params(adapter="tabular"), tabular_source)
    assert_canonical(items, inter)
    assert list(items.columns) == [*schema.ITEM_COLUMNS, "year"]
    assert items[schema.GENRES].tolist() == [["Drama", "Comedy"], [], ["Sci-Fi"]]
    assert items[schema.TEXT].tolist() == ["Alpha", "Beta, the sequel", 'Gamma "quoted"']
    assert inter[schema.USER_ID].tolist() == ["u2", "u1", "u1", "u3"]
    # int seconds, ISO with zone, numeric string, naive date-time (= UTC)
    assert inter[schema.TIMESTAMP].tolist() == [1000, T1, T1, T1 + 1]
    assert inter[schema.RATING].tolist() == [4.0, 3.5, 5.0, 1.0]
    assert inter[schema.LABEL].isna().all() and inter[schema.IMPRESSION_ID].isna().all()


def test_tabular_parquet_and_text_column(tmp_path, make_ingest_params):
    items, inter = tabular_frames()
    items = items.assign(genres=[["Drama", "Comedy"], [], ["Sci-Fi"]],
                         blurb=["x", "y", None], item_id=[1, 2, 3])
    inter = inter.assign(timestamp=[1, 2, 3, 4], rating=[4.0, 3.0, None, 1.0],
                         item_id=[1.0, 2.0, 3.0, 1.0])
    src = write_tabular(tmp_path, items, inter, "i.parquet", "e.parquet")
    p = make_ingest_params(adapter="tabular", tabular={
        "items": "i.parquet", "interactions": "e.parquet", "columns": {"text": "blurb"}})
    got_items, got_inter = adapters.load(p, src)
    assert_canonical(got_items, got_inter)
    assert got_items[schema.ITEM_ID].tolist() == ["1", "2", "3"]
    assert got_inter[schema.ITEM_ID].tolist() == ["1", "2", "3", "1"]
    assert got_items[schema.GENRES].tolist() == [["Drama", "Comedy"], [], ["Sci-Fi"]]
    assert got_items[schema.TEXT].tolist()[:2] == ["x", "y"] and pd.isna(got_items[schema.TEXT][2])
    assert "blurb" not in got_items.columns
    assert got_inter[schema.TIMESTAMP].tolist() == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- lenient
@pytest.mark.parametrize("content", ["", "item_id,title,genres\n"], ids=["0-byte", "header-only"])
def test_tabular_empty_items(tmp_path, make_ingest_params, content):
    (tmp_path / "items.csv").write_text(content)
    (tmp_path / "interactions.csv").write_text(content.replace("item_id,title,genres",
                                                               "user_id,item_id,timestamp,rating"))
    items, inter = adapters.load(make_ingest_params(adapter="tabular"), tmp_path)
    assert len(items) == 0 and len(inter) == 0
    assert list(items.columns) == list(schema.ITEM_COLUMNS)
    assert_canonical(items, inter)


def test_movielens_and_mind_empty_files(tmp_path, make_ingest_params):
    write_movielens(tmp_path / "ml", item="", inter=ML_INTER.splitlines(keepends=True)[0])
    items, inter = adapters.load(make_ingest_params(), tmp_path / "ml")
    assert len(items) == 0 and len(inter) == 0
    assert list(items.columns) == [*schema.ITEM_COLUMNS, "year"]
    assert_canonical(items, inter)
    write_mind(tmp_path / "mind", news=[], behaviors=[])
    items, inter = adapters.load(make_ingest_params(adapter="mind"), tmp_path / "mind")
    assert len(items) == 0 and len(inter) == 0
    assert_canonical(items, inter)


def test_missing_mapped_column_is_left_out(tmp_path, make_ingest_params):
    items, inter = tabular_frames()
    src = write_tabular(tmp_path, items.drop(columns=["genres"]), inter.drop(columns=["rating"]))
    got_items, got_inter = adapters.load(make_ingest_params(adapter="tabular"), src)
    assert schema.GENRES not in got_items.columns and schema.RATING not in got_inter.columns
    assert list(got_inter.columns) == [schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP,
                                       schema.LABEL, schema.IMPRESSION_ID]
    assert len(got_inter) == len(inter)
    # a missing text field leaves "text" out; a null mapping gives empty genres instead
    p = make_ingest_params(adapter="tabular", tabular={"text_fields": ["title", "plot"],
                                                       "columns": {"genres": None}})
    got_items, _ = adapters.load(p, src)
    assert schema.TEXT not in got_items.columns
    assert got_items[schema.GENRES].tolist() == [[], [], []]


def refusal(load, match: str) -> str:
    """The message of the InputError ``load()`` raises; it must contain ``match``."""
    with pytest.raises(adapters.InputError) as info:
        load()
    message = str(info.value)
    assert match in message, message
    return message


def test_non_utf8_bytes_are_refused_with_file_line_and_column(tmp_path, make_ingest_params):
    """Issue 9: an undecodable byte is refused where it is, in every adapter (it used to become
    U+FFFD and flow on)."""
    item = ML_ITEM.encode().replace(b"Four Rooms", b"Four R\xf6oms")
    folder = write_movielens(tmp_path) / "ml-100k"
    (folder / "ml-100k.item").write_bytes(item)
    msg = refusal(lambda: adapters.load(make_ingest_params(), tmp_path),
                  "ml-100k.item line 4, column movie_title:token_seq: b'Four R\\xf6oms'")
    assert "valid UTF-8" in msg
    write_mind(tmp_path / "m")
    news = (tmp_path / "m" / "news.tsv").read_bytes().replace(b"Cake", b"C\xe9ke")
    (tmp_path / "m" / "news.tsv").write_bytes(news)
    refusal(lambda: adapters.load(make_ingest_params(adapter="mind"), tmp_path / "m"),
            "news.tsv line 4, column Title: b'C\\xe9ke'")
    write_tabular(tmp_path / "t", *tabular_frames())
    raw = (tmp_path / "t" / "items.csv").read_bytes().replace(b"Alpha", b"Al\x80pha")
    (tmp_path / "t" / "items.csv").write_bytes(raw)
    refusal(lambda: adapters.load(make_ingest_params(adapter="tabular"), tmp_path / "t"),
            "items.csv line 2, column title: b'Al\\x80pha'")
    # a replacement character that is already in (valid UTF-8) text is refused too
    (tmp_path / "t" / "items.csv").write_bytes(raw.replace(b"Al\x80pha", "Al\ufffdpha".encode()))
    refusal(lambda: adapters.load(make_ingest_params(adapter="tabular"), tmp_path / "t"),
            "items.csv line 2, column title: b'Al\\xef\\xbf\\xbdpha' - rule: no U+FFFD")


def test_unparseable_values_are_refused_with_their_line(tmp_path, make_ingest_params):
    """Issue 9: 'five' as a rating, a bad time, a short row: refused, not nulls."""
    inter = ML_INTER.replace("\t4\t881250949", "\tfour\t881250949").replace("881250950", "soon")
    write_movielens(tmp_path, inter=inter)
    msg = refusal(lambda: adapters.load(make_ingest_params(), tmp_path),
                  "ml-100k.inter line 2, column rating:float: 'four' - rule: rating is a number")
    assert "ml-100k.inter line 3, column timestamp:float: 'soon'" in msg and "2 problem(s)" in msg
    write_movielens(tmp_path, inter=ML_INTER + "7\t1\n")
    refusal(lambda: adapters.load(make_ingest_params(), tmp_path),
            "ml-100k.inter line 14: '7\\t1' - rule: a row has 4 tab-separated fields")
    # tabular CSV: the user's column name and line
    items, inter = tabular_frames()
    inter.loc[2, "rating"] = "five"
    write_tabular(tmp_path / "t", items, inter)
    refusal(lambda: adapters.load(make_ingest_params(adapter="tabular"), tmp_path / "t"),
            "interactions.csv line 4, column rating: 'five' - rule: rating is a number")
    inter = tabular_frames()[1].rename(columns={"rating": "stars"})
    inter.loc[0, "timestamp"] = "next tuesday"
    write_tabular(tmp_path / "t", items, inter, interactions_name="interactions.parquet")
    p = make_ingest_params(adapter="tabular", tabular={"interactions": "interactions.parquet",
                                                       "columns": {"rating": "stars"}})
    refusal(lambda: adapters.load(p, tmp_path / "t"),
            "interactions.parquet row 1, column timestamp: 'next tuesday' - rule: timestamp is")


def test_unparseable_values_are_collected_not_refused_under_quarantine(tmp_path,
                                                                      make_ingest_params):
    """Issue 9 (on_bad_rows: quarantine): inside ``collecting_bad_rows`` the rows refused above
    are left out and each problem is handed over (file, line or parquet row, column, raw
    value, rule); the other rows are read as usual. Row-structure faults still refuse."""
    inter = ML_INTER.replace("\t4\t881250949", "\tfour\t881250949").replace("881250950", "soon")
    write_movielens(tmp_path, inter=inter)
    with adapters.collecting_bad_rows() as bad:
        _, got = adapters.load(make_ingest_params(), tmp_path, locations=True)
    assert [(p.line, p.column, p.value) for p in bad] == [
        (2, "rating:float", "four"), (3, "timestamp:float", "soon")]
    assert bad[0].file.endswith("ml-100k.inter") and bad[0].rule == "rating is a number"
    assert len(got) == ML_N_INTERACTIONS - 2 and not {2, 3} & set(got[schema.SOURCE_LINE])
    write_movielens(tmp_path, inter=ML_INTER + "7\t1\n")  # a short row: not a value problem
    with adapters.collecting_bad_rows() as bad:
        refusal(lambda: adapters.load(make_ingest_params(), tmp_path),
                "ml-100k.inter line 14: '7\\t1' - rule: a row has 4 tab-separated fields")
    # tabular parquet: the problem names the parquet row; every bad row is kept (no cap)
    items, inter = tabular_frames()
    inter = inter.rename(columns={"rating": "stars"})
    inter.loc[0, "timestamp"] = "next tuesday"
    write_tabular(tmp_path / "t", items, inter, interactions_name="interactions.parquet")
    p = make_ingest_params(adapter="tabular", tabular={"interactions": "interactions.parquet",
                                                       "columns": {"rating": "stars"}})
    with adapters.collecting_bad_rows() as bad:
        _, got = adapters.load(p, tmp_path / "t")
    assert [(p.line, p.column, p.value) for p in bad] == [(1, "timestamp", "next tuesday")]
    assert len(got) == len(inter) - 1
    big = pd.concat([tabular_frames()[1]] * 300, ignore_index=True)  # > MAX_PROBLEMS bad values
    big["rating"] = "five"
    write_tabular(tmp_path / "big", items, big)
    with adapters.collecting_bad_rows() as bad:
        _, got = adapters.load(make_ingest_params(adapter="tabular"), tmp_path / "big")
    assert len(bad) == len(big) > adapters.MAX_PROBLEMS and got.empty
    # MIND: a bad Time and bad impression entries leave out the whole behaviors line
    behaviors = [*MIND_BEHAVIORS, ("4", "U3", "13/45/2019 8:55:22 AM", "N1", "N1-x N2 N3-1")]
    write_mind(tmp_path / "m", behaviors=behaviors)
    with adapters.collecting_bad_rows() as bad:
        _, got = adapters.load(make_ingest_params(adapter="mind"), tmp_path / "m",
                               locations=True)
    assert sorted((p.line, p.column) for p in bad) == [(4, "Impressions"), (4, "Impressions"),
                                                       (4, "Time")]
    assert 4 not in set(got[schema.SOURCE_LINE])
    write_mind(tmp_path / "m")
    assert len(got) == len(adapters.load(make_ingest_params(adapter="mind"), tmp_path / "m")[1])


def test_mind_short_rows_bad_times_and_entries_are_refused(tmp_path, make_ingest_params):
    """Issue 9: a behaviors row without its impressions column used to be padded with nulls
    (its interactions vanished); a news row missing its last field too."""
    p = make_ingest_params(adapter="mind")
    behaviors = [*MIND_BEHAVIORS, ("4", "U3", "11/15/2019 9:00:00 AM", "N1 N2")]
    write_mind(tmp_path, behaviors=behaviors)
    refusal(lambda: adapters.load(p, tmp_path),
            "behaviors.tsv line 4: '4\\tU3\\t11/15/2019 9:00:00 AM\\tN1 N2' - rule: a row has 5 "
            "tab-separated fields (ImpressionID, UserID, Time, History, Impressions); this one has 4")
    write_mind(tmp_path, news=[*MIND_NEWS, ("N5", "news", "x", "T", "A", "u", "[]")])
    refusal(lambda: adapters.load(p, tmp_path), "news.tsv line 5: ")
    behaviors = [*MIND_BEHAVIORS, ("4", "U3", "13/45/2019 8:55:22 AM", "N1", "N1-x N2 N3-1")]
    write_mind(tmp_path, behaviors=behaviors)
    msg = refusal(lambda: adapters.load(p, tmp_path),
                  "behaviors.tsv line 4, column Time: '13/45/2019 8:55:22 AM' - rule: Time is a")
    assert "behaviors.tsv line 4, column Impressions: 'N1-x'" in msg
    assert "behaviors.tsv line 4, column Impressions: 'N2'" in msg and "3 problem(s)" in msg
    write_mind(tmp_path, behaviors=[*MIND_BEHAVIORS, ("4", "U3", "11/15/2019 9:00:00 AM", "N1", "")])
    refusal(lambda: adapters.load(p, tmp_path), "behaviors.tsv line 4, column Impressions: - rule")


def test_ragged_and_broken_csv(tmp_path, make_ingest_params):
    (tmp_path / "items.csv").write_text("item_id,title,genres\na,Alpha,Drama,extra\nb,Beta\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n")
    msg = refusal(lambda: adapters.load(make_ingest_params(adapter="tabular"), tmp_path),
                  "items.csv line 2: 'a,Alpha,Drama,extra' - rule: a row has 3 comma-separated")
    assert "items.csv line 3: 'b,Beta'" in msg
    (tmp_path / "items.csv").write_text('item_id,title\na,"Alpha\n')  # unclosed quote
    refusal(lambda: adapters.load(make_ingest_params(adapter="tabular"), tmp_path),
            "items.csv line 2: - rule: the file parses as comma-separated values")
    (tmp_path / "items.csv").write_text('item_id,title,title\na,b,c\n')
    refusal(lambda: adapters.load(make_ingest_params(adapter="tabular"), tmp_path),
            "items.csv line 1, column title: 'title' - rule: column names in the header are unique")


def test_locations_point_into_the_users_files(tmp_path, make_ingest_params):
    """load(locations=True) keeps, per row, the user's file and 1-based line (blank lines and
    MIND's exploded entries included)."""
    write_mind(tmp_path)
    text = (tmp_path / "behaviors.tsv").read_text()
    (tmp_path / "behaviors.tsv").write_text("\n" + text)  # a blank first line
    items, inter = adapters.load(make_ingest_params(adapter="mind"), tmp_path, locations=True)
    assert items[schema.SOURCE_LINE].tolist() == [1, 2, 3, 4]
    assert set(items[schema.SOURCE_FILE]) == {str(tmp_path / "news.tsv")}
    u2 = inter[inter[schema.USER_ID] == "U2"]
    assert set(u2[schema.SOURCE_LINE]) == {3}
    assert inter[schema.SOURCE_LINE].tolist() == sorted(inter[schema.SOURCE_LINE])
    plain = adapters.load(make_ingest_params(adapter="mind"), tmp_path)[1]
    assert list(plain.columns) == list(schema.INTERACTION_COLUMNS)


def test_to_timestamp():
    s = pd.Series(["881250949", "881250949.7", "2019-11-15T09:55:22+01:00", "", None, "x"],
                  dtype="string")
    assert to_timestamp(s).tolist() == [881250949, 881250949, T1, pd.NA, pd.NA, pd.NA]


# ----------------------------------------------------------------------------- errors
def test_unknown_adapter(tmp_path, make_ingest_params):
    with pytest.raises(StageError, match="ingest.adapter.*'csv'"):
        adapters.load(make_ingest_params(adapter="csv"), tmp_path)


def test_missing_file_names_path_and_key(tmp_path, make_ingest_params):
    write_mind(tmp_path)
    (tmp_path / "behaviors.tsv").unlink()
    with pytest.raises(StageError, match=r"behaviors\.tsv.*ingest\.mind\.behaviors"):
        adapters.load(make_ingest_params(adapter="mind"), tmp_path)


def test_params_validation(make_ingest_params):
    with pytest.raises(ParamsError, match="max_users"):
        make_ingest_params(max_users=0)
    with pytest.raises(ParamsError, match="history_timestamp"):
        make_ingest_params(mind={"history_timestamp": "never"})
    with pytest.raises(ParamsError, match="unknown key"):
        make_ingest_params(tabular={"columns": {"movie": "x"}})
    p = make_ingest_params()
    assert p.tabular.text_fields == ("title",) and p.tabular.columns.label is None


def test_placeholder_genres_and_title_only_text(tmp_path, make_ingest_params, caplog):
    """Issue 9, item 4 (MovieLens latest-small via tabular): "(no genres listed)" used to
    become a genre, and the text silently defaulted to the title alone."""
    items, inter = tabular_frames()
    items.loc[1, "genres"] = "(no genres listed)"
    items.loc[2, "genres"] = "Sci-Fi|(No Genres Listed)"
    write_tabular(tmp_path, items, inter)
    report: dict = {}
    got, _ = adapters.load(make_ingest_params(adapter="tabular"), tmp_path, report=report)
    assert got[schema.GENRES].tolist() == [["Drama", "Comedy"], [], ["Sci-Fi"]]
    assert report["placeholder_genre_items"] == 2
    assert report["text"] == {"template": "{title} (ingest.tabular.text_fields; blank parts skipped)",
                              "items": 3, "title_only_items": 3}
    assert "the item text is only the title for 3 of 3 item(s)" in caplog.text
    # the convention is a param: an empty list keeps the token as a genre
    p = make_ingest_params(adapter="tabular", no_genre_tokens=[],
                           tabular={"text_fields": ["title", "genres", "year"]})
    caplog.clear()
    got, _ = adapters.load(p, tmp_path, report=report)
    assert got[schema.GENRES][1] == ["(no genres listed)"]
    assert report["text"]["title_only_items"] == 0 and "only the title" not in caplog.text
