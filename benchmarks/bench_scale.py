"""Scale test: a synthetic MovieLens-100k-shaped data set at 1x, 10x, 100x, run through the stages.

    python benchmarks/bench_scale.py --scales 1 10            # real encoder, every stage
    python benchmarks/bench_scale.py --scales 100 --generate-only

The generator writes the tabular layout (``data/source/items.csv``: item_id, title, genres, text;
``interactions.csv``: user_id, item_id, timestamp, rating) with MovieLens-100k's shape times the
scale (1,682 items, 943 users, 100,000 ratings at 1x), long-tailed like it: item popularity is
Zipf-like (weight ~ 1 / rank^a, a = 1.0), user activity is a power law with at least 20 ratings per
user (MovieLens' minimum), ratings 1..5 with MovieLens' marginal distribution, per-user increasing
timestamps. It prints the head/tail shares so the tail can be checked.

Each scale runs in its own scratch root (``--workdir``, default a temp folder) with ``genre --root
<scratch> <stage>`` (the changes merged into the scratch root's params.yaml) for source, ingest, validate, preprocess, embed, genre,
train and evaluate (promote writes to a registry: not part of the scale test); every stage is a
child process, its wall time and peak RSS (``os.wait4``: the child's own ru_maxrss) are printed
with the growth factor against the smallest scale run.

What the benchmark changes from params.yaml, printed in its output too: ``train.strategies:
[content]`` with few epochs and one seed (the ease/fusion strategies hold a dense items x items
EASE matrix: they are bounded by the evaluate baseline's ``ease_max_items`` logic only in
evaluate), ``train.negatives`` (``--negatives``, default 4,000 sampled negatives shared by a
batch, ``negative_sharing: batch`` with ``logq_correction``: a training step then scores the
batch's positives and those negatives only, so its cost is bounded by the batch, not the
catalogue; 0 = the full softmax over every item, users x items per epoch),
``train.valid_max_users`` and ``evaluate.max_users`` (``--eval-max-users``: seeded user samples,
stated in metrics/train.json and metrics/evaluate.json) and the default
``evaluate.ease_max_items`` / ``itemknn_max_items`` (those baselines skipped above them with a
log line). ``--set section.key=JSON`` changes one more param (e.g. ``--set train.refit=false``).
The encoder is the real MiniLM at every scale run (no cheaper text path).

``--reuse-data`` keeps a scale folder's generated source data (re-run some stages, e.g. train and
evaluate with another ``--negatives``); ``--stage-timeout`` stops a stage that runs longer (its
row says ``"exit": "timeout"`` with the wall time and peak RSS up to then; the train stage logs
its s/batch every minute, so the log shows how far it got). Each stage's key figures (train:
seconds per epoch, valid nDCG@10; evaluate: test nDCG@10 per model) are printed after it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genre_tasks import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: MovieLens-100k's time range (Sep 1997 - Apr 1998): the longest span of one synthetic user
SPAN_SECONDS = 18_000_000
#: MovieLens-100k's size (the 1x)
ML100K = {"items": 1682, "users": 943, "interactions": 100_000}
GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]
#: MovieLens-100k's rating marginals (1..5)
RATING_P = [0.061, 0.114, 0.271, 0.341, 0.213]
WORDS = ("night day love war star dark last city blue river game house king road story girl man "
         "world heart time ghost secret summer winter fire water stone wild lost big little").split()
#: exit code of a stage stopped by ``--stage-timeout``
TIMEOUT = -1000
STAGES = ("source", "ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate")


def generate(scale: float, out: Path, seed: int = 0, zipf_a: float = 1.0) -> dict:
    """Write items.csv + interactions.csv for ``scale`` x MovieLens-100k into ``out``."""
    rng = np.random.default_rng(seed)
    n_items = round(ML100K["items"] * scale)
    n_users = round(ML100K["users"] * scale)
    n_inter = round(ML100K["interactions"] * scale)
    # items: Zipf-like popularity over a random permutation of ids
    weight = 1.0 / np.arange(1, n_items + 1) ** zipf_a
    pop = np.empty(n_items)
    pop[rng.permutation(n_items)] = weight / weight.sum()
    years = rng.integers(1930, 1999, n_items)
    n_genres = rng.choice([1, 2, 3], n_items, p=[0.45, 0.35, 0.2])
    titles, genres = [], []
    for i in range(n_items):
        words = rng.choice(WORDS, rng.integers(1, 4))
        titles.append(f"The {' '.join(words).title()} {i} ({years[i]})")
        genres.append("|".join(sorted(rng.choice(GENRES, n_genres[i], replace=False))))
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": titles, "genres": genres})
    items["text"] = [f"{t}. Genres: {g.replace('|', ', ')}." for t, g in zip(titles, genres)]
    # users: power-law activity, >= 20 each, summing to n_inter (capped by the catalogue)
    raw = (rng.pareto(1.2, n_users) + 1.0)
    extra = n_inter - 20 * n_users
    cap = n_items // 2  # MovieLens-100k's most active user rated 737 of 1,682 items
    counts = np.minimum(20 + np.floor(raw / raw.sum() * extra).astype(int), cap)
    for _ in range(50):  # what the cap cut goes to the others, in proportion
        short = n_inter - counts.sum()
        free = counts < cap
        if short <= 0 or not free.any():
            break
        add = np.floor(raw * free / (raw * free).sum() * short).astype(int)
        add[np.argsort(-(raw * free))[: max(0, short - add.sum())]] += 1
        counts = np.minimum(counts + add, cap)
    # items per user: popularity draws with replacement (vectorised), duplicates dropped and
    # topped up in a second round: O(interactions), not O(users x items)
    users = np.repeat(np.arange(n_users), counts)
    cdf = np.cumsum(pop)
    draw = lambda n: np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), n_items - 1)  # noqa: E731
    pairs = pd.DataFrame({"u": users, "i": draw(len(users))}).drop_duplicates()
    for rnd in range(12):
        have = pairs.groupby("u").size().reindex(np.arange(n_users), fill_value=0).to_numpy()
        short = counts - have
        if short.sum() <= 0:
            break
        more_u = np.repeat(np.arange(n_users), np.maximum(short, 0) * 2)
        # popularity draws first; a heavy user's last few from the uniform tail (rounds >= 4)
        extra_i = draw(len(more_u)) if rnd < 4 else rng.integers(0, n_items, len(more_u))
        pairs = pd.concat([pairs, pd.DataFrame({"u": more_u, "i": extra_i})]).drop_duplicates()
        pairs = pairs.reset_index(drop=True)
        pairs = pairs[pairs.groupby("u").cumcount().to_numpy() < counts[pairs["u"].to_numpy()]]
    pairs = pairs.sample(frac=1.0, random_state=seed).sort_values("u", kind="stable")
    start = rng.integers(874_724_710, 890_000_000, n_users)  # MovieLens-100k's time range
    # gaps up to a day, shorter for heavy users: a user's ratings span at most ~7 months
    # (MovieLens-100k's range), so timestamps stay plausible at 100x (a heavy user has 84k ratings)
    per_user = counts[pairs["u"].to_numpy()]
    step = rng.integers(1, 1 << 62, len(pairs)) % np.clip(2 * SPAN_SECONDS // np.maximum(per_user, 1), 2, 86_400) + 1
    ts = start[pairs["u"].to_numpy()] + pd.Series(step).groupby(pairs["u"].to_numpy()).cumsum().to_numpy()
    inter = pd.DataFrame({"user_id": pairs["u"].to_numpy() + 1, "item_id": pairs["i"].to_numpy() + 1,
                          "timestamp": ts, "rating": rng.choice([1, 2, 3, 4, 5], len(pairs), p=RATING_P)})
    out.mkdir(parents=True, exist_ok=True)
    items.to_csv(out / "items.csv", index=False)
    inter.to_csv(out / "interactions.csv", index=False)
    per_item = inter["item_id"].value_counts().reindex(items["item_id"], fill_value=0).sort_values(ascending=False)
    per_user = inter["user_id"].value_counts()
    top = max(1, n_items // 100)
    return {"scale": scale, "items": n_items, "users": n_users, "interactions": len(inter),
            "top1pct_items_share": round(per_item.iloc[:top].sum() / len(inter), 3),
            "items_without_ratings": int((per_item == 0).sum()),
            "user_ratings_min_median_max": [int(per_user.min()), int(per_user.median()), int(per_user.max())]}


def overrides(scale: float, epochs: int, max_users: int | None, negatives: int = 0,
              sets: list[str] = ()) -> dict:
    """The bench's changes to params.yaml, then each ``section.key=JSON`` of ``sets`` on top."""
    over = {
        "ingest": {"adapter": "tabular",
                   "tabular": {"items": "items.csv", "interactions": "interactions.csv",
                               "text_fields": ["title", "genres"]}},
        "embed": {"show_progress": False},
        "train": {"strategies": ["content"], "extra_seeds": [], "epochs": epochs, "patience": 1,
                  "negatives": negatives, "negative_sharing": "batch", "logq_correction": True,
                  "valid_max_users": max_users},
        "evaluate": {"itemknn_k": [50], "ease_lambda": [250.0], "max_users": max_users},
    }
    for item in sets:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: expected section.key=JSON, e.g. train.refit=false")
        over.setdefault(section, {})[name] = json.loads(value)
    return over


def run_stage(root: Path, override: Path, stage: str, log, timeout: float | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB of the stage's process tree as waited for, exit code).

    ``timeout``: the stage's process group is sent SIGTERM after that many seconds (exit code
    :data:`TIMEOUT`); its peak RSS up to then is still reported."""
    cmd = [sys.executable, "-m", "genre_tasks.cli", "--root", str(root), "--params",
           str(root / "params.yaml"), "--override", str(override), stage]
    env = {**os.environ, "GENRE_PROJECT_ROOT": str(root), "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if timeout is not None else 0)
        if pid:
            break
        if not timed_out and time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGTERM)
            timed_out = True
        time.sleep(1.0)
    proc.returncode = TIMEOUT if timed_out else os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, proc.returncode


def report(root: Path, scale: float, stage: str) -> None:
    """The figures of ``stage``'s metrics file worth a line next to its time."""
    f = root / "metrics" / f"{stage}.json"
    if not f.exists():
        return
    rep = json.loads(f.read_text())
    if stage == "train":
        for name, r in rep.get("strategies", {}).items():
            print(f"x{scale:g} train {name}: seconds_per_epoch {r.get('seconds_per_epoch')}, epochs "
                  f"{r.get('epochs_run')} + {r.get('epochs_refit')} refit, examples {r.get('examples_valid')}, "
                  f"valid nDCG@10 {r.get('valid_ndcg@10')}")
    elif stage == "evaluate":
        print(f"x{scale:g} evaluate: eval_users {json.dumps(rep.get('eval_users'))}; "
              f"skipped_baselines {json.dumps(rep.get('skipped_baselines'))}")
        print(f"x{scale:g} evaluate: test nDCG@10 " + ", ".join(
            f"{name} {m['ndcg@10']:.4f}" for name, m in rep.get("models", {}).items()))
    elif stage == "embed":
        print(f"x{scale:g} embed: {rep['n_texts_encoded']} texts encoded in {rep['encode_seconds']} s "
              f"({rep['texts_per_second']} texts/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 10])
    ap.add_argument("--stages", nargs="+", default=list(STAGES))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-max-users", type=int, default=2000)
    ap.add_argument("--negatives", type=int, default=4000,
                    help="train.negatives: sampled negatives shared by a batch, logQ-corrected "
                         "(0 = the full softmax over every item)")
    ap.add_argument("--reuse-data", action="store_true",
                    help="keep data/source of a scale folder that has it (no new generation)")
    ap.add_argument("--stage-timeout", type=float, default=None,
                    help="stop a stage after this many seconds (its row: exit 'timeout', peak RSS up to then)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="one more params change, e.g. --set train.refit=false (repeatable; printed)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="genre-scale-"))
    print(f"# bench_scale: scratch {work}; stages {' '.join(args.stages)}; uptime {os.getloadavg()}")
    table = []
    for scale in args.scales:
        root = work / f"x{scale:g}"
        src = root / "data" / "source"
        if args.reuse_data and (src / "items.csv").exists() and (src / "interactions.csv").exists():
            print(f"data: reusing {src}")
        else:
            t0 = time.perf_counter()
            data = generate(scale, src, args.seed)
            data["generate_seconds"] = round(time.perf_counter() - t0, 1)
            print("data:", json.dumps(data))
        if args.generate_only:
            continue
        # merged into the scratch root's params.yaml (evaluate settings are refused in override files)
        over = overrides(scale, args.epochs, args.eval_max_users, args.negatives, args.sets)
        params = config.deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), over)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (root / "scale.yaml").write_text("{}\n")
        print(f"x{scale:g} changes to params.yaml: {json.dumps(over)}")
        with open(root / "bench.log", "a") as log:
            for stage in args.stages:
                (root / "metrics" / f"{stage}.json").unlink(missing_ok=True)  # no stale figures
                sec, rss, code = run_stage(root, root / "scale.yaml", stage, log, args.stage_timeout)
                row = {"scale": scale, "stage": stage, "seconds": round(sec, 1), "peak_rss_mib": round(rss),
                       "exit": "timeout" if code == TIMEOUT else code}
                table.append(row)
                print(json.dumps(row), flush=True)
                report(root, scale, stage)
                if code != 0:
                    why = (f"STOPPED after --stage-timeout {args.stage_timeout:g} s" if code == TIMEOUT
                           else f"FAILED (exit {code})")
                    print(f"x{scale:g} {stage} {why}; see {root / 'bench.log'}")
                    break
    if not table:
        return
    df = pd.DataFrame(table)
    base = df[df["scale"] == df["scale"].min()].set_index("stage")
    print("\n| stage | " + " | ".join(f"x{s:g} s | x{s:g} MiB" for s in args.scales) + " | growth s | growth MiB |")
    print("|---|" + "---:|" * (2 * len(args.scales) + 2))
    for stage in args.stages:
        rows = df[df["stage"] == stage].set_index("scale")
        cells = []
        for s in args.scales:
            cells += ([f"{rows.loc[s, 'seconds']:.1f}", f"{rows.loc[s, 'peak_rss_mib']:.0f}"]
                      if s in rows.index else ["-", "-"])
        top = rows.index.max() if len(rows) else None
        grow = ("-", "-")
        if top is not None and stage in base.index and top != df["scale"].min():
            grow = (f"{rows.loc[top, 'seconds'] / max(base.loc[stage, 'seconds'], 1e-9):.1f}x",
                    f"{rows.loc[top, 'peak_rss_mib'] / max(base.loc[stage, 'peak_rss_mib'], 1e-9):.1f}x")
        print(f"| {stage} | " + " | ".join(cells) + f" | {grow[0]} | {grow[1]} |")


if __name__ == "__main__":
    main()
