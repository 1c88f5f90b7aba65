"""Start-up steps of the compose stack's ``airflow-init`` service (stdlib only).

    python docker/stack_init.py airflow-auth   the Airflow admin's password file
    python docker/stack_init.py project        the shared project root + its DVC remote

Everything comes from the environment; nothing secret is passed as an argument or printed.
Files that hold or guard credentials are written atomically with mode 0600 whatever the umask.

``airflow-auth``: Airflow 3's SimpleAuthManager reads the users' passwords from the JSON file
``$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE`` and only generates (and prints) a
password for a user missing from it. Writing ``{"<AIRFLOW_ADMIN_USERNAME>": "<AIRFLOW_ADMIN_PASSWORD>"}``
there first makes the admin's password the one in ``.env`` and keeps it out of the logs.

``project``: ``$GENRE_PROJECT_ROOT`` (a named volume shared by the workers) receives the
pipeline definition from the image (``$GENRE_TEMPLATE_ROOT``: params.yaml, dvc.yaml, configs/,
.dvc/config, .dvcignore; refreshed on every start so they follow the image) and keeps its data
(data/, metrics/, dvc.lock, .cache/). ``.dvc/config.local`` points the default DVC remote at
``$GENRE_DVC_REMOTE_URL`` (e.g. ``s3://dvc/genre``) with endpoint ``$GENRE_DVC_S3_ENDPOINT``
(MinIO; empty for AWS S3); the S3 keys stay in the environment (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY), never in the file. The root has no git checkout, so DVC runs with
``core.no_scm``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

#: copied from the image into the shared project root on every start (code-like, no data)
TEMPLATE_FILES = ("params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config")
TEMPLATE_DIRS = ("configs",)


def write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, mode 0600 (owner read/write only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _require(env: dict[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SystemExit(f"stack_init: {name} is not set (see .env.example)")
    return value


def airflow_auth(env: dict[str, str]) -> Path:
    """Write the SimpleAuthManager password file; returns its path."""
    path = Path(_require(env, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"))
    user = env.get("AIRFLOW_ADMIN_USERNAME", "").strip() or "admin"
    password = _require(env, "AIRFLOW_ADMIN_PASSWORD")
    passwords: dict[str, str] = {}
    if path.exists():
        try:
            passwords = json.loads(path.read_text(encoding="utf-8") or "{}")
        except json.JSONDecodeError:
            passwords = {}
    passwords[user] = password
    write_private(path, json.dumps(passwords) + "\n")
    print(f"stack_init: password of Airflow user {user!r} set in {path} (0600)")
    return path


def dvc_config_local(remote_url: str, endpoint: str) -> str:
    """The ``.dvc/config.local`` text: default remote ``shared`` at ``remote_url``, no git."""
    lines = [
        "[core]",
        "    remote = shared",
        "    no_scm = true",
        "['remote \"shared\"']",
        f"    url = {remote_url}",
    ]
    if endpoint:
        lines.append(f"    endpointurl = {endpoint}")
    return "\n".join(lines) + "\n"


def project(env: dict[str, str]) -> Path:
    """Refresh the shared project root from the image and point DVC at the shared remote."""
    root = Path(_require(env, "GENRE_PROJECT_ROOT"))
    template = Path(env.get("GENRE_TEMPLATE_ROOT", "").strip() or "/opt/genre")
    if root.resolve() == template.resolve():
        raise SystemExit("stack_init: GENRE_PROJECT_ROOT must differ from the image's template")
    root.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        src = template / name
        if src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    for name in TEMPLATE_DIRS:
        if (template / name).is_dir():
            shutil.copytree(template / name, root / name, dirs_exist_ok=True)
    remote = _require(env, "GENRE_DVC_REMOTE_URL")
    endpoint = env.get("GENRE_DVC_S3_ENDPOINT", "").strip()
    write_private(root / ".dvc" / "config.local", dvc_config_local(remote, endpoint))
    print(f"stack_init: project root {root} refreshed from {template}; DVC remote {remote}"
          + (f" at {endpoint}" if endpoint else ""))
    return root


COMMANDS = {"airflow-auth": airflow_auth, "project": project}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a not in COMMANDS for a in args):
        print(f"usage: stack_init.py {{{'|'.join(COMMANDS)}}}...", file=sys.stderr)
        return 2
    for a in args:
        COMMANDS[a](dict(os.environ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
