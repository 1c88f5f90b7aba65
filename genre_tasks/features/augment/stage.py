"""augment stage: GENRE's three generative operations on any item domain, validated and cached.

Reads ``data/processed/items.parquet`` (item_id, item_idx, title, text, genres) and
``histories.parquet`` (``hist_train``: each user's liked items of the train split, so nothing of
valid/test reaches a prompt) and writes ``data/augment/``:

``items.parquet``          enrich_items: item_id, summary, genres, text (``[generated] ...``)
``profiles.parquet``       profile_users: user_id, topics, profile, text (``[generated] ...``)
``synthetic_items.parquet``synthesize_cold_users: user_id, rank, title, genres, text
``rejects.jsonl``          generations that broke their schema after the repairs (never data)
``generations.jsonl``      every generation record this run used (the DVC-tracked store)
``metrics/augment.json``   counts, rejects, tokens/s, prompts/s per operation

Every row holds only accepted, schema-valid output and carries ``generated=True``, its
``model_id`` and ``template`` version. With ``augment.enabled: false`` the stage writes the same
files empty and loads no model (so ``embed`` can always depend on it).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.features.augment import templates
from genre_tasks.features.augment.cache import GenerationCache
from genre_tasks.features.augment.engine import Job, Stats, run_jobs
from genre_tasks.features.augment.params import AugmentParams

logger = logging.getLogger("genre.augment")

GENERATED = "[generated]"  # prefix of every generated text wherever it is stored or shown
NO_GENRE = {"unknown", ""}
ITEM_COLUMNS = [S.ITEM_ID, "summary", S.GENRES, S.TEXT, "generated", "model_id", "template"]
PROFILE_COLUMNS = [S.USER_ID, "topics", "profile", S.TEXT, "generated", "model_id", "template"]
SYNTH_COLUMNS = [S.USER_ID, "rank", S.TITLE, S.GENRES, S.TEXT, "generated", "model_id", "template"]


class AugmentPaths:
    def __init__(self, paths: S.Paths) -> None:
        self.dir = paths / "data" / "augment"
        self.items = self.dir / "items.parquet"
        self.profiles = self.dir / "profiles.parquet"
        self.synthetic = self.dir / "synthetic_items.parquet"
        self.rejects = self.dir / "rejects.jsonl"
        self.generations = self.dir / "generations.jsonl"
        self.cache = paths / ".cache" / "augment"


def vocabulary(items: pd.DataFrame) -> tuple[str, ...]:
    """The dataset's genres (sorted), the only values generated genres/topics may take."""
    vocab = sorted({str(g) for gs in items[S.GENRES] for g in (gs if gs is not None else [])
                    if str(g).strip().lower() not in NO_GENRE})
    if not vocab:
        raise StageError("augment: items.parquet has no genres: the generated genres/topics need a "
                         "vocabulary")
    return tuple(vocab)


def _item_fact(row) -> str:
    return str(row[S.TEXT])


def item_jobs(items: pd.DataFrame, vocab: tuple[str, ...]) -> list[Job]:
    tpl = templates.load("enrich_items")
    forbidden = tpl.example_strings()
    jobs = []
    for row in items.itertuples(index=False):
        row = row._asdict()
        chat = tpl.render(vocabulary=", ".join(vocab), item=templates.data_block({"title": _item_fact(row)}))
        jobs.append(Job("enrich_items", str(row[S.ITEM_ID]), chat, tpl.version, vocab, 1, forbidden))
    return jobs


def _history_texts(hist, texts: dict[int, str], n: int) -> list[str]:
    return [texts[int(i)] for i in list(hist)[-n:] if int(i) in texts]


def profile_jobs(users: pd.DataFrame, texts: dict[int, str], vocab: tuple[str, ...], n: int) -> list[Job]:
    tpl = templates.load("profile_users")
    forbidden = tpl.example_strings()
    jobs = []
    for uid, hist in zip(users[S.USER_ID].astype(str), users["hist_train"]):
        chat = tpl.render(vocabulary=", ".join(vocab),
                          history=templates.data_block(_history_texts(hist, texts, n), max_chars=1500))
        jobs.append(Job("profile_users", uid, chat, tpl.version, vocab, 1, forbidden))
    return jobs


def cold_jobs(users: pd.DataFrame, texts: dict[int, str], vocab: tuple[str, ...], n_items: int) -> list[Job]:
    tpl = templates.load("synthesize_cold_users")
    forbidden = tpl.example_strings()
    jobs = []
    for uid, hist in zip(users[S.USER_ID].astype(str), users["hist_train"]):
        chat = tpl.render(vocabulary=", ".join(vocab), n=str(n_items),
                          history=templates.data_block(_history_texts(hist, texts, 10), max_chars=1500))
        jobs.append(Job("synthesize_cold_users", uid, chat, tpl.version, vocab, n_items, forbidden))
    return jobs


def _accepted(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok"]


def item_table(records: list[dict]) -> pd.DataFrame:
    rows = [{S.ITEM_ID: r["subject"], "summary": r["output"]["summary"], S.GENRES: r["output"]["genres"],
             S.TEXT: f"{GENERATED} {r['output']['summary']} Genres: {', '.join(r['output']['genres'])}.",
             "generated": True, "model_id": r["model_id"], "template": r["template"]}
            for r in _accepted(records)]
    return pd.DataFrame(rows, columns=ITEM_COLUMNS)


def profile_table(records: list[dict]) -> pd.DataFrame:
    rows = [{S.USER_ID: r["subject"], "topics": r["output"]["topics"], "profile": r["output"]["profile"],
             S.TEXT: f"{GENERATED} {r['output']['profile']} Interests: {', '.join(r['output']['topics'])}.",
             "generated": True, "model_id": r["model_id"], "template": r["template"]}
            for r in _accepted(records)]
    return pd.DataFrame(rows, columns=PROFILE_COLUMNS)


def synthetic_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in _accepted(records):
        for k, item in enumerate(r["output"]["items"]):
            rows.append({S.USER_ID: r["subject"], "rank": k, S.TITLE: item["title"], S.GENRES: item["genres"],
                         S.TEXT: f"{GENERATED} {item['title']}. Genres: {', '.join(item['genres'])}",
                         "generated": True, "model_id": r["model_id"], "template": r["template"]})
    return pd.DataFrame(rows, columns=SYNTH_COLUMNS)


def _write_jsonl(records: list[dict], path: Path) -> None:
    io.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records), path)


def _read_inputs(paths: S.Paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    for p in (paths.items, paths.histories):
        if not p.exists():
            raise StageError(f"augment: {p} not found; run the preprocess stage first")
    items = pd.read_parquet(paths.items, columns=[S.ITEM_ID, S.ITEM_IDX, S.TITLE, S.TEXT, S.GENRES])
    items = items.sort_values(S.ITEM_IDX, kind="stable").reset_index(drop=True)
    hist = pd.read_parquet(paths.histories, columns=[S.USER_IDX, S.USER_ID, "hist_train"])
    hist = hist.sort_values(S.USER_IDX, kind="stable").reset_index(drop=True)
    return items, hist


def run(p: AugmentParams, paths: S.Paths, backend=None) -> dict:
    """Run the enabled operations (cache first) and write data/augment/ + metrics/augment.json.

    ``backend``: a ready backend (tests, the benchmark); None = :func:`backends.make_backend`.
    """
    ap = AugmentPaths(paths)
    with logs.stage("augment", paths) as log:
        items, hist = _read_inputs(paths)
        log.read(paths.items, f"{len(items)} items")
        log.read(paths.histories, f"{len(hist)} users")
        records: dict[str, list[dict]] = {op: [] for op in ("enrich_items", "profile_users",
                                                             "synthesize_cold_users")}
        summary: dict = {"enabled": p.enabled, "operations": list(p.operations) if p.enabled else []}
        per_op: dict[str, dict] = {}
        if p.enabled:
            if backend is None:
                from genre_tasks.features.augment.backends import make_backend

                backend = make_backend(p)
            vocab = vocabulary(items)
            texts = dict(zip(items[S.ITEM_IDX].astype(int), items[S.TEXT].astype(str)))
            cache = GenerationCache(ap.cache)
            known = cache.load()
            log.read(cache.dir, f"{len(known)} cached generations")
            lengths = hist["hist_train"].map(len)
            plans = {}
            if "enrich_items" in p.operations:
                sel = items if p.max_items is None else items.head(p.max_items)
                plans["enrich_items"] = item_jobs(sel, vocab)
            if "profile_users" in p.operations:
                users = hist[lengths > 0]
                users = users if p.max_users is None else users.head(p.max_users)
                plans["profile_users"] = profile_jobs(users, texts, vocab, p.profile_history)
            if "synthesize_cold_users" in p.operations:
                users = hist[(lengths > 0) & (lengths <= p.cold_max_history)]
                users = users if p.max_users is None else users.head(p.max_users)
                plans["synthesize_cold_users"] = cold_jobs(users, texts, vocab, p.n_synthetic)
            summary["model_id"] = backend.model_id
            for op, jobs in plans.items():
                stats = Stats()
                records[op] = run_jobs(jobs, backend, cache, batch_size=p.batch_size,
                                       max_new_tokens=p.max_new_tokens, max_repairs=p.max_repairs,
                                       show_progress=p.show_progress, desc=op, stats=stats, known=known)
                d = stats.as_dict()
                d["accepted"] = sum(r["status"] == "ok" for r in records[op])
                d["rejected_total"] = sum(r["status"] != "ok" for r in records[op])
                per_op[op] = d
                logger.info("augment %s: %s", op, d)
        ap.dir.mkdir(parents=True, exist_ok=True)
        outputs = {ap.items: item_table(records["enrich_items"]),
                   ap.profiles: profile_table(records["profile_users"]),
                   ap.synthetic: synthetic_table(records["synthesize_cold_users"])}
        for path, df in outputs.items():
            io.write_parquet(df, path)
            log.wrote(path, f"{len(df)} rows")
        everything = [r for op in records.values() for r in op]
        _write_jsonl([r for r in everything if r["status"] != "ok"], ap.rejects)
        log.wrote(ap.rejects)
        _write_jsonl(everything, ap.generations)
        log.wrote(ap.generations, f"{len(everything)} generation records")
        summary["per_operation"] = per_op
        summary["generations_this_run"] = sum(d["generations"] for d in per_op.values())
        summary["cached"] = sum(d["cached"] for d in per_op.values())
        summary["rejected"] = sum(d["rejected_total"] for d in per_op.values())
        summary["seconds"] = round(log.seconds, 3)
        io.write_json(summary, paths.metrics("augment"))
        log.wrote(paths.metrics("augment"))
    return summary


def main(params: dict, paths: S.Paths) -> dict:
    """CLI/DAG entry point: ``run`` with the ``augment`` section (absent = disabled)."""
    section = params.get("augment") or {}
    return run(config.from_dict(AugmentParams, section, "augment"), paths)
