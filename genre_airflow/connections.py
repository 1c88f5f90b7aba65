"""The MLflow tracking server and the DVC remote as Airflow Connections, the environment as the
fallback.

Two connection ids (Admin > Connections, ``AIRFLOW_CONN_<ID>`` in JSON or URI form, or any
secrets backend):

``genre_mlflow``       host (+ port, schema = URL scheme, default http) -> ``MLFLOW_TRACKING_URI``;
                       a host that already holds a URI (``http://...``, ``sqlite:///...``) is used
                       as is; login/password -> ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``;
                       extra ``experiment`` -> ``MLFLOW_EXPERIMENT_NAME``
``genre_dvc_remote``   extra ``url`` or host (``s3://bucket/path``, a folder) ->
                       ``GENRE_DVC_REMOTE_URL``; extra ``endpoint_url`` -> ``GENRE_DVC_REMOTE_ENDPOINT``
                       (the remote's ``endpointurl``); login/password or extras
                       ``aws_access_key_id``/``aws_secret_access_key`` -> ``AWS_ACCESS_KEY_ID``/
                       ``AWS_SECRET_ACCESS_KEY`` (read by DVC's S3 remote, never written to a
                       config file); extra ``region_name`` -> ``AWS_DEFAULT_REGION``

:func:`resolve` looks them up with the Task SDK (``airflow.sdk.Connection.get``): call it inside a
task only, never at DAG parse time (a connection look-up may be a metadata-DB or secrets-backend
call). An undefined connection leaves the environment as it is (the fallback); a defined one
wins over the environment. ``effective`` is what the run used, secrets masked: it goes into the
run's params snapshot (XCom) and the task log.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("genre.connections")

MLFLOW_CONN_ID = "genre_mlflow"
DVC_REMOTE_CONN_ID = "genre_dvc_remote"

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
REMOTE_URL_ENV = "GENRE_DVC_REMOTE_URL"
REMOTE_ENDPOINT_ENV = "GENRE_DVC_REMOTE_ENDPOINT"
KEY_ID_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
REGION_ENV = "AWS_DEFAULT_REGION"

#: environment variables whose values are never shown
SECRET_ENVS = frozenset({PASSWORD_ENV, SECRET_KEY_ENV})
MASK = "***"


@dataclass
class Resolved:
    """``env``: the variables to set for the task (only those a connection defines);
    ``effective``: per target, where its values came from and the values, secrets masked."""
    env: dict[str, str] = field(default_factory=dict)
    effective: dict[str, dict[str, Any]] = field(default_factory=dict)


def _airflow_lookup(conn_id: str) -> Any | None:
    """The Task SDK connection ``conn_id``, or None when it is not defined anywhere."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _extras(conn: Any) -> dict:
    extra = getattr(conn, "extra_dejson", None)
    return dict(extra) if isinstance(extra, Mapping) else {}


def mlflow_env(conn: Any) -> dict[str, str]:
    """Environment of a ``genre_mlflow`` connection (host/port/schema -> tracking URI)."""
    host = (conn.host or "").strip()
    extra = _extras(conn)
    if not host:
        host = str(extra.get("tracking_uri") or "").strip()
    if not host:
        raise ValueError(f"Airflow connection {MLFLOW_CONN_ID}: no host (the tracking server)")
    if "://" in host or host.startswith("sqlite:"):
        uri = host
    else:
        scheme = (conn.schema or "").strip() or "http"
        uri = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    env = {TRACKING_URI_ENV: uri}
    if conn.login:
        env[USERNAME_ENV] = conn.login
    if conn.password:
        env[PASSWORD_ENV] = conn.password
    if extra.get("experiment"):
        env[EXPERIMENT_ENV] = str(extra["experiment"])
    return env


def dvc_remote_env(conn: Any) -> dict[str, str]:
    """Environment of a ``genre_dvc_remote`` connection (extra url or host -> the remote url)."""
    extra = _extras(conn)
    url = str(extra.get("url") or conn.host or "").strip()
    if not url:
        raise ValueError(f"Airflow connection {DVC_REMOTE_CONN_ID}: no url (extra 'url' or host)")
    env = {REMOTE_URL_ENV: url}
    endpoint = extra.get("endpoint_url") or extra.get("endpointurl")
    if endpoint:
        env[REMOTE_ENDPOINT_ENV] = str(endpoint)
    key_id = extra.get("aws_access_key_id") or conn.login
    secret = extra.get("aws_secret_access_key") or conn.password
    if key_id:
        env[KEY_ID_ENV] = str(key_id)
    if secret:
        env[SECRET_KEY_ENV] = str(secret)
    if extra.get("region_name"):
        env[REGION_ENV] = str(extra["region_name"])
    return env


#: target -> (connection id, its environment builder, the environment variables it sets)
TARGETS: dict[str, tuple[str, Callable[[Any], dict[str, str]], tuple[str, ...]]] = {
    "mlflow": (MLFLOW_CONN_ID, mlflow_env, (TRACKING_URI_ENV, USERNAME_ENV, PASSWORD_ENV, EXPERIMENT_ENV)),
    "dvc_remote": (DVC_REMOTE_CONN_ID, dvc_remote_env,
                   (REMOTE_URL_ENV, REMOTE_ENDPOINT_ENV, KEY_ID_ENV, SECRET_KEY_ENV, REGION_ENV)),
}


def masked(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the secrets replaced by ``***`` and the user info of URLs dropped."""
    out = {}
    for key, value in env.items():
        if key in SECRET_ENVS or "SECRET" in key or "PASSWORD" in key:
            out[key] = MASK
        elif "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            scheme, rest = value.split("://", 1)
            out[key] = f"{scheme}://{MASK}@{rest.split('@', 1)[1]}"
        else:
            out[key] = value
    return out


def resolve(lookup: Callable[[str], Any | None] | None = None,
            environ: Mapping[str, str] | None = None) -> Resolved:
    """The MLflow and DVC-remote settings of a task: from the Airflow connections when they are
    defined, else from the environment (``environ``, default ``os.environ``). Inside a task only.

    ``lookup(conn_id)`` returns a connection or None (default: the Task SDK's ``Connection.get``).
    """
    lookup = lookup or _airflow_lookup
    environ = os.environ if environ is None else environ
    out = Resolved()
    for target, (conn_id, build, names) in TARGETS.items():
        conn = lookup(conn_id)
        if conn is not None:
            env = build(conn)
            out.env.update(env)
            source = f"connection {conn_id}"
        else:
            env = {k: environ[k] for k in names if environ.get(k, "").strip()}
            source = "environment" if env else "default"
        out.effective[target] = {"source": source, **masked(env)}
    return out
