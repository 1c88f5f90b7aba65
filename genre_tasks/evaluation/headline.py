"""Headline numbers per stage: what ``dvc metrics show`` / ``dvc metrics diff`` display.

The stages keep writing their full records to ``metrics/<stage>.json`` (plain DVC outputs, read
by the report, MLflow logging and promote); the *declared* DVC metrics are the small files
``metrics/headline/<stage>.json`` written from them by :func:`write` (``genre <stage>`` calls
it after the stage), a handful of flat numbers each. ``plots/train_curve_wide.csv`` (epoch, one
validation-nDCG@10 column per strategy) is what ``dvc plots show`` draws one line per strategy.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from genre_tasks import io
from genre_tasks import schema as S

HEADLINE_DIR = "headline"
#: the strategies the wide curve file always has a column for (empty when not trained)
STRATEGIES = ("content", "collaborative", "hybrid")  # = train.TWO_TOWER: per-epoch curves (ease has a lambda grid, not epochs)


def _get(doc: Mapping, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


def _r(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _ingest(d: Mapping) -> dict:
    return {"users": d.get("n_users"), "items": d.get("n_items"), "interactions": d.get("n_interactions")}


def _validate(d: Mapping) -> dict:
    n, ok = d.get("expectations_evaluated"), d.get("expectations_successful")
    return {"gx_passed": d.get("success"), "gx_failed": (n - ok) if isinstance(n, int) and isinstance(ok, int) else None}


def _preprocess(d: Mapping) -> dict:
    return {"train_rows": _get(d, "train", "rows"), "test_users": _get(d, "test", "users_with_positive")}


def _embed(d: Mapping) -> dict:
    return {"texts_per_s": _r(d.get("texts_per_second"), 1), "embedded": d.get("n_embedded")}


def _genre(d: Mapping) -> dict:
    return {"genre_micro_f1": _r(d.get("micro_f1")), "genre_macro_f1": _r(d.get("macro_f1"))}


def _train(d: Mapping) -> dict:
    selected = d.get("selected")
    return {"selected": selected, "valid_ndcg@10": _r(_get(d, "strategies", str(selected), "valid_ndcg@10")),
            "best_epoch": _get(d, "strategies", str(selected), "best_epoch")}


def _evaluate(d: Mapping) -> dict:
    models = d.get("models") or {}
    sel = models.get(str(d.get("selected"))) or {}
    out = {"test_ndcg@10": _r(sel.get("ndcg@10")), "test_recall@10": _r(sel.get("recall@10")),
           "test_auc": _r(sel.get("auc"))}
    for name in ("MostPop", "EASE"):
        if name in models:
            out[f"{name.lower()}_ndcg@10"] = _r(models[name].get("ndcg@10"))
    if "cold_ndcg@10" in sel:
        out["test_cold_ndcg@10"] = _r(sel.get("cold_ndcg@10"))
    return out


def _promote(d: Mapping) -> dict:
    return {"decision": d.get("decision"), "version": d.get("version"), "gain": _r(d.get("gain")),
            "ci_lower": _r(d.get("ci_lower"))}


EXTRACT: dict[str, Callable[[Mapping], dict]] = {
    "ingest": _ingest, "validate": _validate, "preprocess": _preprocess, "embed": _embed,
    "genre": _genre, "train": _train, "evaluate": _evaluate, "promote": _promote,
}


def path(paths: S.Paths, stage: str) -> Path:
    return paths.metrics_dir / HEADLINE_DIR / f"{stage}.json"


def headline(stage: str, record: Mapping) -> dict:
    """The handful of numbers of ``stage`` from its full metrics record (None values dropped)."""
    return {k: v for k, v in EXTRACT[stage](record).items() if v is not None}


def wide_curve(paths: S.Paths) -> Path | None:
    """plots/train_curve.csv (long: strategy, epoch, ...) -> plots/train_curve_wide.csv
    (epoch + one valid_ndcg@10 column per strategy, empty where a strategy stopped/was not run)."""
    import pandas as pd

    long = paths.plots_dir / "train_curve.csv"
    if not long.exists():
        return None
    df = pd.read_csv(long)
    wide = df.pivot_table(index="epoch", columns="strategy", values="valid_ndcg@10", aggfunc="first")
    wide = wide.reindex(columns=list(STRATEGIES)).reset_index()
    out = paths.plots_dir / "train_curve_wide.csv"
    io.write_text(wide.to_csv(index=False, float_format="%.6f"), out)
    return out


def write(stage: str, paths: S.Paths) -> Path | None:
    """Write ``metrics/headline/<stage>.json`` (and the wide curve after train)."""
    if stage not in EXTRACT or not paths.metrics(stage).exists():
        return None
    out = path(paths, stage)
    io.write_json(headline(stage, io.read_json(paths.metrics(stage))), out)
    if stage == "train":
        wide_curve(paths)
    return out
