"""`genre recommend --user U -k 10`: the champion's top-k for a known user, with reasons.

The model is ``models:/<promote.model_name>@champion`` loaded with ``mlflow.pyfunc.load_model``
(the same artifact ``mlflow models serve`` would serve); the user's history is their train+valid
positives from data/processed (histories.parquet ``hist_trainvalid``, item_idx mapped to item_id
through items.parquet). Each recommendation comes with a short reason: the history item most
similar to it by the model's item representations, and the genres they share.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from genre_tasks import schema as S
from genre_tasks.errors import StageError

DEFAULT_MODEL = "genre-recommender"
HISTORY = "hist_trainvalid"


class UnknownUserError(StageError):
    """The user id is not in data/processed/histories.parquet."""


def user_history(user_id: str, paths: S.Paths) -> list[str]:
    """The item ids the user liked in train+valid, oldest first."""
    if not paths.histories.exists():
        raise StageError(f"{paths.histories}: missing; run the pipeline first (dvc repro)")
    hist = pd.read_parquet(paths.histories, columns=[S.USER_ID, HISTORY])
    row = hist[hist[S.USER_ID].astype(str) == str(user_id)]
    if row.empty:
        sample = ", ".join(hist[S.USER_ID].astype(str).head(5))
        raise UnknownUserError(f"unknown user '{user_id}': not in {paths.histories} "
                               f"({len(hist):,} users, e.g. {sample})")
    items = pd.read_parquet(paths.items, columns=[S.ITEM_ID, S.ITEM_IDX])
    idx_to_id = dict(zip(items[S.ITEM_IDX].astype(int), items[S.ITEM_ID].astype(str)))
    return [idx_to_id[int(i)] for i in row[HISTORY].iloc[0] if int(i) in idx_to_id]


def load_champion(paths: S.Paths, model_name: str = DEFAULT_MODEL, alias: str = "champion"):
    """(pyfunc model, registered version) of ``models:/<model_name>@<alias>``."""
    from mlflow.exceptions import MlflowException

    from genre_tasks.registry import serving, tracking_store

    uri = tracking_store.set_uris(paths)
    try:
        mv = tracking_store.client(paths).get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        raise StageError(f"no model version '{model_name}@{alias}' in {uri}: run `genre promote` first "
                         f"({exc.message if hasattr(exc, 'message') else exc})") from exc
    # verified: the version's files must hash to what registration recorded
    return serving.load_pyfunc(f"models:/{model_name}/{mv.version}", tracking_store.client(paths)), str(mv.version)


def recommend(user_id: str, k: int, paths: S.Paths, model_name: str = DEFAULT_MODEL,
              alias: str = "champion", llm_reasons: dict | None = None) -> pd.DataFrame:
    """Top-``k`` for ``user_id``: rank, item_id, title, score, reason (items of the history excluded).

    ``df.attrs`` holds ``version`` (the registered version used) and ``history`` (item ids).
    Raises UnknownUserError for a user not in the processed data.

    ``llm_reasons`` (the ``augment`` params section): each reason is phrased by the augment
    backend from the deterministic facts, validated and grounded, else the deterministic text
    stays (:mod:`genre_tasks.features.augment.reasons`); column ``reason_generated`` says which.
    """
    if k < 1:
        raise StageError(f"-k must be >= 1, got {k}")
    history = user_history(user_id, paths)
    model, version = load_champion(paths, model_name, alias)
    out = model.predict(pd.DataFrame({"history": [history], "k": [int(k)]}))
    ids = [str(i) for i in out["item_ids"].iloc[0]]
    scores = [float(s) for s in out["scores"].iloc[0]]
    py = model.unwrap_python_model()
    reasons = py.explain(history, ids) if hasattr(py, "explain") else [""] * len(ids)
    generated = [False] * len(ids)
    if llm_reasons is not None and hasattr(py, "explain_facts"):
        reasons, generated = _llm_reasons(py, str(user_id), history, ids, reasons, llm_reasons, paths)
    titles = dict(zip(py.items[S.ITEM_ID].astype(str), py.items[S.TITLE].astype(str))) \
        if getattr(py, "items", None) is not None else {}
    df = pd.DataFrame({"rank": range(1, len(ids) + 1), S.ITEM_ID: ids,
                       S.TITLE: [titles.get(i, "?") for i in ids], "score": scores, "reason": reasons,
                       "reason_generated": generated})
    df.attrs.update({"version": version, "history": history, "model_name": model_name, "alias": alias,
                     "user_id": str(user_id)})
    return df


def _llm_reasons(py, user_id: str, history: list[str], ids: list[str], deterministic: list[str],
                 section: dict, paths: S.Paths) -> tuple[list[str], list[bool]]:
    """LLM-phrased reasons grounded in the model's facts (+ the user's generated profile topics)."""
    from genre_tasks.config import from_dict
    from genre_tasks.features.augment.backends import make_backend
    from genre_tasks.features.augment.params import AugmentParams
    from genre_tasks.features.augment.reasons import llm_reasons
    from genre_tasks.features.augment.stage import AugmentPaths, NO_GENRE

    p = from_dict(AugmentParams, dict(section or {}), "augment")
    facts = py.explain_facts(history, ids)
    ap = AugmentPaths(paths)
    if ap.profiles.exists():
        prof = pd.read_parquet(ap.profiles)
        row = prof[prof[S.USER_ID].astype(str) == user_id]
        if len(row):
            topics = [str(t) for t in row["topics"].iloc[0]]
            facts = [{**f, "profile_topics": topics} if f and not f.get("popular") else f for f in facts]
    vocab = sorted({str(g) for gs in py.items[S.GENRES] for g in gs if str(g).lower() not in NO_GENRE})
    out = llm_reasons(facts, deterministic, make_backend(p), ap.cache, vocab,
                      max_new_tokens=p.max_new_tokens, max_repairs=p.max_repairs)
    return [o["reason"] for o in out], [o["generated"] for o in out]


def format_recommendations(df: pd.DataFrame) -> str:
    a = df.attrs
    hist = a.get("history", [])
    head = (f"top-{len(df)} for user {a.get('user_id')} from {a.get('model_name')}@{a.get('alias')} "
            f"(v{a.get('version')}), history of {len(hist)} liked item(s)")
    if not hist:
        head += " (empty: most popular items)"
    lines = [head]
    for r in df.itertuples(index=False):
        lines.append(f"{r.rank:>3}. {str(r.title)[:48]:<48} {r.score:>9.4f}  {r.reason}")
    return "\n".join(lines)


def main(params: dict, paths: S.Paths, user: str, k: int = 10, alias: str = "champion",
         llm_reasons: bool = False) -> int:
    """CLI body: print the recommendations; 1 with a clear message on an unknown user."""
    model_name = (params.get("promote") or {}).get("model_name", DEFAULT_MODEL)
    try:
        df = recommend(user, k, paths, model_name, alias,
                       llm_reasons=(params.get("augment") or {}) if llm_reasons else None)
    except StageError as exc:
        print(f"genre recommend: {exc}", file=sys.stderr)
        return 1
    print(format_recommendations(df))
    return 0


def cli_recommend(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m genre_tasks.registry.recommend --user 1 -k 10``."""
    from genre_tasks.config import ParamsError, load_params
    from genre_tasks.logs import setup_logging

    parser = argparse.ArgumentParser(prog="genre recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--root", default=".")
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, args.override)
    except ParamsError as exc:
        print(f"genre recommend: bad params: {exc}", file=sys.stderr)
        return 2
    return main(params, S.Paths(Path(args.root)), args.user, args.k, args.alias, args.llm_reasons)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recommend options (for the `genre recommend` sub-parser)."""
    parser.add_argument("--user", required=True, help="user id (as in the source data)")
    parser.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--alias", default="champion", help="registry alias to use (default champion)")
    parser.add_argument("--llm-reasons", action="store_true",
                        help="phrase each reason with the augment backend (grounded in the deterministic "
                             "facts, validated; falls back to the deterministic text; marked [generated])")


if __name__ == "__main__":
    sys.exit(cli_recommend())
