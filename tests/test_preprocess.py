"""preprocess stage: labels, the three splits of the evaluation protocol, histories, outputs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.data.preprocess import (
    PreprocessParams,
    SplitParams,
    clean_text,
    k_core,
    preprocess,
    run,
)


def make_raw(n_users: int = 12, n_items: int = 30, per_user: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"i{j}" for j in range(n_items)], dtype="string"),
        S.TITLE: pd.array([f"Item <b>{j}</b>" for j in range(n_items)], dtype="string"),
        S.TEXT: pd.array([f"Item  {j}\t text\x07" for j in range(n_items)], dtype="string"),
        S.GENRES: [["Drama"] if j % 2 else ["Comedy", "Drama"] for j in range(n_items)],
    })
    rows = []
    for u in range(n_users):
        picks = rng.choice(n_items, size=per_user, replace=False)
        for t, j in enumerate(picks):
            rows.append((f"{u}", f"i{j}", 1_000_000 + 100 * t + u, float(rng.integers(1, 6))))
    inter = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING])
    inter = inter.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # file order != time order
    inter[S.USER_ID] = inter[S.USER_ID].astype("string")
    inter[S.ITEM_ID] = inter[S.ITEM_ID].astype("string")
    inter[S.LABEL] = pd.array([pd.NA] * len(inter), dtype="Int8")
    inter[S.IMPRESSION_ID] = pd.array([pd.NA] * len(inter), dtype="string")
    return items, inter


def test_clean_text_strips_tags_controls_and_whitespace():
    assert clean_text("  <i>Toy</i>\tStory\x07 (1995) ", 100) == "Toy Story (1995)"
    assert clean_text("ﬁlm", 100) == "film"  # NFKC
    assert clean_text("abcdef", 3) == "abc"
    assert clean_text(None, 10) == ""


def test_user_temporal_holds_out_each_users_latest_ratings():
    items, inter = make_raw()
    _, out, hist, stats = preprocess(items, inter, PreprocessParams())
    for _, g in out.groupby(S.USER_IDX):
        g = g.sort_values([S.TIMESTAMP, S.ROW])
        # 20 ratings -> last ceil(2) test, previous 2 valid, 16 train, in time order
        assert list(g[S.SPLIT]) == ["train"] * 16 + ["valid"] * 2 + ["test"] * 2
    assert stats["test"]["rows"] == 12 * 2 and stats["test"]["users"] == 12
    # the positive label follows rating >= 4
    assert (out[S.POSITIVE] == (out[S.RATING] >= 4)).all()
    # histories: train positives in time order
    u0 = out[(out[S.USER_IDX] == 0) & (out[S.SPLIT] == "train") & out[S.POSITIVE]]
    assert hist.loc[hist[S.USER_IDX] == 0, "hist_train"].iloc[0] == u0[S.ITEM_IDX].tolist()


def test_user_temporal_small_users_get_at_least_one_test_and_valid():
    items, inter = make_raw(per_user=3)
    _, out, _, _ = preprocess(items, inter, PreprocessParams())
    counts = out.groupby([S.USER_IDX, S.SPLIT]).size().unstack(fill_value=0)
    assert (counts["test"] == 1).all() and (counts["valid"] == 1).all() and (counts["train"] == 1).all()


def test_global_temporal_never_trains_on_the_future():
    items, inter = make_raw()
    p = PreprocessParams(split=SplitParams(mode="global_temporal"))
    _, out, _, stats = preprocess(items, inter, p)
    n = len(out)
    assert stats["train"]["rows"] == round(n * 0.8) and stats["valid"]["rows"] == round(n * 0.1)
    assert out.loc[out[S.SPLIT] == "train", S.TIMESTAMP].max() <= out.loc[out[S.SPLIT] == "valid", S.TIMESTAMP].min()
    assert out.loc[out[S.SPLIT] == "valid", S.TIMESTAMP].max() <= out.loc[out[S.SPLIT] == "test", S.TIMESTAMP].min()


def test_cold_items_are_never_in_training_and_are_seeded():
    items, inter = make_raw(n_items=40)
    p = PreprocessParams(split=SplitParams(mode="cold_items", cold_frac=0.1, seed=7, valid_seed=8))
    items_out, out, hist, stats = preprocess(items, inter, p)
    cold_test = set(items_out.loc[items_out[S.COLD] == "test", S.ITEM_IDX])
    cold_valid = set(items_out.loc[items_out[S.COLD] == "valid", S.ITEM_IDX])
    assert len(cold_test) == stats["cold_test_items"] == 4 and len(cold_valid) == 4
    assert not cold_test & cold_valid
    train_items = set(out.loc[out[S.SPLIT] == "train", S.ITEM_IDX])
    assert not train_items & (cold_test | cold_valid)
    assert set(out.loc[out[S.ITEM_IDX].isin(cold_test), S.SPLIT]) == {"test"}
    assert set(out.loc[out[S.ITEM_IDX].isin(cold_valid), S.SPLIT]) == {"valid"}
    assert not {i for h in hist["hist_train"] for i in h} & (cold_test | cold_valid)
    again = preprocess(items, inter, p)[0]
    assert again[S.COLD].equals(items_out[S.COLD])


def test_k_core_keeps_only_dense_part():
    df = pd.DataFrame({S.USER_ID: ["a", "a", "b", "b", "c"], S.ITEM_ID: ["x", "y", "x", "y", "z"]})
    assert set(k_core(df, 2)[S.USER_ID]) == {"a", "b"}
    assert len(k_core(df, 0)) == 5


def test_label_column_wins_over_rating():
    items, inter = make_raw(n_users=2, per_user=5)
    inter[S.RATING] = np.nan
    inter[S.LABEL] = pd.array([1, 0] * (len(inter) // 2), dtype="Int8")
    _, out, _, _ = preprocess(items, inter, PreprocessParams())
    assert (out[S.POSITIVE] == (out[S.LABEL] == 1)).all()


def test_run_requires_successful_validation_and_writes_outputs(tmp_path):
    paths = S.Paths(tmp_path)
    items, inter = make_raw()
    io.write_parquet(items, paths.raw_items)
    io.write_parquet(inter, paths.raw_interactions)
    with pytest.raises(StageError, match="no successful validation"):
        run(PreprocessParams(), paths)
    assert not paths.items.exists()
    io.write_json({"success": True}, paths.validation_summary)
    summary = run(PreprocessParams(), paths)
    for path in (paths.items, paths.interactions, paths.histories, paths.split_info, paths.metrics("preprocess")):
        assert path.exists(), path
    assert summary["test"]["rows"] == 24
    first = pd.read_parquet(paths.interactions)
    run(PreprocessParams(), paths)  # idempotent
    pd.testing.assert_frame_equal(first, pd.read_parquet(paths.interactions))


@pytest.mark.parametrize("mode", ["user_temporal", "cold_items"])
def test_items_file_does_not_change_when_only_interactions_do(tmp_path, mode):
    """A feedback batch changes interactions, not items: items.parquet (what augment, embed and
    genre depend on) must stay byte-identical, so DVC skips those stages; the split-derived item
    columns go to item_split.parquet, and load_items joins them back."""
    from genre_tasks.models.views import load_items

    paths = S.Paths(tmp_path)
    items, inter = make_raw(n_users=30)
    p = PreprocessParams(split=SplitParams(mode=mode))
    io.write_json({"success": True}, paths.validation_summary)
    hashes = []
    for rows in (inter.iloc[: len(inter) - 60], inter):  # then a "batch" of 60 more interactions
        io.write_parquet(items, paths.raw_items)
        io.write_parquet(rows.reset_index(drop=True), paths.raw_interactions)
        run(p, paths)
        hashes.append((io.file_md5(paths.items), io.file_md5(paths.item_split)))
        written = pd.read_parquet(paths.items)
        assert not set(S.ITEM_SPLIT_COLUMNS) & set(written.columns)
        joined = load_items(paths)
        expected, *_ = preprocess(items, rows.reset_index(drop=True), p)
        for col in (S.ITEM_IDX, *S.ITEM_SPLIT_COLUMNS):
            def plain(values):
                return [None if pd.isna(v) else v for v in values]
            assert plain(joined[col]) == plain(expected[col]), col
    assert hashes[0][0] == hashes[1][0], "items.parquet changed with the interactions"
    assert hashes[0][1] != hashes[1][1], "the popularity counts did change"


def test_text_template_builds_the_encoder_text_from_item_columns():
    from genre_tasks import config
    from genre_tasks.data.adapters.movielens import item_text

    items, inter = make_raw()
    items["year"] = pd.array(["1995" if j % 3 else None for j in range(len(items))], dtype="string")
    default, *_ = preprocess(items, inter, PreprocessParams())
    assert default[S.TEXT].iloc[0] == "Item 0 text"  # null: the adapter's text (cleaned)
    p = PreprocessParams(text_template="{title} ({year}). Genres: {genres}.")
    out, *_ = preprocess(items, inter, p)
    # the MovieLens adapter's own wording, rebuilt from columns (an empty year leaves no "()")
    for j in (0, 1):
        assert out[S.TEXT].iloc[j] == item_text(f"Item {j}", items["year"].iloc[j] if j % 3 else None,
                                                list(items[S.GENRES].iloc[j]))
    assert out[S.TEXT].iloc[0] == "Item 0. Genres: Comedy, Drama."
    other, *_ = preprocess(items, inter, PreprocessParams(text_template="Genres: {genres}. {text}"))
    assert other[S.TEXT].iloc[1] == "Genres: Drama. Item 1 text"
    with pytest.raises(config.ParamsError, match=r"no item column \['plot'\]"):
        preprocess(items, inter, PreprocessParams(text_template="{title}: {plot}"))
    for bad, rule in [("{title", "expected '}'"), ("{title!r}", "plain column names"), ("nothing", "names no")]:
        with pytest.raises(config.ParamsError, match=rule):
            config.section(PreprocessParams, "preprocess", {"preprocess": {"text_template": bad}})
