"""Degraded-challenger campaign against the registry gate (issue: trustworthy promotion).

On MovieLens-100k with the default params (or ``--tiny``): build the project once through the
`genre` CLI (source .. evaluate), then for each kind of degraded challenger put it in
data/model/ the way a training run would (trained with the library, saved, selected, the train
record written), run the real `genre evaluate` and `genre promote`, and record the decision:

    epochs1            1 training epoch
    dim2               embedding dimension 2
    shuffled_labels    trained on positives with item ids permuted
    shuffled_vectors   vectors.npy rows shuffled, then `genre train` on them
    popularity         the trained model with its user tower zeroed (item bias only)
    below_ease         another trained strategy above MostPop and below EASE
    ease_strategy      the genuinely better challenger: the `ease` strategy train trained
                       (better than every other model of the run, and than the champion)

each against an EMPTY registry and against a GOOD champion (the default model, forced in with a
reason because it does not beat EASE significantly). A genuinely better challenger is shown on
the synthetic genre-clustered project of the tests (``--synthetic``), where the content model
beats every baseline. Prints one row per case and a summary.

    python scripts/gate_campaign.py [--tiny] [--work /tmp/genre-gate-campaign]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def genre(root: Path, args: list[str], db: Path, overrides: list[str], check: bool = True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env.pop("GENRE_MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "genre_tasks.cli", "--root", str(root), "--params", str(ROOT / "params.yaml"),
           *[x for o in overrides for x in ("--override", o)], *args]
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SystemExit(f"genre {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res


def decision_of(res) -> tuple[str, str]:
    if res.returncode != 0:
        return "refused", res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else "?"
    out = json.loads(res.stdout[res.stdout.index("{"):])
    return out["decision"], "; ".join(out.get("reasons") or [])[:200]


def degraded(kind: str, paths, params: dict):
    """A TorchRecommender of ``kind`` fitted on the test-phase data (None for kinds made by
    the CLI)."""
    import torch

    from genre_tasks import config
    from genre_tasks.models import train
    from genre_tasks.models import views as D
    from genre_tasks.models import model as M

    p = config.section(train.TrainParams, "train", params)
    fit, _ = D.Dataset.load(paths).phase("test")
    strategy = json.loads((paths.model_dir / "selected.json").read_text())["strategy"]
    if kind == "epochs1":
        return M.fit_model(p, strategy, fit, None, epochs=1, show_progress=False).recommender
    if kind == "dim2":
        q = dataclasses.replace(p, dim=2)
        return M.fit_model(q, strategy, fit, None, epochs=p.epochs // 3 or 1, show_progress=False).recommender
    if kind == "shuffled_labels":
        perm = np.random.default_rng(0).permutation(fit.n_items)
        inv = np.argsort(perm)
        bad = dataclasses.replace(fit, histories=[perm[h] for h in fit.histories],
                                  positives=fit.positives[:, inv], seen=fit.seen[:, inv],
                                  popularity=fit.popularity[inv])
        return M.fit_model(p, strategy, bad, None, epochs=p.epochs // 3 or 1, show_progress=False).recommender
    if kind == "popularity":
        rec = M.load_recommender(paths.model_dir / strategy)
        with torch.no_grad():
            rec.net.user_proj.weight.zero_()
            rec.net.user_proj.bias.zero_()
        return rec
    raise ValueError(kind)


def put_model(paths, name: str, rec) -> None:
    """Save ``rec`` as data/model/<name>, select it and write the train record a training run
    leaves (same inputs as the last train run)."""
    from genre_tasks import io
    from genre_tasks.models import model as M

    d = paths.model_dir / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    M.save(rec, d)
    io.write_text("epoch,train_loss,valid_ndcg@10\n", d / "curve.csv")
    select_strategy(paths, name)


def select_strategy(paths, name: str) -> None:
    """Select another strategy the train stage trained (and write its train record)."""
    from genre_tasks import io, manifests

    io.write_json({"strategy": name, "selection_metric": "ndcg@10", "valid_ndcg@10": {}},
                  paths.model_dir / "selected.json")
    reads = [paths.root / r for r in manifests.reads(paths, "train")]
    manifests.write(paths, "train", reads, [paths.model_dir])


def select_below_ease(paths, champion_strategy: str | None) -> str:
    """Select a trained strategy whose test nDCG@10 lies between MostPop and EASE (not the
    champion's), and write the train record for that selection."""
    from genre_tasks import io

    ev = io.read_json(paths.metrics("evaluate"))["models"]
    lo, hi = ev["MostPop"]["ndcg@10"], ev["EASE"]["ndcg@10"]
    kinds = io.read_json(paths.metrics("evaluate"))["kinds"]
    picks = [n for n, k in kinds.items() if k == "strategy" and n != champion_strategy
             and lo < ev[n]["ndcg@10"] < hi]
    if not picks:
        raise SystemExit(f"no trained strategy between MostPop {lo:.4f} and EASE {hi:.4f}: {ev}")
    name = max(picks, key=lambda n: ev[n]["ndcg@10"])
    select_strategy(paths, name)
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="configs/tiny.yaml instead of the default params")
    ap.add_argument("--work", default="/tmp/genre-gate-campaign")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--only", nargs="*", help="run only these kinds (default: all)")
    args = ap.parse_args()

    from genre_tasks import config, io
    from genre_tasks import schema as S

    overrides = [str(ROOT / "configs" / "tiny.yaml")] if args.tiny else []
    params = config.load_params(ROOT / "params.yaml", overrides)
    work = Path(args.work)
    template = work / "template"
    template.mkdir(parents=True, exist_ok=True)
    scratch_db = work / "scratch.db"
    if not (template / "data" / "manifests" / "evaluate.json").exists():
        genre(template, ["tracking-init"], scratch_db, overrides)
        for stage in ("source", "ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate"):
            genre(template, [stage], scratch_db, overrides)
            print(f"built {stage}", flush=True)
    default_strategy = io.read_json(template / "data" / "model" / "selected.json")["strategy"]
    ev = io.read_json(template / "metrics" / "evaluate.json")["models"]
    print("test nDCG@10 of the built project: " + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in ev.items()))

    def fresh(name: str) -> S.Paths:
        dst = work / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(template, dst, ignore=shutil.ignore_patterns(".cache"))
        if (template / ".cache" / "embeddings").exists():
            shutil.copytree(template / ".cache" / "embeddings", dst / ".cache" / "embeddings")
        return S.Paths(dst)

    kinds = ["epochs1", "dim2", "shuffled_labels", "shuffled_vectors", "popularity", "below_ease"]
    better = ["ease_strategy"]  # the EASE strategy: better than every other model of the run
    run_kinds = [k for k in kinds + better if not args.only or k in args.only]
    rows = []
    # the first decision of the default project: its own selected model, empty registry
    paths = fresh("first")
    db = work / "first.db"
    db.unlink(missing_ok=True)
    genre(paths.root, ["tracking-init"], db, overrides)
    res = genre(paths.root, ["promote"], db, overrides, check=False)
    first = io.read_json(paths.metrics("promote")) if res.returncode == 0 else {}
    print("first decision of the default project (empty registry):\n  " + (first.get("description") or res.stderr[-800:]),
          flush=True)
    rows.append({"registry": "empty", "kind": f"default ({default_strategy})",
                 "model ndcg@10": ev[default_strategy]["ndcg@10"], "EASE": ev.get("EASE", {}).get("ndcg@10"),
                 "MostPop": ev.get("MostPop", {}).get("ndcg@10"), "decision": decision_of(res)[0],
                 "why": decision_of(res)[1]})
    for registry in ("empty", "champion"):
        for kind in run_kinds:
            paths = fresh("case")
            db = work / f"{registry}-{kind}.db"
            db.unlink(missing_ok=True)
            genre(paths.root, ["tracking-init"], db, overrides)
            champion = None
            if registry == "champion":
                r = genre(paths.root, ["promote", "--force", "--reason", "campaign: the default model as champion"],
                          db, overrides)
                champion = decision_of(r)
            if kind == "shuffled_vectors":
                vec = np.load(paths.vectors)
                io.save_npy(vec[np.random.default_rng(0).permutation(len(vec))], paths.vectors)
                genre(paths.root, ["train"], db, overrides)
            elif kind == "below_ease":
                select_below_ease(paths, champion_strategy=default_strategy if registry == "champion" else None)
            elif kind == "ease_strategy":
                select_strategy(paths, "ease")
            else:
                put_model(paths, kind, degraded(kind, paths, params))
            genre(paths.root, ["evaluate"], db, overrides, check=kind != "shuffled_vectors")
            res = genre(paths.root, ["promote"], db, overrides, check=False)
            decision, why = decision_of(res)
            measured = io.read_json(paths.metrics("evaluate"))["models"]
            sel = io.read_json(paths.model_dir / "selected.json")["strategy"]
            row = {"registry": registry, "kind": kind, "model ndcg@10": measured.get(sel, {}).get("ndcg@10"),
                   "EASE": measured.get("EASE", {}).get("ndcg@10"), "MostPop": measured.get("MostPop", {}).get("ndcg@10"),
                   "decision": decision, "why": why, "champion": champion}
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)

    if not args.skip_synthetic:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_promote import TINY_TRAIN, build_data

        from genre_tasks.evaluation import evaluate
        from genre_tasks.models import train

        syn = work / "synthetic"
        if syn.exists():
            shutil.rmtree(syn)
        paths = build_data(syn)
        train.run(train.TrainParams(**TINY_TRAIN), paths)
        evaluate.run(evaluate.EvaluateParams(itemknn_k=(10, 50), ease_lambda=(10.0, 100.0, 500.0)), paths)
        db = work / "synthetic.db"
        db.unlink(missing_ok=True)
        genre(syn, ["tracking-init"], db, [])
        res = genre(syn, ["promote"], db, [], check=False)
        decision, why = decision_of(res)
        measured = io.read_json(paths.metrics("evaluate"))["models"]
        row = {"registry": "empty", "kind": "genuinely_better (synthetic)",
               "model ndcg@10": measured["content"]["ndcg@10"], "EASE": measured["EASE"]["ndcg@10"],
               "MostPop": measured["MostPop"]["ndcg@10"], "decision": decision, "why": why}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)

    print("\n| registry | challenger | nDCG@10 | EASE | MostPop | decision | reason (first) |")
    print("|---|---|---:|---:|---:|---|---|")
    for r in rows:
        f = (lambda v: f"{v:.4f}" if isinstance(v, float) else "–")
        print(f"| {r['registry']} | {r['kind']} | {f(r['model ndcg@10'])} | {f(r['EASE'])} | {f(r['MostPop'])} | "
              f"{r['decision']} | {r['why'].split(';')[0][:150]} |")
    bad_rows = [r for r in rows if r["kind"] in kinds]
    bad_promoted = sum(r["decision"] in ("promoted", "forced") for r in bad_rows)
    print(f"\ndegraded challengers promoted: {bad_promoted} of {len(bad_rows)}"
          f" (default model of the template: {default_strategy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
