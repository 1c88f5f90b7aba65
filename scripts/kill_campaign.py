"""Kill campaign over the first promote of a fresh project (issue: trustworthy promotion).

Builds one project on MovieLens-100k with configs/tiny.yaml (source .. evaluate through the
`genre` CLI), then for every trial starts from a copy with NO tracking store and runs what a
fresh machine runs — `genre tracking-init` then `genre promote` — SIGKILLing the process group

* at every log line the first promote prints (one trial per line),
* at random moments of `genre tracking-init` (the schema-creation window) and of promote.

After each kill it recovers the way a user would (re-run both commands) and checks: the
registry is usable, exactly one version is registered, @champion is loadable and recommends,
no bundle folder is left in .cache/promote. Prints one row per trial and a summary table.

    python scripts/kill_campaign.py [--random 10] [--work /tmp/kill-campaign]
        [--select ease --force]   # a first promote that moves @champion (forced, with a reason)
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENRE = [sys.executable, "-m", "genre_tasks.cli"]
#: extra arguments of every promote (--force: the first promote moves @champion)
PROMOTE_ARGS: list[str] = []


def genre(root: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*GENRE, "--root", str(root), "--params", str(ROOT / "params.yaml"),
           "--override", str(ROOT / "configs" / "tiny.yaml"), *args]
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res


def env_for(root: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("GENRE_MLFLOW_RUN_ID", None)
    env.pop("GENRE_PARAMS_OVERRIDE", None)
    return env


def build(base: Path, select: str | None = None) -> Path:
    project = base / "template"
    if (project / "data" / "manifests" / "evaluate.json").exists():
        return project
    project.mkdir(parents=True, exist_ok=True)
    env = env_for(project)
    for stage in ("source", "ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate"):
        t = time.perf_counter()
        genre(project, stage, env=env)
        print(f"  built {stage} ({time.perf_counter() - t:.1f} s)", flush=True)
    if select:  # another strategy the train stage trained, with the train record it leaves
        sys.path.insert(0, str(ROOT))
        from genre_tasks import io, manifests
        from genre_tasks.schema import Paths

        paths = Paths(project)
        io.write_json({"strategy": select, "selection_metric": "ndcg@10", "valid_ndcg@10": {}},
                      paths.model_dir / "selected.json")
        manifests.write(paths, "train", [paths.root / r for r in manifests.reads(paths, "train")],
                        [paths.model_dir])
        genre(project, "evaluate", env=env)
        print(f"  selected {select}", flush=True)
    return project


def fresh_copy(template: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(template, dst, ignore=shutil.ignore_patterns("mlflow.db*", "mlartifacts", ".cache"))
    shutil.copytree(template / ".cache" / "embeddings", dst / ".cache" / "embeddings",
                    dirs_exist_ok=True) if (template / ".cache" / "embeddings").exists() else None
    return dst


def run_and_kill(root: Path, args: list[str], env: dict, at_line: int | None = None,
                 at_seconds: float | None = None) -> tuple[str, list[str]]:
    """Start `genre <args>`, SIGKILL its process group at the ``at_line``-th log line or after
    ``at_seconds``; return (what happened, the lines seen)."""
    cmd = [*GENRE, "--root", str(root), "--params", str(ROOT / "params.yaml"),
           "--override", str(ROOT / "configs" / "tiny.yaml"), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines: list[str] = []
    started = time.perf_counter()
    killed = "finished before the kill"
    if at_seconds is not None:
        try:
            proc.wait(timeout=at_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = f"killed at {at_seconds:.2f} s"
        proc.wait()
        return killed, lines
    for line in proc.stderr:
        lines.append(line.rstrip())
        if at_line is not None and len(lines) == at_line:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = f"killed at line {at_line}: {line.strip()[:90]}"
            break
    proc.wait()
    _ = started
    return killed, lines


def check(root: Path, env: dict, model_name: str, expected: dict) -> dict:
    """Recover as a user would (re-run both commands), then the invariants: the registry is
    usable, one version, the same decision and aliases as an unkilled run, every alias loadable
    and recommending, no bundle folder left behind."""
    import json

    init = genre(root, "tracking-init", env=env, check=False)
    prom = genre(root, "promote", *PROMOTE_ARGS, env=env, check=False)
    out = {"recover_ok": init.returncode == 0 and prom.returncode == 0,
           "error": (init.stderr + prom.stderr)[-400:] if init.returncode or prom.returncode else ""}
    code = f"""
import json, mlflow, pandas as pd
from mlflow import MlflowClient
c = MlflowClient()
vs = c.search_model_versions("name='{model_name}'")
aliases = dict(c.get_registered_model('{model_name}').aliases)
ok = {{}}
for alias in aliases:
    m = mlflow.pyfunc.load_model(f"models:/{model_name}@{{alias}}")
    r = m.predict(pd.DataFrame({{"history": [["1", "50", "100"]], "k": [5]}}))
    ok[alias] = len(r["item_ids"][0]) == 5
print(json.dumps({{"versions": len(vs), "aliases": sorted(aliases), "loadable": all(ok.values())}}))
"""
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    usable = res.returncode == 0
    state = json.loads(res.stdout.strip().splitlines()[-1]) if usable else {}
    decision = json.loads((root / "metrics" / "promote.json").read_text())["decision"] \
        if (root / "metrics" / "promote.json").exists() else "?"
    leftovers = list((root / ".cache" / "promote").glob("*")) if (root / ".cache" / "promote").exists() else []
    out.update({"registry_usable": usable, "versions": state.get("versions", "?"),
                "aliases": state.get("aliases"), "aliases_loadable": bool(state.get("loadable")),
                "same_as_unkilled": state.get("aliases") == expected["aliases"]
                and (decision == expected["decision"] or decision == "unchanged"),
                "decision": decision, "leftover_bundles": len(leftovers),
                "check_error": res.stderr[-300:] if not usable else ""})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", type=int, default=10, help="random-time kills (half in tracking-init)")
    ap.add_argument("--work", default="/tmp/genre-kill-campaign")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select", help="select this trained strategy in the template (e.g. ease)")
    ap.add_argument("--force", action="store_true", help="promote --force --reason (moves @champion)")
    args = ap.parse_args()
    if args.force:
        PROMOTE_ARGS.extend(["--force", "--reason", "kill campaign: first champion"])
    base = Path(args.work)
    base.mkdir(parents=True, exist_ok=True)
    import yaml

    model_name = yaml.safe_load((ROOT / "params.yaml").read_text())["promote"]["model_name"]
    print("building the template project (tiny config) ...", flush=True)
    template = build(base, args.select)

    # a clean first promote: how long, and its log lines
    probe = fresh_copy(template, base / "probe")
    env = env_for(probe)
    t = time.perf_counter()
    genre(probe, "tracking-init", env=env)
    t_init = time.perf_counter() - t
    t = time.perf_counter()
    _, lines = run_and_kill(probe, ["promote", *PROMOTE_ARGS], env)
    t_promote = time.perf_counter() - t
    print(f"clean run: tracking-init {t_init:.1f} s, promote {t_promote:.1f} s, {len(lines)} log lines", flush=True)
    import json

    decision = json.loads((probe / "metrics" / "promote.json").read_text())["decision"]
    expected = {"decision": decision, "aliases": ["challenger", "champion"] if decision in ("promoted", "forced")
                else ["challenger"]}
    print(f"unkilled first promote: decision {decision}, aliases {expected['aliases']}", flush=True)

    # the schema-creation window is the tail of tracking-init (after the imports): time three
    # more clean inits now and aim the random kills at 30%..100% of the fastest
    inits = []
    for r in range(3):
        scratch = base / f"init-probe-{r}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        t = time.perf_counter()
        genre(scratch, "tracking-init", env=env_for(scratch))
        inits.append(time.perf_counter() - t)
    t_init = min(inits)
    print(f"tracking-init on a fresh folder: {', '.join(f'{x:.1f}' for x in inits)} s", flush=True)

    rng = random.Random(args.seed)
    trials: list[tuple[str, dict]] = []
    for i in range(1, len(lines) + 1):
        trials.append(("promote", {"at_line": i}))
    for j in range(args.random):
        if j % 2 == 0:
            trials.append(("tracking-init", {"at_seconds": rng.uniform(0.3 * t_init, t_init)}))
        else:
            trials.append(("promote", {"at_seconds": rng.uniform(1.0, t_promote)}))

    rows = []
    for n, (what, kill) in enumerate(trials, 1):
        root = fresh_copy(template, base / "trial")
        env = env_for(root)
        if what == "promote":
            genre(root, "tracking-init", env=env)
        happened, _ = run_and_kill(root, [what, *(PROMOTE_ARGS if what == "promote" else [])], env, **kill)
        res = check(root, env, model_name, expected)
        row = {"trial": n, "killed": what, "when": happened, **res}
        rows.append(row)
        print(f"{n:>3} {what:<14} {happened[:84]:<84} usable={res['registry_usable']} "
              f"versions={res['versions']} aliases={res['aliases']} loadable={res['aliases_loadable']} "
              f"same={res['same_as_unkilled']} leftovers={res['leftover_bundles']} "
              f"{res['error'][:160]} {res['check_error'][:160]}", flush=True)

    killed = [r for r in rows if r["when"].startswith("killed")]
    print("\n| trials | kills landed | unusable registries | duplicate versions | aliases not loadable | "
          "end state differs from an unkilled run | leftover bundles |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(rows)} | {len(killed)} | {sum(not r['registry_usable'] or not r['recover_ok'] for r in rows)} | "
          f"{sum(r['versions'] != 1 for r in rows)} | {sum(not r['aliases_loadable'] for r in rows)} | "
          f"{sum(not r['same_as_unkilled'] for r in rows)} | {sum(r['leftover_bundles'] for r in rows)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
