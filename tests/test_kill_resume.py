"""Kill -9 in the middle of a stage, then resume: no partial outputs, identical results.

A scratch project (params.yaml + configs/tiny.yaml, an embed batch size of 8 so encoding takes
many batches) runs source -> ingest -> validate -> preprocess; a copy of it then runs embed and
train uninterrupted (the reference). In the first project:

* ``embed`` is started with a cold embedding cache and SIGKILLed once its progress bar shows
  encoded texts; its outputs (data/embeddings, metrics/embed.json, cache shards) must be absent
  and nothing but io's temp names may be left behind. The re-run must give a vectors.npy
  bit-identical to the reference.
* ``train`` is started over the *previous complete version* of its outputs (the reference's
  data/model + metrics/train.json, copied in) and SIGKILLed once its first strategy (content)
  has early-stopped, i.e. before its refit and the hybrid strategy; the previous
  version must still be there byte for byte. The re-run must reproduce the reference: the same
  best epochs and validation nDCG@10 per strategy, byte-identical model.pt files.

The genre stage is skipped (train reads its predictions only when present) to keep the test
within a few minutes on 2 cores. Also: a process SIGKILLed *inside* io.atomic_path /
io.atomic_dir leaves the target absent or complete, and the next write of it succeeds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from genre_tasks.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow]

PREP = ["source", "ingest", "validate", "preprocess"]
#: io's temp names: .<name>.<random>.tmp (atomic_path), .<name>.<random> and
#: .<name>.old.<pid> (atomic_dir)
IO_TEMP = re.compile(r"^\.[^/]+\.[A-Za-z0-9_]+(\.tmp)?$|^\.[^/]+\.old\.\d+$")


def _env(root: Path) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": "PASSIVE", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("GENRE_PARAMS_OVERRIDE", None)
    return env


def _cmd(root: Path, stage: str) -> list[str]:
    return [str(BIN / "genre"), "--root", str(root), "--params", str(root / "params.yaml"), stage]


def run_stage(root: Path, stage: str) -> dict:
    proc = subprocess.run(_cmd(root, stage), cwd=root, env=_env(root), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"genre {stage} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return json.loads(proc.stdout)


def kill_when(root: Path, stage: str, ready, timeout: float = 240.0) -> str:
    """Start ``stage``, poll its stderr until ``ready(stderr)`` is true, SIGKILL it.

    Returns the stderr seen. Fails if the stage finishes (or dies) before it was killed.
    """
    log = root / f"{stage}.kill.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(_cmd(root, stage), cwd=root, env=_env(root),
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    try:
        while True:
            text = log.read_text(errors="replace")
            if proc.poll() is not None:
                raise AssertionError(f"genre {stage} ended (rc {proc.returncode}) before it could "
                                     f"be killed mid-work:\n{text[-3000:]}")
            if ready(text):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"genre {stage}: no sign of progress in {timeout}s:\n{text[-3000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(errors="replace")


def temp_leftovers(root: Path) -> list[Path]:
    """Hidden files / folders under data/ and .cache/ (where io's temp files would live)."""
    out = []
    for top in (root / "data", root / ".cache"):
        if top.exists():
            out += [p for p in top.rglob(".*")]
    return sorted(out)


def assert_only_io_temps(root: Path) -> list[Path]:
    """Every leftover must carry io's temp naming (a stray from a kill inside a write)."""
    left = temp_leftovers(root)
    bad = [p for p in left if not IO_TEMP.match(p.name) and not any(IO_TEMP.match(q.name)
                                                                   for q in p.parents)]
    assert not bad, f"unexpected hidden leftovers: {bad}"
    return left


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """(killed, reference): two scratch projects after preprocess; the reference has run
    embed and train uninterrupted."""
    base = tmp_path_factory.mktemp("kill")
    a, b = base / "a", base / "b"
    a.mkdir()
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    # many small batches with a visible progress bar, so the kill lands mid-encoding
    params = deep_merge(params, {"embed": {"batch_size": 8, "show_progress": True},
                                 "train": {"strategies": ["content", "hybrid"]}})
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(ROOT / "configs", a / "configs")
    for stage in PREP:
        run_stage(a, stage)
    shutil.copytree(a, b)
    run_stage(b, "embed")
    run_stage(b, "train")
    return a, b


def _encoded(text: str) -> int:
    """Texts encoded so far according to the embed progress bar (tqdm: 'embed: ..| n/N')."""
    counts = [int(n) for n in re.findall(r"embed:[^\r\n|]*\|[^|]*\|\s*(\d+)/\d+", text)]
    return max(counts, default=0)


def test_embed_killed_mid_encoding_then_resumed(projects):
    a, b = projects
    shutil.rmtree(a / ".cache" / "embeddings", ignore_errors=True)  # really compute
    err = kill_when(a, "embed", lambda t: _encoded(t) >= 16)
    n = _encoded(err)
    assert 16 <= n < 1682, f"killed after {n} texts: not mid-encoding"

    # nothing partial: no vectors, no index, no metrics, no cache shard; only io temp names
    assert not (a / "data" / "embeddings" / "vectors.npy").exists()
    assert not (a / "data" / "embeddings" / "index.parquet").exists()
    assert not (a / "metrics" / "embed.json").exists()
    assert not list((a / ".cache").rglob("shard-*.npz"))
    left = assert_only_io_temps(a)
    assert not left, f"temp files left by the killed embed: {left}"

    summary = run_stage(a, "embed")
    assert summary["n_cached"] == 0  # the kill cached nothing
    assert summary["n_texts_encoded"] == summary["n_unique_texts"]
    ref = (b / "data" / "embeddings" / "vectors.npy").read_bytes()
    assert (a / "data" / "embeddings" / "vectors.npy").read_bytes() == ref
    assert ((a / "data" / "embeddings" / "index.parquet").read_bytes()
            == (b / "data" / "embeddings" / "index.parquet").read_bytes())
    assert not temp_leftovers(a)


def test_train_killed_mid_fit_keeps_previous_version_then_resumed(projects):
    a, b = projects
    if not (a / "data" / "embeddings" / "vectors.npy").exists():  # run alone (-k train)
        shutil.copytree(b / "data" / "embeddings", a / "data" / "embeddings")
    # the previous complete version of train's outputs
    shutil.rmtree(a / "data" / "model", ignore_errors=True)
    shutil.copytree(b / "data" / "model", a / "data" / "model")
    shutil.copy2(b / "metrics" / "train.json", a / "metrics" / "train.json")
    before_model = tree_bytes(a / "data" / "model")
    before_metrics = (a / "metrics" / "train.json").read_bytes()
    mtime = (a / "metrics" / "train.json").stat().st_mtime_ns

    # the first strategy's first seed's "best epoch" line: its refit, the other seeds and the
    # second strategy are still to come, nothing has been written yet
    err = kill_when(a, "train", lambda t: "content seed 42: best epoch" in t)
    assert "hybrid seed" not in err and "wrote" not in err.split("valid phase:", 1)[1], err[-2000:]

    # the previous version is intact, byte for byte; nothing partial beside it
    assert tree_bytes(a / "data" / "model") == before_model
    assert (a / "metrics" / "train.json").read_bytes() == before_metrics
    assert_only_io_temps(a)

    summary = run_stage(a, "train")
    assert (a / "metrics" / "train.json").stat().st_mtime_ns > mtime  # really re-written
    ref = json.loads((b / "metrics" / "train.json").read_text())
    got = json.loads((a / "metrics" / "train.json").read_text())
    assert summary["selected"] == ref["selected"] == got["selected"]
    for strategy, r in ref["strategies"].items():
        g = got["strategies"][strategy]
        assert (g["best_epoch"], g["valid_ndcg@10"], g["epochs_run"]) == \
               (r["best_epoch"], r["valid_ndcg@10"], r["epochs_run"]), strategy
        assert ((a / "data" / "model" / strategy / "model.pt").read_bytes()
                == (b / "data" / "model" / strategy / "model.pt").read_bytes()), strategy
    assert tree_bytes(a / "data" / "model") == tree_bytes(b / "data" / "model")
    # strays of a kill (if any) must not survive inside or beside the model folder
    assert not [p for p in temp_leftovers(a) if p.name.startswith(".model.")]


_KILL_INSIDE = r"""
import os, signal, sys
from pathlib import Path
from genre_tasks import io
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "file":
    with io.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
else:
    with io.atomic_dir(target) as tmp:
        (tmp / "model.pt").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_inside_an_atomic_write(tmp_path, kind):
    """A kill inside the write: the target stays the previous version; the next write works.

    io cannot clean up on SIGKILL (its ``finally`` never runs): the temp file / folder stays
    behind under io's temp name. It never replaces the target, and the next write of the same
    target sweeps it away (so no stray ends up hashed into a DVC output).
    """
    from genre_tasks import io

    target = tmp_path / "out" / ("vectors.npy" if kind == "file" else "model")
    if kind == "file":
        io.write_text("previous", target)
    else:
        target.mkdir(parents=True)
        (target / "model.pt").write_bytes(b"previous")
    proc = subprocess.run([sys.executable, "-c", _KILL_INSIDE, kind, str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    strays = sorted(p.name for p in target.parent.iterdir() if p.name.startswith("."))
    assert all(IO_TEMP.match(s) for s in strays), strays
    if kind == "file":
        assert target.read_text() == "previous"
        io.write_text("new", target)
        assert target.read_text() == "new"
    else:
        assert (target / "model.pt").read_bytes() == b"previous"
        with io.atomic_dir(target) as tmp:
            (tmp / "model.pt").write_bytes(b"new")
        assert (target / "model.pt").read_bytes() == b"new"
    assert strays, "the kill inside the write should have left a temporary behind"
    after = sorted(p.name for p in target.parent.iterdir() if p.name.startswith("."))
    assert after == [], f"{kind}: strays survived the next write: {after}"
    assert oct(target.stat().st_mode & 0o777) != oct(0o700 if kind == "dir" else 0o600)
