"""Warm-start vs full retraining on replayed weeks of MovieLens-100k.

    python benchmarks/bench_warm.py [--root .] [--weeks 3] [--cutoff 1998-03-02] \
        [--warm name='{"warm_epochs": 2}' ...]

The store first holds the interactions before ``--cutoff`` (what `genre feedback replay --init`
keeps); each replayed ISO week is then added (genre_tasks.feedback.replay.weekly_batches), as the feedback
loop does. Per state the interactions are preprocessed (user_temporal split, params.yaml) in a
scratch root under .cache/bench_warm/ that shares the project's item vectors and genres.

* week 0: a full train (the champion the loop starts from);
* every replayed week k: (a) **full**: the train stage with ``train.mode full``; (b) **warm**:
  ``train.mode warm`` from the previous week's warm model (week 1: from the week-0 champion),
  i.e. a chain of warm starts, as a loop that only ever warm-starts would do. ``--warm
  name=JSON`` (repeatable) runs several warm variants side by side, each its own chain, each
  JSON merged into ``train`` (e.g. ``keep2='{"warm_epochs": 2}'``,
  ``revalidate='{"warm_revalidate": true}'``); default: one variant ``warm`` = params.yaml.
  ``--reuse-full`` takes week 0 and the full retrains from an earlier run in the same root.

Both are trained with one seed (``train.extra_seeds []``; the default pipeline trains three, so a
default full retrain costs about three times the full column's tower time). Prints, per week:
the train stage's wall time of each, and the selected model's test nDCG@10 / MRR / AUC with the
per-user paired difference warm - full (mean, se, t) on that week's test split.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.cli import run_stage
from genre_tasks.config import deep_merge, load_params, section
from genre_tasks.data.preprocess import PreprocessParams, preprocess
from genre_tasks.evaluation.evaluate import paired_t
from genre_tasks.evaluation.protocol import evaluate_recommender
from genre_tasks.feedback.replay import weekly_batches
from genre_tasks.models.views import Dataset

SHARED = ("data/raw", "data/embeddings", "data/genre", ".cache/embeddings")


def scratch(project: Path, name: str) -> Path:
    root = project / ".cache" / "bench_warm" / name
    if root.exists():
        shutil.rmtree(root)
    for rel in SHARED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to((project / rel).resolve(), target_is_directory=True)
    return root


def write_state(root: Path, items: pd.DataFrame, inter: pd.DataFrame, params: dict) -> None:
    paths = S.Paths(root)
    items_p, inter_p, hist, stats = preprocess(items, inter, section(PreprocessParams, "preprocess", params))
    io.write_parquet(items_p, paths.items)
    io.write_parquet(inter_p, paths.interactions)
    io.write_parquet(hist, paths.histories)
    io.write_json(stats, paths.split_info)


def selected(root: Path):
    from genre_tasks.models.train import load_recommender

    paths = S.Paths(root)
    name = io.read_json(paths.model_dir / "selected.json")["strategy"]
    return name, load_recommender(paths.model_dir / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--weeks", type=int, default=3)
    parser.add_argument("--cutoff", default="1998-03-02")
    parser.add_argument("--warm", action="append", default=[], metavar="NAME=JSON",
                        help="a warm variant: NAME=JSON merged into the train section (repeatable)")
    parser.add_argument("--reuse-full", action="store_true",
                        help="reuse the week-0 and full retrains an earlier run left in --root's "
                             ".cache/bench_warm (training is deterministic: valid only with the "
                             "same params.yaml, --cutoff and code)")
    args = parser.parse_args()
    variants = {}
    for spec in args.warm or ["warm={}"]:
        name, _, js = spec.partition("=")
        variants[name] = json.loads(js or "{}")
    project = Path(args.root).resolve()
    base = deep_merge(load_params(project / args.params), {"train": {"extra_seeds": []}})
    raw = S.Paths(project)
    items = pd.read_parquet(raw.raw_items)
    inter = pd.read_parquet(raw.raw_interactions)
    cutoff = int(pd.Timestamp(args.cutoff, tz="UTC").timestamp())
    weeks = weekly_batches(inter, cutoff)[:args.weeks]
    store = inter[inter[S.TIMESTAMP] < cutoff]

    t0 = time.perf_counter()
    root0 = project / ".cache" / "bench_warm" / "week0"
    if not (args.reuse_full and (root0 / "metrics" / "train.json").exists()):
        root0 = scratch(project, "week0")
        write_state(root0, items, store, base)
        run_stage("train", base, root0)
    print(f"week 0 (store before {args.cutoff}: {len(store):,} interactions): full train "
          f"{time.perf_counter() - t0:.0f} s, selected {selected(root0)[0]}", flush=True)
    warm_from = {name: S.Paths(root0).model_dir / selected(root0)[0] for name in variants}

    rows = []
    for k, (wid, batch) in enumerate(weeks, 1):
        store = pd.concat([store, batch], ignore_index=True)
        out = {}
        for mode in ("full", *variants):
            root = project / ".cache" / "bench_warm" / f"week{k}-{mode}"
            if mode == "full" and args.reuse_full and (root / "metrics" / "train.json").exists():
                summary = io.read_json(root / "metrics" / "train.json")  # an earlier run's (deterministic)
                seconds = float(summary.get("seconds") or "nan")
            else:
                root = scratch(project, f"week{k}-{mode}")
                write_state(root, items, store, base)
                params = base if mode == "full" else deep_merge(
                    base, {"train": {"mode": "warm", "warm_from": str(warm_from[mode]), **variants[mode]}})
                t = time.perf_counter()
                summary = run_stage("train", params, root)
                seconds = time.perf_counter() - t
            fit, ev = Dataset.load(S.Paths(root)).phase("test")
            name, rec = selected(root)
            res = evaluate_recommender(rec, fit, ev, seed=42)
            out[mode] = {"root": root, "seconds": seconds, "name": name, "res": res,
                         "mode_run": summary.get("mode")}
        f = out["full"]["res"]
        for mode in variants:
            warm_from[mode] = S.Paths(out[mode]["root"]).model_dir / out[mode]["name"]
            w = out[mode]["res"]
            row = {"week": wid, "variant": mode, "rows": len(batch), "store": len(store),
                   "full s": out["full"]["seconds"], "warm s": out[mode]["seconds"],
                   "warm/full time": out[mode]["seconds"] / out["full"]["seconds"],
                   "selected full/warm": f"{out['full']['name']}/{out[mode]['name']} ({out[mode]['mode_run']})"}
            for m in ("ndcg@10", "mrr", "auc"):
                d = paired_t(w, f, m)
                row[f"{m} full"] = f"{f.metrics[m]:.4f} ± {f.metrics[m + '_se']:.4f}"
                row[f"{m} warm"] = f"{w.metrics[m]:.4f} "
                row[f"{m} warm-full (t)"] = f"{d['diff']:+.4f} ± {d['se']:.4f} ({d['t']:+.2f})"
            rows.append(row)
            print(f"{wid} {mode}: full {row['full s']:.0f} s, warm {row['warm s']:.0f} s; nDCG@10 full "
                  f"{f.metrics['ndcg@10']:.4f} warm {w.metrics['ndcg@10']:.4f}", flush=True)
    df = pd.DataFrame(rows).round({"full s": 1, "warm s": 1, "warm/full time": 2})
    print()
    print(df.to_markdown(index=False, disable_numparse=True))
    print(f"\n(train stage wall time, one seed; n users {f.metrics['n_users']:.0f} in the last week's test; "
          f"total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
