"""Seconds per training step of the content two-tower on a big synthetic catalogue: the full
softmax vs sampled negatives drawn per example vs shared by the batch.

    python benchmarks/bench_train_step.py                       # 168,200 items (the 100x scale)
    python benchmarks/bench_train_step.py --items 16820 --steps 6

The real ``Trainer.step`` (``genre_tasks.models.tower``) on a synthetic FitData: random unit item
vectors (384-d, MiniLM's size), Zipf-like popularity (as ``bench_scale.py``'s generator), users
with 50-item histories drawn by popularity. Variants run interleaved (round-robin, one step of
each per round) so a noisy machine affects them alike; the median per variant is printed with its
ratio to the first variant and the number of distinct item rows the item tower ran over.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genre_tasks.models import tower  # noqa: E402
from genre_tasks.models.views import FitData  # noqa: E402

GENRES = 18


def synthetic_fit(n_items: int, n_users: int, history: int, seed: int) -> FitData:
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, n_items + 1)
    p = weight / weight.sum()
    hist = [rng.choice(n_items, history, p=p) for _ in range(n_users)]
    rows = np.repeat(np.arange(n_users), history)
    pos = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(hist))),
                            shape=(n_users, n_items))
    pos.data[:] = 1.0
    vec = rng.standard_normal((n_items, 384)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    genres = (rng.random((n_items, GENRES)) < 0.1).astype(np.float32)
    popularity = np.asarray(pos.sum(axis=0)).ravel().astype(np.int64)
    return FitData(phase="valid", n_users=n_users, n_items=n_items,
                   item_ids=np.array([str(i) for i in range(n_items)]),
                   user_ids=np.array([str(u) for u in range(n_users)]), rows=pd.DataFrame(),
                   positives=pos, seen=pos.astype(bool), histories=[h.astype(np.int64) for h in hist],
                   item_vectors=vec, item_genres=genres, genre_names=[f"g{i}" for i in range(GENRES)],
                   popularity=popularity, timestamps=np.zeros(n_items, np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=168_200)
    ap.add_argument("--users", type=int, default=4_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+",
                    default=["example:100", "batch:4000", "batch:1000", "full:0"],
                    help="sharing:k (sharing example | batch; full:0 = the full softmax)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fit = synthetic_fit(args.items, args.users, 50, seed=0)
    trainers = {}
    for v in args.variants:
        sharing, k = v.split(":")
        torch.manual_seed(0)
        net = tower.TwoTower("content", fit.n_items, 384, GENRES, dim=64, hidden=256, history_max=50, dropout=0.0)
        trainers[v] = tower.Trainer(net, fit, loss="softmax", negatives=int(k),
                                    negative_sharing="example" if sharing == "full" else sharing,
                                    negative_sampling="popularity", logq_correction=sharing == "batch",
                                    batch_size=args.batch, lr=0.005, weight_decay=0.0, use_genres=True,
                                    genre_names=fit.genre_names, seed=0)
    print(f"# bench_train_step: {args.items:,} items, batch {args.batch}, {args.threads} threads, "
          f"{args.steps} timed steps per variant (interleaved)")
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    rows: dict[str, int] = {}
    order = np.random.default_rng(1).permutation(trainers[args.variants[0]].n_examples)
    for r in range(args.steps + 1):
        ex = order[(r * args.batch) % len(order):][:args.batch]
        for v, tr in trainers.items():
            hist, mask, target = tr._batch(ex)
            if tr.k > 0:  # the distinct rows of this step: its draw, then the state put back
                state = tr.rng.bit_generator.state
                neg = tr._sample(len(ex))
                tr.rng.bit_generator.state = state
                rows[v] = len(np.unique(np.concatenate([hist.numpy().ravel(), target.numpy(), neg.ravel()])))
            else:
                rows[v] = fit.n_items + 1
            t0 = time.perf_counter()
            tr.step(hist, mask, target)
            if r > 0:
                times[v].append(time.perf_counter() - t0)
    base = statistics.median(times[args.variants[0]])
    print("| variant | median s/step | speed vs the first (>1 = faster) | item-tower rows |")
    print("|---|---:|---:|---:|")
    for v in args.variants:
        m = statistics.median(times[v])
        print(f"| {v} | {m:.3f} | {base / m:.2f}x | {rows[v]:,} |")


if __name__ == "__main__":
    main()
