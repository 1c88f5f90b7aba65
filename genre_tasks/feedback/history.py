"""`genre history`: successive model versions of the registry and how each did on live data.

One row per registered version of ``promote.model_name`` (oldest first):

``version``        the registry version and its aliases (champion, challenger, ...)
``data cutoff``    newest interaction the version's pipeline run ingested (``max_timestamp`` of
                   its ``metrics/ingest.json`` artifact; falls back to the newest item timestamp
                   of the served bundle)
``batches``        feedback batches in that data (count and the newest batch id)
``prequential``    the version's scores on the feedback batch that followed it, measured
                   while it was @champion and before that batch was trained on (nDCG@10,
                   Recall@10, MRR, AUC; users = evaluated users of the batch). Only champions
                   are scored: a rejected challenger never served.
``test``           nDCG@10 / Recall@10 of the pipeline run on its own test split
``decision``       promoted / rejected / forced / failed, and why (the promote stage's tags)

Everything is read from MLflow (model version tags, the pipeline run's metrics and its
``metrics/ingest.json`` artifact, the prequential runs tagged ``genre.prequential``), with
``data/feedback/prequential/*.json`` as the fallback for prequential scores. ``plots/history.png``
shows test and prequential nDCG@10 / Recall@10 over versions (promoted versions filled).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genre_tasks import io
from genre_tasks import schema as S

log = logging.getLogger("genre.history")

METRICS = ("ndcg@10", "recall@10", "mrr", "auc")


@dataclass
class VersionRow:
    """One model version of the history table (JSON-able)."""

    version: str
    aliases: list[str] = field(default_factory=list)
    created: str | None = None
    strategy: str | None = None
    run_id: str | None = None
    data_cutoff: int | None = None
    n_interactions: int | None = None
    batches: list[str] = field(default_factory=list)
    prequential_batch: str | None = None
    prequential: dict[str, float | None] = field(default_factory=dict)
    prequential_users: int | None = None
    prequential_batches_scored: int = 0
    #: every batch this version was scored on: [{batch_id, ndcg@10, ..., users}]
    prequential_all: list[dict] = field(default_factory=list)
    test: dict[str, float | None] = field(default_factory=dict)
    decision: str | None = None
    promoted: bool = False
    reason: str | None = None


def _iso_day(ts: int | None) -> str:
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def _ingest_record(cl, run_id: str) -> dict | None:
    """The pipeline run's ``metrics/ingest.json`` artifact (None when it was not logged)."""
    try:
        with tempfile.TemporaryDirectory(prefix="genre-history-") as tmp:
            path = cl.download_artifacts(run_id, "metrics/ingest.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - an older run without the artifact
        return None


def _bundle_cutoff(cl, name: str, version: str) -> int | None:
    """Newest item timestamp of the version's bundle (the fit data's last interaction)."""
    try:
        import mlflow
        import pandas as pd

        uri = cl.get_model_version_download_uri(name, version)
        with tempfile.TemporaryDirectory(prefix="genre-history-") as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri.rstrip('/')}/artifacts/bundle/items.parquet", dst_path=tmp)
            ts = pd.read_parquet(path, columns=["timestamp"])["timestamp"]
        return int(ts.max()) if len(ts) else None
    except Exception:  # noqa: BLE001
        return None


def _prequential_runs(cl, paths: S.Paths, name: str) -> dict[str, list[dict]]:
    """{version: [prequential records sorted by batch id]} from MLflow + local records."""
    from genre_tasks.feedback.params import TAG_BATCH, TAG_MODEL, TAG_PREQUENTIAL, TAG_VERSION, FeedbackPaths
    from genre_tasks.registry import tracking, tracking_store

    out: dict[str, dict[str, dict]] = {}
    try:
        exp = cl.get_experiment_by_name(tracking_store.experiment_name())
        runs = cl.search_runs([exp.experiment_id], max_results=5000,
                              filter_string=f"tags.`{TAG_PREQUENTIAL}` = '1' and "
                                            f"tags.`{TAG_MODEL}` = '{name}'") if exp else []
    except Exception as exc:  # noqa: BLE001
        log.warning("prequential runs not readable from MLflow: %s", exc)
        runs = []
    for r in runs:
        v, b = r.data.tags.get(TAG_VERSION), r.data.tags.get(TAG_BATCH)
        m = r.data.metrics
        out.setdefault(str(v), {})[str(b)] = {
            "batch_id": b, "metrics": {k: m.get(tracking.metric_key(k)) for k in METRICS},
            "eval_users": m.get("count.eval_users"), "n_users": m.get("n_users")}
    folder = FeedbackPaths(paths).prequential
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rec = io.read_json(f)
        if rec.get("model_name", name) != name:
            continue
        v, b = str(rec.get("model_version")), str(rec.get("batch_id"))
        out.setdefault(v, {}).setdefault(b, {
            "batch_id": b, "metrics": {k: rec.get("metrics", {}).get(k) for k in METRICS},
            "eval_users": rec.get("counts", {}).get("eval_users"),
            "n_users": rec.get("metrics", {}).get("n_users")})
    return {v: [d[b] for b in sorted(d)] for v, d in out.items()}


def collect(paths: S.Paths, model_name: str) -> list[VersionRow]:
    """The history rows of ``model_name`` (oldest version first); [] without a registry."""
    from genre_tasks.registry import tracking, tracking_store

    uri = tracking_store.tracking_uri(paths)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return []
    from mlflow.exceptions import MlflowException

    tracking_store.set_uris(paths)
    cl = tracking_store.client(paths)
    try:
        rm = cl.get_registered_model(model_name)
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        aliases.setdefault(str(v), []).append(alias)
    prequential = _prequential_runs(cl, paths, model_name)
    rows = []
    for mv in sorted(cl.search_model_versions(f"name='{model_name}'"), key=lambda m: int(m.version)):
        v = str(mv.version)
        t = mv.tags or {}
        run_id = t.get("run_id") or mv.run_id
        row = VersionRow(version=v, aliases=sorted(aliases.get(v, [])), strategy=t.get("strategy"),
                         run_id=run_id, decision=t.get("decision"),
                         created=dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc)
                         .strftime("%Y-%m-%d %H:%M") if mv.creation_timestamp else None)
        row.promoted = row.decision in ("promoted", "forced") or "champion" in row.aliases
        reason = t.get("reasons") or ""
        if row.decision == "forced":
            reason = f"forced by {t.get('forced_by')}: {t.get('force_reason')}"
        row.reason = reason or None
        if run_id:
            try:
                metrics = cl.get_run(run_id).data.metrics
                row.test = {k: _num(metrics.get(f"test.{tracking.metric_key(k)}")) for k in METRICS}
            except MlflowException:
                pass
            rec = _ingest_record(cl, run_id)
            if rec:
                row.data_cutoff = rec.get("max_timestamp")
                row.n_interactions = rec.get("n_interactions")
                row.batches = list(rec.get("feedback_batches") or [])
        if row.data_cutoff is None:
            row.data_cutoff = _bundle_cutoff(cl, model_name, v)
        scored = prequential.get(v, [])
        row.prequential_batches_scored = len(scored)
        row.prequential_all = [{"batch_id": p["batch_id"],
                                **{k: _num(p["metrics"].get(k)) for k in METRICS},
                                "users": p.get("eval_users") or p.get("n_users")} for p in scored]
        later = [p for p in scored if not row.batches or p["batch_id"] > max(row.batches)]
        first = (later or scored)[0] if scored else None
        if first:
            row.prequential_batch = first["batch_id"]
            row.prequential = {k: _num(first["metrics"].get(k)) for k in METRICS}
            users = first.get("eval_users") or first.get("n_users")
            row.prequential_users = int(users) if users is not None else None
        rows.append(row)
    return rows


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def markdown(rows: list[VersionRow], model_name: str) -> str:
    """The history table as markdown."""
    if not rows:
        return f"no registered versions of '{model_name}' yet"
    lines = [f"## {model_name}: model versions",
             "| version | data cutoff (UTC) | batches applied | prequential on next batch: "
             "nDCG@10 / Recall@10 / MRR / AUC (users) | test nDCG@10 / Recall@10 | promoted | why |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"v{r.version}" + (f" ({', '.join(r.aliases)})" if r.aliases else "")
        batches = f"{len(r.batches)}" + (f" (..{r.batches[-1]})" if r.batches else "")
        if r.prequential_batch:
            p = r.prequential
            pre = (f"{r.prequential_batch}: {_f(p.get('ndcg@10'))} / {_f(p.get('recall@10'))} / "
                   f"{_f(p.get('mrr'))} / {_f(p.get('auc'))} ({r.prequential_users})")
            if r.prequential_batches_scored > 1:
                pre += f" +{r.prequential_batches_scored - 1} more"
        else:
            pre = "-"
        test = f"{_f(r.test.get('ndcg@10'))} / {_f(r.test.get('recall@10'))}"
        promoted = {True: "yes", False: "no"}[r.promoted] + (f" ({r.decision})" if r.decision else "")
        why = (r.reason or "").replace("|", "/")
        lines.append(f"| {name} | {_iso_day(r.data_cutoff)} | {batches} | {pre} | {test} | "
                     f"{promoted} | {why[:160]} |")
    scored = [(p, r) for r in rows for p in r.prequential_all]
    if scored:
        lines += ["", "## Prequential scores (the serving champion on each batch, before training on it)",
                  "| batch | champion | nDCG@10 | Recall@10 | MRR | AUC | users |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for p, r in sorted(scored, key=lambda pr: pr[0]["batch_id"]):
            users = "-" if p.get("users") is None else int(p["users"])
            lines.append(f"| {p['batch_id']} | v{r.version} | {_f(p.get('ndcg@10'))} | "
                         f"{_f(p.get('recall@10'))} | {_f(p.get('mrr'))} | {_f(p.get('auc'))} | {users} |")
    return "\n".join(lines)


def plot(rows: list[VersionRow], target: Path) -> Path | None:
    """Test and prequential nDCG@10 / Recall@10 over versions -> ``target`` (PNG)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    labels = [f"v{r.version}\n{_iso_day(r.data_cutoff)[:10]}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, metric in zip(axes, ("ndcg@10", "recall@10")):
        for source, style, getter in (("test split", "-o", lambda r: r.test.get(metric)),
                                      ("prequential (next batch)", "--s",
                                       lambda r: r.prequential.get(metric))):
            ys = [getter(r) for r in rows]
            ax.plot(x, [y if y is not None else float("nan") for y in ys], style, label=source,
                    color="C0" if source.startswith("test") else "C1", markerfacecolor="none")
            px = [i for i, r in enumerate(rows) if r.promoted and ys[i] is not None]
            ax.plot(px, [ys[i] for i in px], style[-1], color="C0" if source.startswith("test") else "C1")
        ax.set_title(f"{metric} per model version (filled = promoted)")
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


def history(params: dict, paths: S.Paths, model_name: str | None = None,
            plot_path: Path | None = None) -> dict:
    """Collect the rows, write the plot (``plots/history.png`` by default); return
    ``{"model_name", "markdown", "rows", "plot"}``."""
    name = model_name or str((params.get("promote") or {}).get("model_name", "genre-recommender"))
    rows = collect(paths, name)
    target = plot_path if plot_path is not None else paths.plots_dir / "history.png"
    written = plot(rows, Path(target)) if rows else None
    return {"model_name": name, "markdown": markdown(rows, name), "rows": [asdict(r) for r in rows],
            "plot": str(written) if written else None}


def history_cli(argv: list[str] | None = None) -> int:
    """``genre history [--root R] [--params P] [--model-name N] [--plot PATH | --no-plot] [--json]``:
    prints the markdown table (or the rows as JSON) and writes plots/history.png."""
    from genre_tasks import config, logs

    parser = argparse.ArgumentParser(prog="genre history", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--root", default=".")
    parser.add_argument("--model-name", default=None, help="default: promote.model_name")
    parser.add_argument("--plot", default=None, help="PNG path (default: plots/history.png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    logs.setup_logging(logging.WARNING)
    paths = S.Paths(args.root)
    try:
        params = config.load_params(args.params, args.override)
    except config.ParamsError as exc:
        print(f"genre history: bad params: {exc}", file=sys.stderr)
        return 2
    name = args.model_name or str((params.get("promote") or {}).get("model_name", "genre-recommender"))
    if args.no_plot:
        rows = collect(paths, name)
        out = {"model_name": name, "markdown": markdown(rows, name),
               "rows": [asdict(r) for r in rows], "plot": None}
    else:
        out = history(params, paths, name, Path(args.plot) if args.plot else None)
    if args.json:
        print(json.dumps(out["rows"], indent=2, sort_keys=True, default=str))
    else:
        print(out["markdown"])
        if out["plot"]:
            print(f"\nplot: {out['plot']}")
    return 0


__all__ = ["VersionRow", "collect", "markdown", "plot", "history", "history_cli"]
