"""Screenshot the MLflow UI's page of a pipeline run *while it trains* (headless Chromium).

    python scripts/mlflow_screenshot.py [--out docs/mlflow_live_training.png] [--min-steps 5]
                                        [--timeout 1800] [--port 5055]

Starts a throw-away MLflow UI server on 127.0.0.1 over the project's tracking store (its own
process group, stopped at the end), waits until a run of the experiment is RUNNING and has
logged at least ``--min-steps`` epochs of a live training curve (``live.<strategy>.valid.*``,
see ``genre_tasks.registry.stage_logging.epoch_logger``), then saves the metric page of that curve
(``--out``) and the run's overview (``*_overview.png``, status Running) and prints, from the
MLflow REST API, the run's status and the metric history at that moment
(the text record of what the picture shows). Start a training first (``make run`` in another
shell, or a trigger in the Airflow UI).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"mlflow server not healthy at {url} after {seconds:.0f} s")


def live_run(client, experiment_id: str, min_steps: int):
    """(run, metric key, history) of a RUNNING run with >= min_steps live epochs, else None."""
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                  order_by=["attributes.start_time DESC"], max_results=5):
        live = sorted(k for k in run.data.metrics if k.startswith("live.") and "ndcg" in k)
        for key in live:
            hist = client.get_metric_history(run.info.run_id, key)
            if len(hist) >= min_steps:
                return run, key, hist
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "mlflow_live_training.png"))
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--port", type=int, default=5055)
    a = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from mlflow import MlflowClient

    from genre_tasks.registry import tracking_store
    from genre_tasks.schema import Paths

    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chrome:
        raise SystemExit("no chromium: apt-get install -y chromium")
    paths = Paths(ROOT)
    store = tracking_store.tracking_uri(paths)
    url = f"http://127.0.0.1:{a.port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(a.port),
           "--workers", "1", "--backend-store-uri", store]
    art = tracking_store.artifact_location(paths)
    if art:
        cmd += ["--default-artifact-root", art]
    log = open(Path(tempfile.gettempdir()) / "mlflow_screenshot_server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_healthy(url, proc)
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name(tracking_store.experiment_name())
        if exp is None:
            raise SystemExit(f"no experiment {tracking_store.experiment_name()!r} in {store}")
        end, found = time.time() + a.timeout, None
        print(f"waiting for a RUNNING run with >= {a.min_steps} live epochs in {store} ...", flush=True)
        while time.time() < end and not (found := live_run(client, exp.experiment_id, a.min_steps)):
            time.sleep(3)
        if not found:
            raise SystemExit(f"no RUNNING run with a live training curve within {a.timeout:.0f} s")
        run, key, _ = found
        rid, eid = run.info.run_id, exp.experiment_id
        # the metric page of the run (its live curves), and the run's overview (status Running)
        q = lambda v: urllib.parse.quote(json.dumps(v))  # noqa: E731
        pages = {a.out: f"{url}/#/metric?runs={q([rid])}&metric={q(key)}&experiments={q([eid])}"
                        f"&plot_metric_keys={q([key])}"
                        "&plot_layout={}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
                        "&show_point=true&deselected_curves=[]&last_linear_y_axis_range=[]",
                 a.out.replace(".png", "_overview.png"): f"{url}/#/experiments/{eid}/runs/{rid}"}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        for out, page in pages.items():
            profile = tempfile.mkdtemp()
            try:
                subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", "--disable-component-update",
                                "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                                f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                                "--window-size=1500,1000", f"--screenshot={out}", page],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
            finally:
                shutil.rmtree(profile, ignore_errors=True)
            print(f"screenshot: {page}\n  -> {out} ({Path(out).stat().st_size:,} bytes)")
        after = client.get_run(rid)
        hist = client.get_metric_history(rid, key)
        print(f"run {run.info.run_name} ({run.info.run_id}): status {after.info.status} after the "
              f"screenshot; genre.last_stage={after.data.tags.get('genre.last_stage', '-')}")
        print(f"{key}: " + ", ".join(f"epoch {m.step}: {m.value:.4f}" for m in hist))
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
