"""The generation loop shared by every operation: cache first, batched generation of the misses,
schema validation, bounded repair retries, then accept or reject (logged, never data).

A :class:`Job` is one prompt (one item or one user). :func:`run_jobs` returns one record per
job (from the cache or freshly generated), with ``status`` ``"ok"`` (``output`` = the validated
dict) or ``"rejected"`` (``output`` None, ``error`` = the last broken rule, ``attempts`` = the
raw replies). Records are durable in the cache as soon as their batch is done.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from genre_tasks.features.augment import templates
from genre_tasks.features.augment.backends import Backend, Chat, Reply
from genre_tasks.features.augment.cache import GenerationCache, cache_key, input_hash
from genre_tasks.features.augment.validation import InvalidOutput, parse_reply

logger = logging.getLogger("genre.augment")


@dataclass
class Job:
    operation: str  # enrich_items | profile_users | synthesize_cold_users | reason
    subject: str  # the item or user id the prompt is about
    chat: Chat  # (messages, prefill)
    template_version: str
    vocabulary: tuple[str, ...]
    n_items: int = 1  # synthesize_cold_users: most items the reply may hold
    forbidden: frozenset = frozenset()  # the template's example strings (no verbatim copies)

    def input_hash(self, max_new_tokens: int) -> str:
        return input_hash([self.chat[0], self.chat[1], list(self.vocabulary), self.n_items, max_new_tokens])


@dataclass
class Stats:
    jobs: int = 0
    cached: int = 0
    generated: int = 0  # jobs generated in this run
    generations: int = 0  # backend calls per prompt incl. repairs
    repaired: int = 0  # accepted after >= 1 repair
    rejected: int = 0  # rejected in this run (cached rejections count in cached)
    tokens: int = 0
    seconds: float = 0.0
    by_operation: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("jobs", "cached", "generated", "generations", "repaired",
                                            "rejected", "tokens")}
        d["seconds"] = round(self.seconds, 3)
        d["tokens_per_second"] = round(self.tokens / self.seconds, 2) if self.seconds > 0 else 0.0
        d["prompts_per_second"] = round(self.generated / self.seconds, 3) if self.seconds > 0 else 0.0
        return d


def _repair_chat(job: Job, reply: str, error: str) -> Chat:
    repair = templates.load("repair")
    messages, prefill = job.chat
    turns, _ = repair.render(error=error, prefill=prefill)
    return ([*messages, {"role": "assistant", "content": reply}, *turns], prefill)


def generate_structured(backend: Backend, chats: Sequence[Chat], max_new_tokens: int,
                        vocabularies: Sequence[Sequence[str]] | None = None) -> list[Reply]:
    """The full assistant reply of each chat: the prefill's literals with the model's values
    generated in between (:func:`templates.split_prefill`), ``max_new_tokens`` per value. A
    backend with ``generate_guided`` (the local one) does it in one pass per batch; otherwise
    each value is one batched ``generate`` call (chats of one template take the same steps).
    ``vocabularies[i]``: the values a ``{{choice:...}}`` of chat i may take (the guided pass
    constrains them; the step-by-step path generates them freely)."""
    plans = [templates.split_prefill(prefill) for _, prefill in chats]
    guided = getattr(backend, "generate_guided", None)
    if guided is not None and chats and all(stops for _, stops in plans):
        options = None
        if vocabularies is not None:
            options = [[tuple(vocab) if choice else None for choice in templates.choice_values(prefill)]
                       for (_, prefill), vocab in zip(chats, vocabularies)]
        return guided(chats, plans, max_new_tokens, options)
    return generate_stepwise(backend, chats, plans, max_new_tokens)


def generate_stepwise(backend: Backend, chats: Sequence[Chat], plans, max_new_tokens: int) -> list[Reply]:
    """:func:`generate_structured` by one ``backend.generate`` per value (each re-reads the
    prompt): the path of the HTTP backend and the reference of the local backend's guided pass."""
    texts = [lits[0] for lits, _ in plans]
    tokens = [0] * len(chats)
    seconds = 0.0
    steps = max((len(stops) for _, stops in plans), default=0)
    if steps == 0:
        replies = backend.generate([(m, t) for (m, _), t in zip(chats, texts)], max_new_tokens)
        return [Reply(t + r.text, r.tokens, r.seconds) for t, r in zip(texts, replies)]
    for s in range(steps):
        groups: dict[str, list[int]] = {}
        for i, (_, stops) in enumerate(plans):
            if s < len(stops):
                groups.setdefault(stops[s], []).append(i)
        for stop, idx in groups.items():
            t0 = time.perf_counter()
            replies = backend.generate([(chats[i][0], texts[i]) for i in idx], max_new_tokens, stop)
            seconds += time.perf_counter() - t0
            for i, r in zip(idx, replies):
                texts[i] += r.text + plans[i][0][s + 1]
                tokens[i] += r.tokens
    return [Reply(t, n, seconds) for t, n in zip(texts, tokens)]


def run_jobs(jobs: Sequence[Job], backend: Backend, cache: GenerationCache, *, batch_size: int = 8,
             max_new_tokens: int = 96, max_repairs: int = 1, show_progress: bool = False,
             desc: str = "augment", stats: Stats | None = None,
             known: dict[str, dict] | None = None) -> list[dict]:
    """One record per job, in order (see the module doc). ``known`` = an already loaded cache."""
    stats = stats if stats is not None else Stats()
    known = cache.load() if known is None else known
    repair_version = templates.load("repair").version
    keys = [cache_key(backend.model_id, f"{j.template_version}+{repair_version}x{max_repairs}",
                      j.input_hash(max_new_tokens)) for j in jobs]
    out: list[dict | None] = [known.get(k) for k in keys]
    stats.jobs += len(jobs)
    # a key is the prompt, not the subject: jobs with identical prompts (two catalogue items with
    # the same text) are generated once, and each job's record names its own subject
    first: dict[str, int] = {}  # key -> the job that generates it
    for i, rec in enumerate(out):
        if rec is None:
            first.setdefault(keys[i], i)
    todo = sorted(first.values())
    stats.cached += len(jobs) - len(todo)
    if todo:
        _generate(todo, jobs, keys, out, backend, cache, batch_size, max_new_tokens, max_repairs,
                  show_progress, desc, stats)
    return [_as_subject(out[i] if out[i] is not None else out[first[keys[i]]], job)
            for i, job in enumerate(jobs)]


def _as_subject(record: dict, job: Job) -> dict:
    """``record`` (cached or generated for a job with the same prompt) as ``job``'s record."""
    return record if record["subject"] == job.subject else {**record, "subject": job.subject}


def _generate(todo: list[int], jobs: Sequence[Job], keys: list[str], out: list, backend: Backend,
              cache: GenerationCache, batch_size: int, max_new_tokens: int, max_repairs: int,
              show_progress: bool, desc: str, stats: Stats) -> None:
    """Generate (with repairs) the jobs ``todo`` in batches, setting ``out[i]``; each batch's
    records are durable in the cache before the next batch starts."""
    from tqdm.auto import tqdm

    with cache.writer() as writer, tqdm(total=len(todo), desc=desc, unit="prompt",
                                        disable=not show_progress) as bar:
        for b0 in range(0, len(todo), batch_size):
            batch = todo[b0:b0 + batch_size]
            attempts: dict[int, list[str]] = {i: [] for i in batch}
            errors: dict[int, str] = {}
            tokens: dict[int, int] = {i: 0 for i in batch}
            results: dict[int, dict] = {}
            pending = list(batch)
            chats = {i: jobs[i].chat for i in batch}
            t0 = time.perf_counter()
            for round_ in range(max_repairs + 1):
                if not pending:
                    break
                replies = generate_structured(backend, [chats[i] for i in pending], max_new_tokens,
                                              [jobs[i].vocabulary for i in pending])
                stats.generations += len(pending)
                still = []
                for i, reply in zip(pending, replies):
                    job = jobs[i]
                    attempts[i].append(reply.text)
                    tokens[i] += reply.tokens
                    try:
                        results[i] = parse_reply(reply.text, job.operation,
                                                 job.vocabulary, job.n_items, job.forbidden)
                        if round_:
                            stats.repaired += 1
                    except InvalidOutput as exc:
                        errors[i] = str(exc)
                        still.append(i)
                        chats[i] = _repair_chat(job, reply.text, str(exc))
                pending = still
            seconds = time.perf_counter() - t0
            records = []
            for i in batch:
                job = jobs[i]
                ok = i in results
                rec = {"key": keys[i], "operation": job.operation, "subject": job.subject,
                       "model_id": backend.model_id, "template": job.template_version,
                       "input_hash": job.input_hash(max_new_tokens), "status": "ok" if ok else "rejected",
                       "output": results.get(i), "error": None if ok else errors.get(i),
                       "attempts": attempts[i], "tokens": tokens[i], "generated": True}
                if not ok:
                    stats.rejected += 1
                    logger.warning("augment: REJECTED %s %s after %d attempt(s): %s", job.operation,
                                   job.subject, len(attempts[i]), errors.get(i))
                out[i] = rec
                records.append(rec)
            writer.put(records)  # durable before the next batch: a kill loses at most this batch
            batch_tokens = sum(tokens.values())
            stats.generated += len(batch)
            stats.tokens += batch_tokens
            stats.seconds += seconds
            bar.update(len(batch))
            bar.set_postfix_str(f"{stats.tokens / max(stats.seconds, 1e-9):.1f} tok/s, "
                                f"{stats.rejected} rejected")
