"""Ablation of the GENRE augmentation on the evaluation protocol's test split.

    python benchmarks/bench_augment_ablation.py [--root .] [--split user_temporal|cold_items]
                                                [--strategies content hybrid] [--seeds 42 43 44]

Needs the project's data/raw + data/validation (genre source/ingest/validate) and data/augment
from an augment run (e.g. `genre --override configs/genre.yaml augment`). Two scratch roots
under .cache/bench_augment/<split>/ (base, enriched; one pair per seed) run preprocess -> embed
-> train with the project's params (train.seed = the seed, no extra seeds) (genre stage skipped: MovieLens items all have genres), the enriched one with
embed.augmented_text=append. Rows per strategy, all on the same test users and seeds:

  base          the model on the original item text
  +enriched     trained on original + enriched item text (items the augment run covered)
  +profiles     base model, user profiles as pseudo-items in the user tower (users covered)
  +cold synth   base model, cold users' synthetic items as pseudo-items
  all           enriched model + profiles + synthetic items

Prints every metric of the protocol as mean ± sd over the seeds, the paired nDCG@10 difference vs
base (its mean over seeds, the paired t over test users of each seed) and the difference on the
users the augmentation touched, and writes the numbers to
.cache/bench_augment/<split>/ablation.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks import schema as S
from genre_tasks.cli import run_stage
from genre_tasks.config import deep_merge, load_params, section
from genre_tasks.models.views import Dataset
from genre_tasks.features.embed import EmbedParams, encode_texts
from genre_tasks.evaluation.protocol import evaluate_recommender
from genre_tasks.features.augment.use import AugmentedUsers, PseudoItems, pseudo_items
from genre_tasks.models.train import load_recommender

SHARED = ("data/raw", "data/validation", "data/augment", ".cache/embeddings", ".cache/augment")
METRICS = ("ndcg@10", "recall@10", "recall@20", "mrr", "hr@10", "auc", "imp_ndcg@10",
           "cold_ndcg@10", "cold_recall@10", "cold_recall@20", "cold_mrr")


def scratch(project: Path, split: str, variant: str, fresh: bool, need_augment: bool = True) -> Path:
    root = project / ".cache" / "bench_augment" / split / variant
    if fresh and root.exists():
        shutil.rmtree(root)
    for rel in SHARED:
        src, dst = project / rel, root / rel
        if not src.exists() and rel in ("data/augment", ".cache/augment") and not need_augment:
            continue
        if not src.exists():
            raise SystemExit(f"{src} missing: run genre source/ingest/validate and the augment stage first")
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    return root


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    d = np.asarray(b, float) - np.asarray(a, float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return float("nan"), float("nan"), float("nan")
    se = d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(se), float(d.mean() / se) if se > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="user_temporal")
    parser.add_argument("--strategies", nargs="+", default=["content", "hybrid"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44],
                        help="train.seed of each repetition (extra_seeds off: one model per seed)")
    parser.add_argument("--items-only", action="store_true",
                        help="only base and +enriched: for a split other than the one whose train "
                             "histories the augment run profiled (its profiles could have read test items)")
    parser.add_argument("--reuse", action="store_true", help="reuse trained scratch models")
    parser.add_argument("--train-only", choices=["base", "enriched"], default=None,
                        help="only preprocess/embed/train that variant (e.g. base while augment runs); "
                             "enriched runs its own augment stage (enrich_items only) from the shared "
                             "generation cache first")
    parser.add_argument("--augment-override", default="configs/genre.yaml",
                        help="the augment params of the run whose outputs are measured")
    args = parser.parse_args()
    project = Path(args.root).resolve()
    base = load_params(project / args.params)
    aug = project / "data" / "augment"
    if args.train_only:
        root = scratch(project, args.split, args.train_only, fresh=not args.reuse, need_augment=False)
        params = deep_merge(base, {"preprocess": {"split": {"mode": args.split}},
                                   "embed": {"augmented_text": "none" if args.train_only == "base" else "append",
                                             "show_progress": False},
                                   "train": {"strategies": list(args.strategies)}})
        stages = ("preprocess", "embed", "train")
        if args.train_only == "enriched":
            if (root / "data" / "augment").is_symlink():
                (root / "data" / "augment").unlink()
            aug_params = load_params(project / args.params, [project / args.augment_override])["augment"]
            params = deep_merge(params, {"augment": {**aug_params, "operations": ["enrich_items"]}})
            stages = ("preprocess", "augment", "embed", "train")
        for stage in stages:
            run_stage(stage, params, root)
        print(f"trained {args.train_only} in {root}")
        return
    tables = {n: pd.read_parquet(aug / f"{n}.parquet") for n in ("items", "profiles", "synthetic_items")}
    print(f"augment outputs: {len(tables['items'])} enriched items, {len(tables['profiles'])} profiles, "
          f"{len(tables['synthetic_items'])} synthetic items "
          f"({tables['synthetic_items'][S.USER_ID].nunique() if len(tables['synthetic_items']) else 0} cold users)")
    results: dict = {}  # (seed, strategy, row) -> metrics
    per_user: dict = {}  # (seed, strategy, row) -> (per-user metrics, their users)
    for seed in args.seeds:
        for variant, text in (("base", "none"), ("enriched", "append")):
            root = scratch(project, args.split, f"{variant}-seed{seed}", fresh=not args.reuse)
            params = deep_merge(base, {"preprocess": {"split": {"mode": args.split}},
                                       "embed": {"augmented_text": text, "show_progress": False},
                                       "train": {"strategies": list(args.strategies), "seed": seed,
                                                 "extra_seeds": []}})
            t0 = time.perf_counter()
            for stage in ("preprocess", "embed", "train"):
                if args.reuse and stage == "train" and (root / "metrics" / "train.json").exists():
                    continue
                run_stage(stage, params, root)
            print(f"seed {seed} {variant}: preprocess/embed/train {time.perf_counter() - t0:.0f} s", flush=True)
            ds = Dataset.load(S.Paths(root))
            fit, ev = ds.phase("test")
            users = {str(u): i for i, u in enumerate(fit.user_ids)}
            ep = section(EmbedParams, "embed", params)

            def encode(texts):
                return encode_texts(texts, ep.model_path, ep.batch_size, ep.max_length, ep.threads)

            extras = {"profiles": pseudo_items([tables["profiles"]], users, encode),
                      "cold": pseudo_items([tables["synthetic_items"]], users, encode)}
            filled = [x.vectors for x in extras.values() if len(x.ids)]
            both = PseudoItems(np.concatenate([extras["profiles"].users, extras["cold"].users]),
                               np.vstack(filled) if filled else np.zeros((0, 0), np.float32),
                               extras["profiles"].genres + extras["cold"].genres,
                               extras["profiles"].ids + extras["cold"].ids)
            for strategy in args.strategies:
                rec = load_recommender(root / "data" / "model" / strategy)
                rows = {"base": rec} if variant == "base" else {"+enriched": rec}
                if args.items_only:
                    pass
                elif variant == "base":
                    rows["+profiles"] = AugmentedUsers(rec, fit, extras["profiles"])
                    rows["+cold synth"] = AugmentedUsers(rec, fit, extras["cold"])
                else:
                    rows["all"] = AugmentedUsers(rec, fit, both)
                for row, model in rows.items():
                    r = evaluate_recommender(model, fit, ev, seed=int(base["evaluate"]["seed"]))
                    results[(seed, strategy, row)] = r.metrics
                    per_user[(seed, strategy, row)] = (r.per_user, r.users)
                    print(f"  seed {seed} {strategy:<8} {row:<12} ndcg@10 {r.metrics['ndcg@10']:.4f}", flush=True)
            touched = set(extras["profiles"].users.tolist()) | set(extras["cold"].users.tolist())
            enriched_items = set(tables["items"][S.ITEM_ID].astype(str))
            # users with an enriched item among their test targets (where +enriched can act most)
            touched_items = {int(u) for u, t in zip(ev.users, ev.targets)
                             if enriched_items & {str(fit.item_ids[i]) for i in t}}
    order = ["base", "+enriched"] if args.items_only else ["base", "+enriched", "+profiles", "+cold synth", "all"]
    present = [m for m in METRICS if any(m in v for v in results.values())]
    print(f"\n## ablation on the {args.split} test split, seeds {args.seeds} (mean ± sd over seeds; "
          f"users with pseudo-items: {len(touched)}; users with an enriched item among their test "
          f"targets: {len(touched_items)})\n")
    print("| strategy | variant | " + " | ".join(present) +
          " | Δ nDCG@10 vs base, mean over seeds (paired t per seed) | Δ on the users it touches (n) |")
    print("|---|---|" + "---:|" * (len(present) + 2))
    out = {}
    for strategy in args.strategies:
        for row in order:
            deltas, ts, touched_d = [], [], []
            for seed in args.seeds:
                b_pu, _ = per_user[(seed, strategy, "base")]
                pu, us = per_user[(seed, strategy, row)]
                d, se, t = paired(b_pu["ndcg@10"], pu["ndcg@10"])
                mask = np.isin(us["ndcg@10"], list(touched if row in ("+profiles", "+cold synth") else
                                                   touched_items if row == "+enriched" else touched | touched_items))
                d2, _, _ = paired(b_pu["ndcg@10"][mask], pu["ndcg@10"][mask])
                deltas.append(d), ts.append(t), touched_d.append(d2)
            cells = []
            for k in present:
                vals = [results[(seed, strategy, row)].get(k) for seed in args.seeds]
                vals = [v for v in vals if v is not None]
                cells.append(f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.4f}"
                             if vals else "")
            delta = ("" if row == "base" else
                     f"{np.mean(deltas):+.4f} (t {', '.join(f'{t:+.1f}' for t in ts)})")
            near = "" if row == "base" else f"{np.nanmean(touched_d):+.4f} (n={int(mask.sum())})"
            print(f"| {strategy} | {row} | " + " | ".join(cells) + f" | {delta} | {near} |")
            out[f"{strategy}/{row}"] = {
                "seeds": list(args.seeds),
                "metrics": {k: [results[(seed, strategy, row)].get(k) for seed in args.seeds] for k in present},
                "delta_ndcg@10": deltas, "delta_t": ts, "delta_augmented_users": touched_d,
                "n_augmented_users": int(mask.sum())}
    dest = project / ".cache" / "bench_augment" / args.split / "ablation.json"
    dest.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
