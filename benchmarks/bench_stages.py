"""Wall time and peak memory of each pipeline stage on MovieLens-100k.

    python benchmarks/bench_stages.py [--stages source ingest ...] [--override configs/tiny.yaml]

Runs every stage as its own process (as `dvc repro` does) in a scratch project root
(.cache/bench_stages/, cold embedding cache), and reads each stage's peak RSS from the
one-line summary the stage logs. Prints a markdown table and the machine load.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from genre_tasks.cli import STAGES

DONE = re.compile(r"stage (\w+): done in ([\d.]+)s .*peak RSS (\d+) MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--stages", nargs="+", default=[s for s in STAGES if s != "promote"])
    args = parser.parse_args()
    project = Path.cwd()
    root = project / ".cache" / "bench_stages"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    genre = Path(sys.executable).parent / "genre"
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)")
    rows = []
    for stage in args.stages:
        cmd = [str(genre), "--root", str(root), "--params", str(project / args.params)]
        for override in args.override:
            cmd += ["--override", str(project / override)]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, stage], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
        match = DONE.search(proc.stderr)
        rows.append((stage, wall, float(match.group(2)) if match else float("nan"),
                     int(match.group(3)) if match else -1))
    print("\n| stage | wall s (process) | stage s (in-process) | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for stage, wall, inner, rss in rows:
        print(f"| {stage} | {wall:.1f} | {inner:.1f} | {rss} |")
    print(f"| **total** | {sum(r[1] for r in rows):.1f} | {sum(r[2] for r in rows):.1f} | "
          f"{max(r[3] for r in rows)} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
