"""Quality on all three splits in one command: preprocess -> train -> evaluate per split mode.

    python benchmarks/bench_quality.py [--root .] [--modes user_temporal cold_items global_temporal]

Reuses the project's ingested/validated data and item vectors (run `dvc repro` first); each
split runs in its own scratch root under .cache/bench_quality/<mode>/ so the project's own
outputs are untouched. Prints the comparison table of every split (models vs baselines, with
user counts and standard errors) and, for user_temporal, whether the numbers equal those of the
project's last run (determinism: two clean runs must give identical test metrics).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from genre_tasks import schema as S
from genre_tasks.cli import run_stage
from genre_tasks.config import deep_merge, load_params
from genre_tasks.evaluation.evaluate import comparison_table

SHARED = ("data/raw", "data/validation", "data/embeddings", "data/genre", ".cache/embeddings")


def scratch_root(project: Path, mode: str) -> Path:
    root = project / ".cache" / "bench_quality" / mode
    if root.exists():
        shutil.rmtree(root)
    for rel in SHARED:
        src = project / rel
        if not src.exists():
            raise SystemExit(f"{src} missing: run `dvc repro` first")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src.resolve(), target_is_directory=src.is_dir())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--modes", nargs="+", default=list(S.SPLIT_MODES))
    args = parser.parse_args()
    project = Path(args.root).resolve()
    base = load_params(project / args.params)
    for mode in args.modes:
        root = scratch_root(project, mode)
        params = deep_merge(base, {"preprocess": {"split": {"mode": mode}}})
        seconds = {}
        for stage in ("preprocess", "train", "evaluate"):
            t0 = time.perf_counter()
            run_stage(stage, params, root)
            seconds[stage] = time.perf_counter() - t0
        result = json.loads((root / "metrics" / "evaluate.json").read_text())
        print(f"\n## split {mode}  (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")\n")
        print(comparison_table(result["models"], selected=result.get("selected")))
        if mode == "user_temporal":
            own = project / "metrics" / "evaluate.json"
            if own.exists():
                same = json.loads(own.read_text())["models"] == result["models"]
                print(f"\ndeterminism: test metrics {'IDENTICAL to' if same else 'DIFFER from'} "
                      f"the project's last run ({own})")


if __name__ == "__main__":
    main()
