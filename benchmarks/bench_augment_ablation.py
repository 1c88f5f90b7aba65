"""Ablation of the GENRE augmentation on the evaluation protocol's test split.

    python benchmarks/bench_augment_ablation.py [--root .] [--split user_temporal] [--strategies content hybrid]

Needs the project's data/raw + data/validation (genre source/ingest/validate) and data/augment
from an augment run (e.g. `genre --override configs/genre.yaml augment`). Two scratch roots
under .cache/bench_augment/<split>/ (base, enriched) run preprocess -> embed -> train with the
project's params (genre stage skipped: MovieLens items all have genres), the enriched one with
embed.augmented_text=append. Rows per strategy, all on the same test users and seeds:

  base          the model on the original item text
  +enriched     trained on original + enriched item text (items the augment run covered)
  +profiles     base model, user profiles as pseudo-items in the user tower (users covered)
  +cold synth   base model, cold users' synthetic items as pseudo-items
  all           enriched model + profiles + synthetic items

Prints every metric of the protocol, the paired nDCG@10 difference vs base (mean, se, t) over
all test users and over the users the augmentation touched, and writes the numbers to
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
    results: dict = {}
    per_user: dict = {}
    for variant, text in (("base", "none"), ("enriched", "append")):
        root = scratch(project, args.split, variant, fresh=not args.reuse)
        params = deep_merge(base, {"preprocess": {"split": {"mode": args.split}},
                                   "embed": {"augmented_text": text, "show_progress": False},
                                   "train": {"strategies": list(args.strategies)}})
        t0 = time.perf_counter()
        for stage in ("preprocess", "embed", "train"):
            if args.reuse and stage == "train" and (root / "metrics" / "train.json").exists():
                continue
            run_stage(stage, params, root)
        print(f"{variant}: preprocess/embed/train {time.perf_counter() - t0:.0f} s", flush=True)
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
            if variant == "base":
                rows["+profiles"] = AugmentedUsers(rec, fit, extras["profiles"])
                rows["+cold synth"] = AugmentedUsers(rec, fit, extras["cold"])
            else:
                rows["all"] = AugmentedUsers(rec, fit, both)
            for row, model in rows.items():
                r = evaluate_recommender(model, fit, ev, seed=int(base["evaluate"]["seed"]))
                results[(strategy, row)] = r.metrics
                per_user[(strategy, row)] = (r.per_user, r.users)
                print(f"  {strategy:<8} {row:<12} ndcg@10 {r.metrics['ndcg@10']:.4f}", flush=True)
        touched = set(extras["profiles"].users.tolist()) | set(extras["cold"].users.tolist())
        enriched_items = set(tables["items"][S.ITEM_ID].astype(str))
        # users with an enriched item among their test targets (where +enriched can act most)
        touched_items = {int(u) for u, t in zip(ev.users, ev.targets)
                         if enriched_items & {str(fit.item_ids[i]) for i in t}}
    order = ["base", "+enriched", "+profiles", "+cold synth", "all"]
    present = [m for m in METRICS if any(m in v for v in results.values())]
    print(f"\n## ablation on the {args.split} test split (users with pseudo-items: {len(touched)}; "
          f"users with an enriched item among their test targets: {len(touched_items)})\n")
    print("| strategy | variant | " + " | ".join(present) + " | Δ nDCG@10 vs base (se, t) | Δ on the users it touches |")
    print("|---|---|" + "---:|" * (len(present) + 2))
    out = {}
    for strategy in args.strategies:
        b_pu, b_users = per_user[(strategy, "base")]
        for row in order:
            m = results[(strategy, row)]
            pu, us = per_user[(strategy, row)]
            d, se, t = paired(b_pu["ndcg@10"], pu["ndcg@10"])
            mask = np.isin(us["ndcg@10"], list(touched if row in ("+profiles", "+cold synth") else
                                               touched_items if row == "+enriched" else touched | touched_items))
            d2, se2, t2 = paired(b_pu["ndcg@10"][mask], pu["ndcg@10"][mask])
            cells = []
            for k in present:
                v = m.get(k)
                se_k = m.get(f"{k}_se")
                cells.append("" if v is None else (f"{v:.4f} ± {se_k:.4f}" if k.endswith("ndcg@10") and se_k
                                                     else f"{v:.4f}"))
            print(f"| {strategy} | {row} | " + " | ".join(cells) +
                  f" | {d:+.4f} ({se:.4f}, {t:+.1f}) | {d2:+.4f} ({se2:.4f}, n={int(mask.sum())}) |")
            out[f"{strategy}/{row}"] = {**{k: m.get(k) for k in m}, "delta_ndcg@10": d, "delta_se": se,
                                        "delta_augmented_users": d2, "n_augmented_users": int(mask.sum())}
    dest = project / ".cache" / "bench_augment" / args.split / "ablation.json"
    dest.write_text(json.dumps(out, indent=2, default=float))
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
