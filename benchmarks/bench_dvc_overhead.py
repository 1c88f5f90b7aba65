"""Overhead of running a stage through DVC in a run workspace vs calling it directly.

    python benchmarks/bench_dvc_overhead.py [--repeats 3] [--stages validate preprocess]

A scratch project (tiny config, 60 users) with a folder DVC remote; one run workspace gets the
upstream stages, then per stage, side by side and alternating, ``--repeats`` times:

* ``direct``: ``genre <stage>`` in the workspace (the work, no DVC);
* ``dvc``: what an Airflow task does when the stage must be computed:
  ``dvc repro --single-item --force <stage>`` + ``dvc push <stage> --run-cache``;
* ``no-change``: ``workspace.run_stage`` again with nothing changed (DVC skips it);
* ``run-cache``: the same stage in a NEW workspace with the same params (a second trigger):
  restored from the DVC run-cache, nothing computed.

Prints medians (seconds) and the dvc/direct ratio. The machine is shared: the load average is
printed first; compare ratios from one run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))

from genre_tasks.registry import workspace as W  # noqa: E402
from genre_tasks.config import deep_merge  # noqa: E402

#: dvc.yaml's stages in order (the ones before the measured stages run once, upstream)
ORDER = ["source", "ingest", "validate", "preprocess", "augment", "embed", "genre", "train", "evaluate", "promote"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", nargs="+", default=["validate", "preprocess"])
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
    os.environ.pop("GENRE_PARAMS_OVERRIDE", None)
    for k in (W.WORKSPACES_ENV, W.CACHE_ENV, W.REMOTE_URL_ENV):
        os.environ.pop(k, None)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    project = tmp / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "genre_tasks", project / "genre_tasks", ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = true\n    remote = r\n['remote \"r\"']\n    url = {tmp / 'remote'}\n")
    params = deep_merge(W.effective_params(project), yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    ws = W.create(W.workspace(project, "bench"), params)
    last = max(ORDER.index(s) for s in args.stages)
    for stage in ORDER[:last]:
        W.run_stage(ws, stage)
    env = W.dvc_env(ws)
    rows = []
    for stage in args.stages:
        t: dict[str, list[float]] = {"direct": [], "dvc": [], "no-change": [], "run-cache": []}
        for i in range(args.repeats):
            def direct():
                subprocess.run(["genre", stage], cwd=ws.path, env=env, check=True, capture_output=True)

            def via_dvc():
                W.dvc(ws, "repro", "--single-item", "--force", stage, env=env)
                W.dvc(ws, "push", stage, "--run-cache", env=env)

            order = [("direct", direct), ("dvc", via_dvc)]
            for name, fn in (order if i % 2 == 0 else order[::-1]):
                t[name].append(timed(fn))
            t["no-change"].append(timed(lambda: W.run_stage(ws, stage)))
            fresh = W.create(W.workspace(project, f"bench-{stage}-{i}"), params)
            shutil.copyfile(ws.lock_file, fresh.lock_file)  # the run's lock, as a new run would have it
            result: dict = {}
            t["run-cache"].append(timed(lambda: result.update(W.run_stage(fresh, stage))))
            assert not result["computed"], result
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append((stage, med))
    print(f"\n{'stage':<12} {'direct':>8} {'dvc':>8} {'dvc/direct':>11} {'no-change':>10} {'run-cache':>10}  (median s, {args.repeats} repeats)")
    for stage, m in rows:
        print(f"{stage:<12} {m['direct']:>8.2f} {m['dvc']:>8.2f} {m['dvc'] / m['direct']:>10.2f}x "
              f"{m['no-change']:>10.2f} {m['run-cache']:>10.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
