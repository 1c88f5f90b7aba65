"""Orchestration overhead: the same pipeline through Airflow, DVC and the plain `genre` CLI.

    python benchmarks/bench_orchestration.py                # 1 repeat (~6-10 min on 2 cores)
    python benchmarks/bench_orchestration.py --repeats 3    # medians over 3 repeats
    python benchmarks/bench_orchestration.py --cold         # embed from scratch in every run

Every run gets its own scratch copy of the project (dvc.yaml, params.yaml, configs/,
genre_tasks/, dags/, scripts/) with the same tiny configuration written into its params.yaml
(configs/tiny.yaml + ``--max-users`` users, content strategy only, ``--epochs`` epochs), its own
MLflow database and (Airflow) its own AIRFLOW_HOME:

* ``genre CLI``: ``genre <stage>`` for the 9 stages in order: the work without an orchestrator;
* ``dvc repro``: the stages of dvc.yaml (one ``genre`` process per stage, plus DVC's hashing);
* ``airflow dags test``: the genre_training DAG in-process (``scripts/airflow.sh dags test``,
  after ``scripts/airflow.sh init``, which is timed separately), plus the DAG's extra tasks
  (start/finish of the MLflow run).

Unless ``--cold``, the item-embedding cache is filled once beforehand and copied into every
scratch project, so the MiniLM encoding (identical in all runners) does not drown the
orchestration cost. Runners alternate order across repeats; the table shows medians and ratios
measured side by side (the machine is shared: check the load average printed first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY = ("dvc.yaml", "params.yaml", "configs", "genre_tasks", "dags", "scripts")
STAGES = ("source", "ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate", "promote")
DAG_ID = "genre_training"


def merged_params(max_users: int, epochs: int) -> dict:
    from genre_tasks.config import deep_merge

    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    return deep_merge(params, {"ingest": {"max_users": max_users},
                               "train": {"strategies": ["content"], "epochs": epochs}})


def scratch_copy(dst: Path, params: dict, cache: Path | None) -> Path:
    dst.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if cache is not None and cache.exists():
        shutil.copytree(cache, dst / ".cache" / "embeddings")
    return dst


def env_for(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GENRE_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
                "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
                "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"})
    return env


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 3600) -> tuple[float, str]:
    """Run ``cmd``; return (wall seconds, output). Raises with the output tail on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def json_line(text: str):
    lines = [line for line in text.splitlines() if line.startswith("[")]
    return json.loads(lines[-1]) if lines else []


def warm_cache(work: Path, params: dict) -> Path:
    """Run the stages up to embed once; return the filled embedding cache folder."""
    project = scratch_copy(work / "warmup", params, None)
    env = env_for(project)
    for stage in STAGES[:STAGES.index("embed") + 1]:
        sh(["genre", stage], project, env)
    return project / ".cache" / "embeddings"


def run_cli(project: Path) -> dict:
    env = env_for(project)
    sh(["genre", "tracking-init"], project, env)  # once per project, as make run/repro do
    t0 = time.perf_counter()
    stage_seconds = {}
    for stage in STAGES:
        stage_seconds[stage], _ = sh(["genre", stage], project, env)
    return {"wall": time.perf_counter() - t0, "stages": stage_seconds}


def run_dvc(project: Path) -> dict:
    env = env_for(project)
    sh(["git", "init", "-q"], project, env)
    sh(["dvc", "init", "-q"], project, env)
    sh(["genre", "tracking-init"], project, env)
    wall, out = sh(["dvc", "repro"], project, env)
    return {"wall": wall, "ran": out.count("Running stage")}


def run_airflow(project: Path) -> dict:
    env = env_for(project)
    script = ["bash", str(project / "scripts" / "airflow.sh")]
    init, _ = sh([*script, "init"], project, env)
    wall, _ = sh([*script, "dags", "test", DAG_ID, "--conf", "{}"], project, env)
    _, runs = sh([*script, "dags", "list-runs", DAG_ID, "-o", "json"], project, env)
    run_id = json_line(runs)[-1]["run_id"]
    _, states = sh([*script, "tasks", "states-for-dag-run", DAG_ID, run_id, "-o", "json"], project, env)
    from datetime import datetime

    tasks = {}
    for row in json_line(states):
        a, b = row.get("start_date"), row.get("end_date")
        tasks[row["task_id"]] = {"state": row["state"], "seconds": (
            (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds() if a and b else None)}
    bad = {t: v["state"] for t, v in tasks.items() if v["state"] != "success"}
    if bad:
        raise RuntimeError(f"airflow run {run_id}: tasks not successful: {bad}")
    return {"wall": wall, "init": init, "tasks": tasks,
            "task_sum": sum(v["seconds"] or 0.0 for v in tasks.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-users", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="no pre-filled embedding cache")
    ap.add_argument("--runners", nargs="+", default=["cli", "dvc", "airflow"],
                    choices=["cli", "dvc", "airflow"])
    ap.add_argument("--scratch", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args(argv)

    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"on {os.cpu_count()} cpus")
    work = Path(tempfile.mkdtemp(prefix="bench-orch-", dir=args.scratch))
    params = merged_params(args.max_users, args.epochs)
    results: dict[str, list[dict]] = {r: [] for r in args.runners}
    runners = {"cli": run_cli, "dvc": run_dvc, "airflow": run_airflow}
    try:
        cache = None
        if not args.cold:
            t0 = time.perf_counter()
            cache = warm_cache(work, params)
            print(f"warm-up (stages up to embed, fills the embedding cache): {time.perf_counter() - t0:.1f} s")
        for rep in range(args.repeats):
            order = args.runners if rep % 2 == 0 else list(reversed(args.runners))
            for name in order:
                project = scratch_copy(work / f"{name}-{rep}", params, cache)
                res = runners[name](project)
                results[name].append(res)
                print(f"repeat {rep + 1}/{args.repeats} {name:<8} wall {res['wall']:7.1f} s")
                if not args.keep:
                    shutil.rmtree(project, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(r["wall"] for r in rs) for name, rs in results.items() if rs}
    base = med.get("cli")
    dvc = med.get("dvc")
    labels = {"cli": "genre CLI (9 processes)", "dvc": "dvc repro", "airflow": "airflow dags test"}
    print()
    print(f"median wall time over {args.repeats} repeat(s), {args.max_users} users, content, "
          f"{args.epochs} epochs, {'cold' if args.cold else 'warm'} embedding cache")
    print(f"| {'runner':<26} | {'wall s':>7} | {'/ CLI':>6} | {'/ dvc':>6} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 8}|{'-' * 8}|")
    for name, wall in med.items():
        r_cli = f"{wall / base:.2f}" if base else "-"
        r_dvc = f"{wall / dvc:.2f}" if dvc else "-"
        print(f"| {labels[name]:<26} | {wall:7.1f} | {r_cli:>6} | {r_dvc:>6} |")
    if results.get("airflow"):
        a = results["airflow"]
        init = statistics.median(r["init"] for r in a)
        task_sum = statistics.median(r["task_sum"] for r in a)
        wall = statistics.median(r["wall"] for r in a)
        n = len(a[0]["tasks"])
        print()
        print(f"airflow: `init` (db migrate, once per AIRFLOW_HOME) {init:.1f} s; sum of the {n} task "
              f"durations {task_sum:.1f} s; outside tasks (CLI start, DAG parse, scheduling loop) "
              f"{wall - task_sum:.1f} s = {(wall - task_sum) / n:.1f} s per task")
        print("per task (median s): " + ", ".join(
            f"{t} {statistics.median(r['tasks'][t]['seconds'] or 0.0 for r in a):.1f}" for t in a[0]["tasks"]))
    if results.get("cli"):
        c = results["cli"]
        print("genre CLI per stage (median s, incl. process start): " + ", ".join(
            f"{s} {statistics.median(r['stages'][s] for r in c):.1f}" for s in STAGES))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "median_wall": med, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
