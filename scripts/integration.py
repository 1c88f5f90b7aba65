#!/usr/bin/env python
"""The production topology for real, without Docker (``make integration``).

Starts, on 127.0.0.1 only, in its own folder (default: a new temporary one):

- PostgreSQL (Debian package; as the ``postgres`` user when run as root, else as you) with the
  databases and roles of the compose stack (``docker/postgres/10-genre-databases.sh``): airflow,
  mlflow, mlflow_auth;
- Redis (Debian package) with a password, as the Celery broker;
- an MLflow server on Postgres with basic auth (``docker/mlflow/basic_auth.ini``), proxied
  artifacts in a folder and ``--allowed-hosts``;
- Airflow 3 with the CeleryExecutor: api-server, scheduler, dag-processor and two Celery workers
  ``worker-a`` (queues ``default`` + ``store``) and ``worker-b`` (``default``), each in its own
  empty folder with its own copy of the code, sharing only Postgres, Redis, the MLflow server
  and the DVC remote (a folder standing in for the S3 bucket).

Then: triggers ``genre_training`` through the REST API (``/api/v2``, token from ``/auth/token``)
on the tiny config, waits for success, prints every task instance with the worker that ran it,
asserts through the MLflow server's REST API that a version of this run is ``@champion``,
``dvc pull``s that version's data in a clean folder, drops a feedback batch (replayed
MovieLens-100k week) into the store worker's landing folder, triggers ``genre_feedback``, waits
for the retraining it causes through the asset and prints its promotion decision. Finally it
stops every process group it started and checks that no process and no port is left.

Secrets (database, broker, Airflow keys, admin passwords) are generated at start and written
0600 under ``<dir>/secrets/``; they reach the services through the environment, never a
command line. Needs: ``scripts/system-deps.sh postgresql redis-server`` and the stack's Python
extras (``docker/requirements-stack.txt``), both installed by ``make integration``.

    python scripts/integration.py [--dir DIR] [--keep] [--no-feedback]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HOST = "127.0.0.1"
MODEL = "genre-recommender"
WORKERS = {"worker-a": "default,store", "worker-b": "default"}
STORE_QUEUE = "store"
#: the code a worker gets (what the image holds); data comes only through the services
CODE = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", "genre_tasks", "dags", "configs")
#: the integration's params on top of configs/tiny.yaml: the replay cutoff for the feedback step,
#: and one cheap strategy (the asset-triggered retrain takes no trigger form)
PARAMS = {"ingest": {"until": "1998-03-02"}, "train": {"strategies": ["ease"]}}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def write_secret(path: Path, text: str) -> Path:
    """A credential file: created 0600 (never world-readable, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


class Stack:
    """Every process group started here, stopped in reverse order."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        #: the signal that stops a service cleanly (Postgres: SIGINT = fast shutdown; its SIGTERM
        #: "smart" shutdown waits for every client to disconnect first)
        self.stop_signal: dict[str, int] = {"postgres": signal.SIGINT}
        self.ports: dict[str, int] = {}
        self.run_as_postgres = os.geteuid() == 0

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path, user: str | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        kw = {}
        if user:
            pw = pwd.getpwnam(user)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append((name, proc))
        say(f"started {name} (pid/pgid {proc.pid}){' as ' + user if user else ''}")
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def wait_for(self, what: str, ok, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        while True:
            self.check_alive()
            with contextlib.suppress(Exception):
                if ok():
                    say(f"{what}: up ({time.monotonic() - t0:.1f} s)")
                    return
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} not up after {timeout:.0f} s")
            time.sleep(1.0)

    def stop(self) -> dict:
        """SIGTERM each process group (reverse start order), SIGKILL what is left after 30 s."""
        for name, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.stop_signal.get(name, signal.SIGTERM))
        deadline = time.monotonic() + 30
        for name, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        killed = []
        for name, proc in self.procs:
            if group_alive(proc.pid):
                killed.append(name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1.0)
        left = {name: proc.pid for name, proc in self.procs if group_alive(proc.pid)}
        ports = {name: p for name, p in self.ports.items() if port_open(p)}
        return {"sigkilled": killed, "groups_left": left, "ports_left": ports}


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader of an otherwise empty group still "exists": look at /proc
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
    return False


# --- services -------------------------------------------------------------------------------
def start_postgres(st: Stack, sec: dict) -> dict:
    data, sock = st.base / "postgres" / "data", st.base / "postgres" / "run"
    sock.mkdir(parents=True)
    data.mkdir(parents=True, mode=0o700)
    user = "postgres" if st.run_as_postgres else None
    if user:
        pw = pwd.getpwnam(user)
        for d in (st.base / "postgres", data, sock):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(st.base, 0o755)
    port = st.ports["postgres"] = free_port()
    superpw = write_secret(st.base / "postgres" / "superuser.pw", sec["postgres"])
    if user:
        os.chown(superpw, pwd.getpwnam(user).pw_uid, -1)
    env = {"PATH": f"{PG_BIN}:{os.environ['PATH']}", "LANG": "C.UTF-8"}
    initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
              f"--pwfile={superpw}", "-E", "UTF8"]
    kw = {}
    if user:
        pwu = pwd.getpwnam(user)
        kw = {"user": pwu.pw_uid, "group": pwu.pw_gid, "extra_groups": []}
    subprocess.run(initdb, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/", **kw)
    st.start("postgres", [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port),
                          "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={sock}",
                          "-c", "max_connections=200", "-c", "shared_buffers=64MB"],
             env, Path("/"), user)
    pg = {"PGHOST": HOST, "PGPORT": str(port), "PGUSER": "postgres", "PGPASSWORD": sec["postgres"]}
    st.wait_for("postgres", lambda: subprocess.run([str(PG_BIN / "pg_isready"), "-q"],
                                                  env={**env, **pg}).returncode == 0, 60)
    # the compose stack's own init script: one role + database per service, PUBLIC revoked
    subprocess.run(["bash", str(ROOT / "docker" / "postgres" / "10-genre-databases.sh")],
                   env={**env, **pg, "POSTGRES_USER": "postgres", "AIRFLOW_DB_PASSWORD": sec["airflow_db"],
                        "MLFLOW_DB_PASSWORD": sec["mlflow_db"]}, check=True, stdout=subprocess.DEVNULL)
    return {"port": port}


def start_redis(st: Stack, sec: dict) -> int:
    port = st.ports["redis"] = free_port()
    d = st.base / "redis"
    d.mkdir()
    conf = write_secret(d / "redis.conf", f"bind {HOST}\nport {port}\nrequirepass {sec['redis']}\n"
                        f"dir {d}\nsave \"\"\nappendonly no\nprotected-mode yes\n")
    st.start("redis", ["redis-server", str(conf)], {"PATH": os.environ["PATH"]}, d)

    def ping() -> bool:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(f"AUTH {sec['redis']}\r\nPING\r\n".encode())
            time.sleep(0.1)
            return b"+PONG" in s.recv(100)

    st.wait_for("redis", ping, 30)
    return port


def start_mlflow(st: Stack, sec: dict, pg_port: int) -> str:
    port = st.ports["mlflow"] = free_port()
    art = st.base / "mlflow-artifacts"
    art.mkdir()
    env = {**base_env(), "PGHOST": HOST, "PGPORT": str(pg_port), "PGUSER": "mlflow",
           "PGPASSWORD": sec["mlflow_db"],
           "MLFLOW_AUTH_CONFIG_PATH": str(ROOT / "docker" / "mlflow" / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": sec["mlflow_admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["mlflow_flask"]}
    st.start("mlflow", [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", HOST,
                        "--port", str(port), "--workers", "1",
                        "--backend-store-uri", "postgresql+psycopg2:///mlflow",
                        "--serve-artifacts", "--artifacts-destination", art.as_uri(),
                        "--allowed-hosts", f"{HOST}:{port},localhost:{port}"],
             env, st.base)
    url = f"http://{HOST}:{port}"
    st.wait_for("mlflow server", lambda: requests.get(f"{url}/health", timeout=2).ok, 240)
    # basic auth is on: no credentials -> 401
    r = requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10)
    assert r.status_code == 401, f"MLflow without credentials answered {r.status_code}"
    r = requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10,
                     auth=("admin", sec["mlflow_admin"]), headers={"Host": "evil.example:5000"})
    assert r.status_code == 403, f"MLflow with a foreign Host header answered {r.status_code}"
    say("mlflow: no credentials -> 401; foreign Host header -> 403")
    return url


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "HOME", "TZ", "TMPDIR", "USER", "LOGNAME")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def airflow_env(st: Stack, sec: dict, pg_port: int, redis_port: int, home: Path) -> dict:
    api = st.ports["airflow"]
    db = f"airflow:{sec['airflow_db']}@{HOST}:{pg_port}/airflow"
    return {**base_env(),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
            "AIRFLOW__CORE__FERNET_KEY": sec["fernet"],
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{api}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(st.base / "secrets" / "airflow-passwords.json"),
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(api),
            "AIRFLOW__API__BASE_URL": f"http://{HOST}:{api}",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": sec["api_secret"],
            "AIRFLOW__API_AUTH__JWT_SECRET": sec["jwt"],
            "AIRFLOW__API_AUTH__JWT_ISSUER": "genre-mlops",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:{sec['redis']}@{HOST}:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{db}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "genre_tasks.hosts.worker_hostname",
            # the DAGs: manual / asset-triggered only, the store's tasks on the store worker
            "GENRE_TRAINING_SCHEDULE": "none",
            "GENRE_FEEDBACK_SCHEDULE": "none",
            "GENRE_STORE_QUEUE": STORE_QUEUE,
            "GENRE_TRAINING_MAX_ACTIVE_RUNS": "1"}


def worker_folder(base: Path, name: str, remote: Path) -> Path:
    """An empty folder with a copy of the code (as the image would hold it) and DVC pointed at
    the shared remote; nothing else."""
    w = base / name
    project = w / "project"
    files = subprocess.run(["git", "ls-files", "--", *CODE], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        (project / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, project / f)
    (project / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = shared\n    no_scm = true\n['remote \"shared\"']\n    url = {remote}\n")
    return w


def worker_env(env: dict, w: Path, name: str, mlflow_url: str, sec: dict, remote: Path, params: Path) -> dict:
    return {**env,
            "AIRFLOW_HOME": str(w / "airflow-home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(w / "project" / "dags"),
            "GENRE_WORKER_HOSTNAME": name,
            "GENRE_PROJECT_ROOT": str(w / "project"),
            "GENRE_WORKSPACES": str(w / "runs"),
            "GENRE_DVC_CACHE": str(w / "dvc-cache"),
            "GENRE_DVC_REMOTE_URL": str(remote),
            "GENRE_PARAMS_OVERRIDE": f"configs/tiny.yaml{os.pathsep}{params}",
            "MLFLOW_TRACKING_URI": mlflow_url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": sec["mlflow_admin"],
            "HOME": str(w / "home")}


# --- REST clients ---------------------------------------------------------------------------
class Airflow:
    def __init__(self, url: str, password: str) -> None:
        self.url = url
        r = requests.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        r.raise_for_status()
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def get(self, path: str, **params) -> dict:
        r = self.s.get(f"{self.url}/api/v2{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def call(self, method: str, path: str, body: dict) -> dict:
        r = self.s.request(method, f"{self.url}/api/v2{path}", json=body, timeout=30)
        if not r.ok:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def wait_run(self, dag: str, run_id: str, st: Stack, timeout: float) -> dict:
        t0, last = time.monotonic(), None
        while True:
            st.check_alive()
            run = self.get(f"/dags/{dag}/dagRuns/{run_id}")
            tis = self.task_instances(dag, run_id)
            running = sorted(f"{ti_name(t)}@{t.get('hostname') or '?'}"
                             for t in tis if t["state"] in ("running", "queued"))
            line = f"{dag} {run['state']}: {', '.join(running) or '-'}"
            if line != last:
                say(line)
                last = line
            if run["state"] in ("success", "failed"):
                return run
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{dag} run {run_id} not finished after {timeout:.0f} s")
            time.sleep(3)

    def task_instances(self, dag: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]


def ti_name(t: dict) -> str:
    return t["task_id"] + ("" if t["map_index"] < 0 else f"[{t['map_index']}]")


def print_task_table(tis: list[dict]) -> dict[str, list[str]]:
    rows = sorted(tis, key=lambda t: (t.get("start_date") or "9", t["task_id"], t["map_index"]))
    print(f"  {'task instance':34} {'state':9} {'worker (hostname)':18} {'queue':8} {'seconds':>7}")
    by_worker: dict[str, list[str]] = {}
    for t in rows:
        name = ti_name(t)
        host = t.get("hostname") or "-"
        print(f"  {name:34} {t['state'] or '-':9} {host:18} {t.get('queue') or '-':8} "
              f"{(t.get('duration') or 0):7.1f}")
        if t["state"] == "success":
            by_worker.setdefault(host, []).append(name)
    return by_worker


class MLflow:
    def __init__(self, url: str, password: str) -> None:
        self.url, self.auth = url, ("admin", password)

    def get(self, path: str, **params) -> dict:
        r = requests.get(f"{self.url}/api/2.0/mlflow{path}", params=params, auth=self.auth, timeout=30)
        if not r.ok:
            raise RuntimeError(f"MLflow GET {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    def champion(self) -> dict:
        return self.get("/registered-models/alias", name=MODEL, alias="champion")["model_version"]

    def versions(self) -> list[dict]:
        """Every version, with its ``aliases`` (model-versions/search leaves them out: they come
        from registered-models/get)."""
        found = self.get("/model-versions/search", filter=f"name='{MODEL}'").get("model_versions", [])
        aliases: dict[str, list[str]] = {}
        for a in self.get("/registered-models/get", name=MODEL)["registered_model"].get("aliases", []):
            aliases.setdefault(str(a["version"]), []).append(a["alias"])
        return [{**v, "aliases": sorted(aliases.get(str(v["version"]), []))} for v in found]

    def artifact(self, run_id: str, path: str) -> bytes:
        run = self.get("/runs/get", run_id=run_id)["run"]
        exp = run["info"]["experiment_id"]
        r = requests.get(f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{exp}/{run_id}/artifacts/{path}",
                         auth=self.auth, timeout=60)
        if not r.ok:
            raise RuntimeError(f"artifact {path} of run {run_id}: {r.status_code} {r.text[:300]}")
        return r.content


def xcom_value(entry: dict):
    """An XCom entry's value: the REST API returns it JSON-encoded, or as a plain string."""
    value = entry["value"]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def tags(obj: dict) -> dict:
    return {t["key"]: t["value"] for t in obj.get("tags", [])}


# --- the run --------------------------------------------------------------------------------
def pull_in_clean_folder(base: Path, ml: MLflow, version: dict, remote: Path) -> dict:
    """The registered version's data from the DVC remote into a folder that has nothing but
    dvc.yaml, the run's params snapshot and dvc.lock (both fetched from MLflow over REST)."""
    d = base / "clean-pull"
    (d / ".dvc").mkdir(parents=True)
    shutil.copy2(ROOT / "dvc.yaml", d / "dvc.yaml")
    (d / "params.yaml").write_bytes(ml.artifact(version["run_id"], "run/params.yaml"))
    (d / "dvc.lock").write_bytes(ml.artifact(version["run_id"], "run/dvc.lock"))
    (d / ".dvc" / "config").write_text(f"[core]\n    no_scm = true\n    analytics = false\n    remote = shared\n"
                                       f"['remote \"shared\"']\n    url = {remote}\n")
    env = {**base_env(), "HOME": str(base / "clean-home")}
    t0 = time.monotonic()
    out = subprocess.run([str(BIN / "dvc"), "pull"], cwd=d, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dvc pull failed:\n{out.stdout}\n{out.stderr}")
    status = subprocess.run([str(BIN / "dvc"), "data", "status", "--granular"], cwd=d, env=env,
                            capture_output=True, text=True).stdout
    lock = yaml.safe_load((d / "dvc.lock").read_text())
    model = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "data/model")
    files = sorted(str(p.relative_to(d)) for p in (d / "data").rglob("*") if p.is_file())
    say(f"dvc pull in {d}: {out.stdout.strip().splitlines()[-1] if out.stdout.strip() else '?'} "
        f"({time.monotonic() - t0:.1f} s); {len(files)} files under data/")
    # the pulled model folder hashes to the md5 the run's dvc.lock recorded
    proc = subprocess.run([str(BIN / "dvc"), "status", "--json", "train", "evaluate"], cwd=d, env=env,
                          capture_output=True, text=True)
    st = json.loads(proc.stdout or "{}")
    # the code deps (genre_tasks/) are not in this folder: only the outputs are compared
    outs = {stage: [e for e in entries if isinstance(e, dict) and "changed outs" in e]
            for stage, entries in st.items()}
    return {"files": len(files), "model_md5": model["md5"], "model_files": model.get("nfiles"),
            "status_train": "up to date" if not any(outs.values()) else outs,
            "data_status": status.strip()[-400:]}


def drop_feedback_batch(w: Path, env: dict) -> str:
    """The replayed first week after the cutoff lands in the store worker's landing folder."""
    run = lambda *a: subprocess.run([str(BIN / "genre"), *a], cwd=w / "project", env=env,  # noqa: E731
                                    capture_output=True, text=True)
    out = run("feedback", "replay", "--init")
    if out.returncode != 0:
        raise RuntimeError(f"replay --init:\n{out.stdout}\n{out.stderr}")
    out = run("feedback", "replay", "--next")
    if out.returncode != 0:
        raise RuntimeError(f"replay --next:\n{out.stdout}\n{out.stderr}")
    incoming = sorted(p.name for p in (w / "project" / "data" / "feedback" / "incoming").iterdir())
    say(f"feedback batch dropped into worker-a's landing folder: {incoming}")
    return incoming[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="work folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    ap.add_argument("--no-feedback", action="store_true", help="stop after the first training run")
    ap.add_argument("--timeout", type=float, default=1800, help="per DAG run, seconds")
    args = ap.parse_args(argv)
    base = (args.dir or Path(tempfile.mkdtemp(prefix="genre-integration-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if any(base.iterdir()):
        raise SystemExit(f"{base} is not empty")
    base.chmod(0o755)
    st = Stack(base)
    say(f"work folder {base}")
    sec = {k: secrets.token_hex(16) for k in ("postgres", "airflow_db", "mlflow_db", "redis", "api_secret",
                                               "jwt", "airflow_admin", "mlflow_admin", "mlflow_flask")}
    from cryptography.fernet import Fernet

    sec["fernet"] = Fernet.generate_key().decode()
    write_secret(base / "secrets" / "stack.env", "".join(f"{k.upper()}={v}\n" for k, v in sec.items()))
    write_secret(base / "secrets" / "airflow-passwords.json", json.dumps({"admin": sec["airflow_admin"]}))
    result: dict = {}
    ok = False
    try:
        pg = start_postgres(st, sec)
        redis_port = start_redis(st, sec)
        mlflow_url = start_mlflow(st, sec, pg["port"])
        st.ports["airflow"] = free_port()
        control = base / "airflow-control"
        env = airflow_env(st, sec, pg["port"], redis_port, control)
        remote = base / "dvc-remote"
        remote.mkdir()
        params = base / "integration-params.yaml"
        params.write_text(yaml.safe_dump(PARAMS))
        t0 = time.monotonic()
        # the scheduler and the workers preload MLflow/GX/torch before forking task processes
        for home in [control, *(base / name / "airflow-home" for name in WORKERS)]:
            subprocess.run([str(BIN / "python"), "-m", "genre_airflow.local_settings", "install", str(home)],
                           env=env, cwd=base, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, cwd=base, check=True,
                       stdout=open(st.logs / "airflow-db-migrate.log", "wb"), stderr=subprocess.STDOUT)
        subprocess.run([str(BIN / "airflow"), "pools", "set", "genre_registry", "1", "one promote at a time"],
                       env=env, cwd=base, check=True, stdout=subprocess.DEVNULL)
        say(f"airflow db migrate on Postgres + pool genre_registry ({time.monotonic() - t0:.1f} s)")
        st.start("airflow-api-server", [str(BIN / "airflow"), "api-server"], env, base)
        st.start("airflow-scheduler", [str(BIN / "airflow"), "scheduler"], env, base)
        st.start("airflow-dag-processor", [str(BIN / "airflow"), "dag-processor"], env, base)
        workers = {}
        for name, queues in WORKERS.items():
            w = worker_folder(base, name, remote)
            wenv = worker_env(env, w, name, mlflow_url, sec, remote, params)
            workers[name] = (w, wenv)
            st.start(f"airflow-celery-{name}",
                     [str(BIN / "airflow"), "celery", "worker", "--celery-hostname", f"{name}@%h",
                      "--queues", queues, "--concurrency", "1", "--skip-serve-logs"], wenv, w)
        api = f"http://{HOST}:{st.ports['airflow']}"
        st.wait_for("airflow api-server", lambda: requests.get(f"{api}/api/v2/monitor/health", timeout=2).ok, 240)
        af = Airflow(api, sec["airflow_admin"])

        def parsed() -> bool:
            ids = {d["dag_id"] for d in af.get("/dags")["dags"]}
            return {"genre_training", "genre_feedback"} <= ids

        st.wait_for("DAGs parsed by the dag-processor", parsed, 300)

        def celery_up() -> bool:
            log = "".join((st.logs / f"airflow-celery-{n}.log").read_text(errors="replace") for n in WORKERS)
            return log.count(" ready.") >= len(WORKERS)

        st.wait_for("both celery workers", celery_up, 240)
        for dag in ("genre_training", "genre_feedback"):
            af.call("PATCH", f"/dags/{dag}", {"is_paused": False})

        # 1. the first champion: trained through the REST API
        # embed scaled out: 2 mapped embed_shard tasks, which Celery may give to both workers
        conf = {"strategies": ["ease"], "force_promote": True,
                "force_reason": "integration run: first champion of an empty registry",
                "overrides": {"embed": {"shards": 2}}}
        t_run = time.monotonic()
        run = af.call("POST", "/dags/genre_training/dagRuns", {"logical_date": None, "conf": conf})
        say(f"triggered genre_training over REST: {run['dag_run_id']} conf={json.dumps(conf)}")
        run = af.wait_run("genre_training", run["dag_run_id"], st, args.timeout)
        result["training_seconds"] = round(time.monotonic() - t_run, 1)
        tis = af.task_instances("genre_training", run["dag_run_id"])
        print(f"\ngenre_training {run['dag_run_id']}: {run['state']} in {result['training_seconds']} s")
        by_worker = print_task_table(tis)
        assert run["state"] == "success", f"training run {run['state']}"
        assert set(by_worker) == set(WORKERS), f"tasks ran on {sorted(by_worker)}, expected both workers"
        result["tasks_by_worker"] = by_worker
        embed_hosts = {t.get("hostname") for t in tis if t["task_id"].startswith("embed")}
        result["embed_workers"] = sorted(h for h in embed_hosts if h)
        shard_hosts = {f"shard {t.get('map_index')}": t.get("hostname") for t in tis if t["task_id"] == "embed_shard"}
        result["embed_shard_workers"] = shard_hosts
        say(f"embed shards ran on: {shard_hosts}"
            + ("" if len(set(shard_hosts.values())) > 1 else " (one worker took both: Celery's choice)"))

        # 2. the MLflow server's REST API: a version of THIS run is @champion
        ml = MLflow(mlflow_url, sec["mlflow_admin"])
        xcom = af.get(f"/dags/genre_training/dagRuns/{run['dag_run_id']}/taskInstances/start_mlflow_run/xcomEntries/return_value")
        mlflow_run = xcom_value(xcom)
        champ = ml.champion()
        say(f"MLflow REST: {MODEL}@champion = version {champ['version']} (run {champ['run_id']} = this DAG "
            f"run's MLflow run; artifacts sha256 {tags(champ).get('genre.artifacts_sha256', '-')[:12]})")
        assert champ["run_id"] == mlflow_run, (champ["run_id"], mlflow_run)
        result["champion"] = {"version": champ["version"], "run_id": champ["run_id"],
                              "source": champ["source"], "tags": {k: v for k, v in tags(champ).items()
                                                                  if k.startswith("genre.")}}
        # 3. its data, pulled from the DVC remote in a clean folder
        result["dvc_pull"] = pull_in_clean_folder(base, ml, champ, remote)
        say(f"dvc status of the pulled train stage: {result['dvc_pull']['status_train']}")

        # 4. feedback: a batch lands, the feedback DAG applies it, the asset triggers a retrain
        if not args.no_feedback:
            wa, wenv = workers["worker-a"]
            batch = drop_feedback_batch(wa, wenv)
            before = {r["dag_run_id"] for r in af.get("/dags/genre_training/dagRuns")["dag_runs"]}
            fb = af.call("POST", "/dags/genre_feedback/dagRuns", {"logical_date": None, "conf": {}})
            fb = af.wait_run("genre_feedback", fb["dag_run_id"], st, 900)
            print(f"\ngenre_feedback {fb['dag_run_id']}: {fb['state']}")
            print_task_table(af.task_instances("genre_feedback", fb["dag_run_id"]))
            assert fb["state"] == "success"
            report = af.get(f"/dags/genre_feedback/dagRuns/{fb['dag_run_id']}/taskInstances/report/xcomEntries/return_value")
            say(f"feedback report: {report['value']}")

            def retrain_started() -> bool:
                runs = af.get("/dags/genre_training/dagRuns")["dag_runs"]
                return any(r["dag_run_id"] not in before for r in runs)

            st.wait_for("asset-triggered genre_training run", retrain_started, 300)
            new = next(r for r in af.get("/dags/genre_training/dagRuns")["dag_runs"] if r["dag_run_id"] not in before)
            say(f"retrain {new['dag_run_id']} (run_type {new['run_type']}) triggered by the asset "
                "genre://interactions/store")
            t_re = time.monotonic()
            new = af.wait_run("genre_training", new["dag_run_id"], st, args.timeout)
            tis = af.task_instances("genre_training", new["dag_run_id"])
            print(f"\ngenre_training {new['dag_run_id']}: {new['state']} in {time.monotonic() - t_re:.0f} s")
            print_task_table(tis)
            assert new["state"] == "success", f"retrain {new['state']}"
            promote = af.get(f"/dags/genre_training/dagRuns/{new['dag_run_id']}/taskInstances/promote/xcomEntries/return_value")
            decision = xcom_value(promote)  # the stage summary: the decision record is under "metrics"
            decision = decision.get("metrics", decision) if isinstance(decision, dict) else {}
            champ2 = ml.champion()
            versions = sorted(ml.versions(), key=lambda v: int(v["version"]))
            print("\nregistry after the retrain (MLflow REST):")
            for v in versions:
                t = tags(v)
                print(f"  version {v['version']}: aliases {v.get('aliases', [])} decision "
                      f"{t.get('decision', '-')} ({t.get('reasons') or t.get('force_reason') or '-'})"[:300])
            say(f"retrain decision: {decision.get('decision')} (version {decision.get('version')}, "
                f"@champion now {champ2['version']}); batch {batch}")
            recorded = tags(next(v for v in versions if str(v["version"]) == str(decision.get("version"))))
            assert decision.get("decision") and recorded.get("decision") == decision["decision"], (decision, recorded)
            result["retrain"] = {"run_id": new["dag_run_id"], "run_type": new["run_type"], "batch": batch,
                                 "decision": {k: decision.get(k) for k in ("decision", "version", "champion_version",
                                                                           "reason", "reasons") if k in decision},
                                 "champion_after": champ2["version"]}
        ok = True
    finally:
        say("stopping every process group started here")
        stopped = st.stop()
        result["shutdown"] = stopped
        say(f"shutdown: {stopped}")
        if not stopped["groups_left"] and not stopped["ports_left"]:
            say("no process group and no port left")
        (base / "result.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps(result, indent=2, default=str))
        if ok and not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"work folder kept: {base} (logs in {st.logs})")
    assert not stopped["groups_left"] and not stopped["ports_left"], stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
