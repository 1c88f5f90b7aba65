"""End to end: every stage on a slice of MovieLens-100k through `dvc repro`, in a scratch repo.

Shows that the pipeline runs from dvc.yaml alone, that a second `dvc repro` runs nothing, and
that editing one embed param re-runs embed and what depends on it, nothing upstream.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genre_tasks.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A scratch git+DVC repo with the project's dvc.yaml, code and tiny params."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "genre_tasks", repo / "genre_tasks", ignore=shutil.ignore_patterns("__pycache__"))
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                        yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db", "HF_HUB_OFFLINE": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop(("GENRE_PARAMS_OVERRIDE"), None)
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["genre", "tracking-init"], repo, env)  # as `make repro` does before `dvc repro`
    return repo, env


@pytest.fixture(scope="module")
def first_run(repo):
    repo_dir, env = repo
    return sh(["dvc", "repro"], repo_dir, env)


def test_repro_runs_every_stage_in_order(repo, first_run):
    repo_dir, _ = repo
    order = ["source", "ingest", "validate", "preprocess", "augment", "embed", "genre", "train", "evaluate", "promote"]
    assert ran_stages(first_run) == order
    split = json.loads((repo_dir / "metrics" / "preprocess.json").read_text())
    assert split["n_users"] == 60 and split["test"]["users"] == 60
    embed = json.loads((repo_dir / "metrics" / "embed.json").read_text())
    assert embed["n_items"] == 1682 and embed["n_embedded"] == 1682
    genre = json.loads((repo_dir / "metrics" / "genre.json").read_text())
    assert 0.0 < genre["micro_f1"] <= 1.0
    evaluation = json.loads((repo_dir / "metrics" / "evaluate.json").read_text())
    assert {"Random", "MostPop", "ItemKNN", "EASE", "ContentMean"} <= set(evaluation["models"])


def test_second_repro_runs_nothing(repo, first_run):
    repo_dir, env = repo
    out = sh(["dvc", "repro"], repo_dir, env)
    assert ran_stages(out) == [], out


def test_embed_param_reruns_embed_and_downstream_only(repo, first_run):
    repo_dir, env = repo
    params = yaml.safe_load((repo_dir / "params.yaml").read_text())
    params["embed"]["max_length"] = 16  # truncation changes the vectors of longer texts
    (repo_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], repo_dir, env)
    assert ran_stages(out) == ["embed", "genre", "train", "evaluate", "promote"], out
    # max_length is part of the cache key: nothing is served from the old vectors
    embed = json.loads((repo_dir / "metrics" / "embed.json").read_text())
    assert embed["n_embedded"] == 1682 and embed["n_cached"] == 0
