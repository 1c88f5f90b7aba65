"""The generation cache: every generation (valid or rejected) stored under
(backend model id, template version, input hash).

A folder of append-only JSONL shards, one per writing process (``shard-<ns>-<pid>.jsonl``). Each
record is written and fsync'ed as soon as its batch is done, so a killed run loses at most the
batch in flight, and the next run reads every finished record and generates only the rest. A
torn last line (a kill in mid-write) is skipped. Rejected generations are cached too: greedy
decoding would reject them again, so a re-run generates nothing at all.

The store the stage uses lives in ``.cache/augment/`` (shared by every DVC workspace of the
project, like the embedding cache); the records a run used are also written to its DVC-tracked
output ``data/augment/generations.jsonl`` and pushed to the DVC remote with it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger("genre.augment")


def cache_key(model_id: str, template_version: str, input_hash: str) -> str:
    return hashlib.sha1(f"{model_id}\0{template_version}\0{input_hash}".encode()).hexdigest()


def input_hash(payload: object) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class GenerationCache:
    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root)

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.jsonl")) if self.dir.is_dir() else []

    def load(self) -> dict[str, dict]:
        """key -> record, from every shard (a later record of a key wins)."""
        out: dict[str, dict] = {}
        for shard in self.shards():
            with open(shard, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.endswith("\n"):
                        logger.warning("augment cache: %s line %d is incomplete (a killed run): skipped",
                                       shard, n)
                        continue
                    try:
                        rec = json.loads(line)
                        out[rec["key"]] = rec
                    except (json.JSONDecodeError, KeyError, TypeError):
                        logger.warning("augment cache: %s line %d is not a record: skipped", shard, n)
        return out

    @contextlib.contextmanager
    def writer(self) -> Iterator["ShardWriter"]:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"shard-{time.time_ns():020d}-{os.getpid()}.jsonl"
        w = ShardWriter(path)
        try:
            yield w
        finally:
            w.close()


class ShardWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None
        self.written = 0

    def put(self, records: Iterable[dict]) -> None:
        """Append records and fsync (durable before the next batch starts)."""
        records = list(records)
        if not records:
            return
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.written += len(records)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
