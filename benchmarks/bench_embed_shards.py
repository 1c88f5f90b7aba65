"""embed with 1 vs N shards, side by side, medians over repeats (cold embedding cache each time).

    python benchmarks/bench_embed_shards.py --texts 1682 --shards 2 --repeats 3

1 shard = the embed stage alone (``embed.run``). N shards = N processes started together, each
``embed.run_shard`` on its slice into a folder of its own (like separate workers), then the
reduce: parts imported into a fresh cache and ``embed.run`` (which encodes nothing). Wall time of
the whole N-shard path vs the single stage; the vectors are compared too. Texts: synthetic
MovieLens-like titles (benchmarks/bench_scale.generate). This is the function-level path; the
DAG adds task start-up, ``dvc pull`` and the MLflow up/download per shard.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from genre_tasks import schema as S  # noqa: E402
from genre_tasks.config import from_dict  # noqa: E402
from genre_tasks.features import embed  # noqa: E402
from genre_tasks.schema import Paths  # noqa: E402

SHARD = """
import sys
from pathlib import Path
from genre_tasks.config import from_dict
from genre_tasks.features import embed
from genre_tasks.schema import Paths
root, shard, n, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
p = from_dict(embed.EmbedParams, {"show_progress": False, "shards": n})
embed.run_shard(p, Paths(root), shard, out)
"""


def write_items(root: Path, texts: list[str]) -> Paths:
    paths = Paths(root)
    paths.items.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({S.ITEM_ID: [f"i{k}" for k in range(len(texts))], S.ITEM_IDX: np.arange(len(texts), dtype=np.int32),
                  S.TEXT: texts}).to_parquet(paths.items, index=False)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=1682)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from bench_scale import generate

    work = Path(tempfile.mkdtemp(prefix="genre-shards-"))
    generate(max(args.texts / 1682, 0.01), work / "gen")
    texts = pd.read_csv(work / "gen" / "items.csv")["text"].astype(str).tolist()[: args.texts]
    print(f"# {len(texts)} texts, 1 vs {args.shards} shards, {args.repeats} repeats; load {os.getloadavg()}")
    one_s, many_s, diffs = [], [], []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    p1 = from_dict(embed.EmbedParams, {"show_progress": False})
    pn = from_dict(embed.EmbedParams, {"show_progress": False, "shards": args.shards})
    for r in range(args.repeats):
        single = write_items(work / f"single{r}", texts)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from genre_tasks.config import from_dict; "
                        "from genre_tasks.features import embed; from genre_tasks.schema import Paths; "
                        "embed.run(from_dict(embed.EmbedParams, {'show_progress': False}), Paths(sys.argv[1]))",
                        str(single.root)], check=True, env=env)
        one_s.append(time.perf_counter() - t0)
        parts = work / f"parts{r}"
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", SHARD, str(write_items(work / f"w{r}-{i}", texts).root),
                                   str(i), str(args.shards), str(parts)], env=env) for i in range(args.shards)]
        assert all(p.wait() == 0 for p in procs)
        reduce = write_items(work / f"reduce{r}", texts)
        for part in sorted(parts.glob("*.npz")):
            embed.import_shard(pn, reduce, part)
        summary = embed.run(pn, reduce)
        many_s.append(time.perf_counter() - t0)
        assert summary["n_texts_encoded"] == 0
        diffs.append(float(np.abs(np.load(reduce.vectors) - np.load(single.vectors)).max()))
        print(f"repeat {r}: 1 shard {one_s[-1]:.1f} s, {args.shards} shards {many_s[-1]:.1f} s "
              f"(reduce encoded 0), max abs diff {diffs[-1]:.2g}", flush=True)
    m1, mn = statistics.median(one_s), statistics.median(many_s)
    print(f"median: 1 shard {m1:.1f} s, {args.shards} shards {mn:.1f} s, ratio {mn / m1:.2f} "
          f"(speed-up {m1 / mn:.2f}x); max abs diff {max(diffs):.2g}; load {os.getloadavg()}")
    del p1


if __name__ == "__main__":
    main()
