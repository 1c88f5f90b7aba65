"""Benchmark of the feedback loop: from a feedback batch landing to a promotion decision.

    python benchmarks/bench_feedback.py                       # ~5 min on 2 cores
    python benchmarks/bench_feedback.py --repeats 1 --max-users 60 --keep /tmp/bench-fb
    python benchmarks/bench_feedback.py --config default --max-users 0 --epochs 0 \
        --strategies "" --paths c,b --repeats 1            # MovieLens-100k as params.yaml has it

Setup, in a scratch project (params.yaml [+ configs/tiny.yaml] + ``ingest.max_users`` users,
``ingest.until`` = the replay cutoff, ``train.strategies``, ``train.epochs``; its own sqlite
MLflow under the scratch folder):

1. ``genre feedback replay --init`` (weekly batches from the cutoff on);
2. the pipeline source -> evaluate once, then ``genre promote --force``: the first champion;
3. ``genre feedback replay --next`` (the first weekly batch lands), then
   ``genre feedback run --no-dvc`` (validate + prequential scoring of the champion + apply to
   the store). This state is snapshotted.

Timed, from that snapshot (restored in place before every repeat, so each run decides against
the same champion), every stage source -> promote as subprocesses (what ``dvc repro`` runs
after the store changed; DVC's own bookkeeping and Airflow's are not included):

(a) full retrain (``train.mode: full``), cold cache: ``.cache/embeddings`` deleted first, so
    embed and genre encode every text again;
(b) full retrain, warm cache: embed / genre encode only new or changed texts (a MovieLens
    replay batch adds no items: 0 texts);
(c) warm-start retrain (``train.mode: warm``, what an asset-triggered training run does by
    ``train.retrain_mode``), warm cache.

Prints a markdown table: path, seconds to decision (median over ``--repeats``), per-stage
seconds (wall time of each ``genre <stage>`` process, interpreter start-up included), texts
encoded by embed, and the promote decision. Timings on a shared machine are noisy (load
averages are printed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genre_tasks.config import deep_merge  # noqa: E402

BIN = Path(sys.executable).parent
STAGES = ["source", "ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate",
          "promote"]
CUTOFF = "1998-03-02"


def env_for(root: Path) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": "PASSIVE", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for var in ("GENRE_PARAMS_OVERRIDE", "GENRE_MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI",
                "GENRE_MLFLOW_ARTIFACTS", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    return env


def genre(root: Path, *args: str) -> tuple[dict, float]:
    """Run ``genre --root root --params root/params.yaml args``; (JSON summary, wall seconds)."""
    cmd = [str(BIN / "genre"), "--root", str(root), "--params", str(root / "params.yaml"), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True,
                          timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    out = _last_json(proc.stdout)
    if isinstance(out, dict):
        out["_stderr"] = proc.stderr
    return out, seconds


def _last_json(stdout: str) -> dict:
    """The stage's JSON summary: the last top-level ``{ ... }`` block of stdout (libraries such
    as MLflow may print lines before it)."""
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return {"stdout": stdout[-500:]}


def build(root: Path, max_users: int | None, epochs: int | None, tiny: bool = True,
          strategies: list[str] | None = None) -> dict:
    """Scratch project up to the batch being applied (steps 1-3); returns setup timings."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if tiny:
        params = deep_merge(params, yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    train = {k: v for k, v in (("strategies", strategies), ("epochs", epochs)) if v}
    params = deep_merge(params, {
        "ingest": {"max_users": max_users, "until": CUTOFF},
        "embed": {"show_progress": False},
        "train": train,
        "feedback": {"dvc": False, "dvc_push": False},
    })
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(ROOT / "configs", root / "configs", dirs_exist_ok=True)
    setup = {}
    t0 = time.perf_counter()
    genre(root, "source")  # replay --init reads the dataset from data/source
    genre(root, "feedback", "replay", "--init")
    for stage in STAGES[1:-1]:
        genre(root, stage)
    genre(root, "tracking-init")
    genre(root, "promote", "--force", "--reason", "bench_feedback: first champion")
    champion = json.loads((root / "metrics" / "promote.json").read_text())
    setup["first champion (s)"] = round(time.perf_counter() - t0, 1)
    released, _ = genre(root, "feedback", "replay", "--next")
    t1 = time.perf_counter()
    applied, _ = genre(root, "feedback", "run", "--no-dvc")
    setup["feedback run (validate + prequential + apply) (s)"] = round(time.perf_counter() - t1, 1)
    setup["batch"] = released.get("released_now")
    setup["batch rows"] = released.get("rows")
    setup["champion version"] = champion.get("version")
    setup["feedback run"] = {k: applied[k] for k in ("applied", "quarantined") if k in applied}
    return setup


def restore(snapshot: Path, root: Path) -> None:
    """Put the project back exactly as in ``snapshot`` (same absolute path: MLflow's artifact
    URIs in the sqlite database stay valid)."""
    shutil.rmtree(root)
    shutil.copytree(snapshot, root, symlinks=True)


def timed_path(root: Path, cold: bool, mode: str = "full") -> dict:
    if cold:
        shutil.rmtree(root / ".cache" / "embeddings", ignore_errors=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["mode"] = mode  # warm: the feedback retrain, from the @champion's weights
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    per_stage = {}
    summaries = {}
    for stage in STAGES:
        summaries[stage], per_stage[stage] = genre(root, stage)
    promote = json.loads((root / "metrics" / "promote.json").read_text())  # the decision record
    return {"total": sum(per_stage.values()), "stages": per_stage,
            "decision": promote.get("decision"), "version": promote.get("version"),
            "champion_before": promote.get("champion_version_before"),
            "gain": promote.get("gain"), "ci_lower": promote.get("ci_lower"),
            "embed_encoded": summaries["embed"].get("n_texts_encoded"),
            "genre_encoded": _genre_encoded(summaries["genre"].get("_stderr", ""))}


def _genre_encoded(stderr: str) -> int | None:
    """Feature texts the genre stage encoded (its log: '<cached>/<unique> unique feature texts
    cached')."""
    m = re.search(r"(\d+)/(\d+) unique feature texts cached", stderr)
    return int(m.group(2)) - int(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-users", type=int, default=100, help="users sliced (0 = all)")
    ap.add_argument("--epochs", type=int, default=5, help="train.epochs (0 = as in the config)")
    ap.add_argument("--config", choices=["tiny", "default"], default="tiny",
                    help="params.yaml + configs/tiny.yaml, or params.yaml as it is")
    ap.add_argument("--strategies", default="hybrid", help="comma-separated train.strategies ('' = as in the config)")
    ap.add_argument("--paths", default="a,b", help="which paths to time: a (full, cold cache), "
                    "b (full, warm cache), c (warm-start retrain from @champion, warm cache)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default=None, help="scratch folder to use and keep (default: a temp dir)")
    args = ap.parse_args(argv)

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    root, snapshot = base / "project", base / "snapshot"
    for p in (root, snapshot):
        shutil.rmtree(p, ignore_errors=True)
    print(f"uptime: {os.getloadavg()} (load averages), scratch {base}", file=sys.stderr)
    setup = build(root, args.max_users or None, args.epochs or None, tiny=args.config == "tiny",
                  strategies=[x for x in args.strategies.split(",") if x] or None)
    shutil.copytree(root, snapshot, symlinks=True)
    print(f"setup: {json.dumps(setup)}", file=sys.stderr)

    labels = {"a": "(a) full retrain, cold cache", "b": "(b) full retrain, warm cache",
              "c": "(c) warm-start retrain (train.mode warm), warm cache"}
    runs: dict[str, list[dict]] = {labels[k]: [] for k in args.paths.split(",")}
    for r in range(args.repeats):
        for label in runs:  # interleaved, so drifting machine load hits both alike
            restore(snapshot, root)
            res = timed_path(root, cold=label.startswith("(a)"),
                             mode="warm" if label.startswith("(c)") else "full")
            runs[label].append(res)
            print(f"repeat {r + 1} {label}: {res['total']:.1f} s, decision {res['decision']}",
                  file=sys.stderr)

    print(f"\nfeedback batch {setup['batch']} ({setup['batch rows']} rows, "
          f"{args.max_users or 'all'} users, config {args.config}) -> promotion decision; champion v{setup['champion version']}; "
          f"median of {args.repeats} repeat(s); load avg {os.getloadavg()[0]:.2f}\n")
    head = "| path | seconds to decision | " + " | ".join(STAGES) + " | texts encoded (embed / genre) | decision |"
    print(head)
    print("|" + "---|" * (len(STAGES) + 4))
    for label, rs in runs.items():
        total = statistics.median(r["total"] for r in rs)
        stages = [statistics.median(r["stages"][s] for r in rs) for s in STAGES]
        decisions = ", ".join(sorted({f"{r['decision']} (gain {r['gain']:+.4f}, lower bound "
                                      f"{r['ci_lower']:+.4f})" if r.get("gain") is not None
                                      else str(r["decision"]) for r in rs}))
        enc = f"{rs[0]['embed_encoded']} / {rs[0]['genre_encoded']}"
        print(f"| {label} | {total:.1f} | " + " | ".join(f"{s:.1f}" for s in stages)
              + f" | {enc} | {decisions} |")
    print(f"\nsetup (not timed above): first champion {setup['first champion (s)']} s; "
          f"`genre feedback run --no-dvc` {setup['feedback run (validate + prequential + apply) (s)']} s; "
          f"{setup['feedback run']}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
