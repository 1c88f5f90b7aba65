"""LLM-phrased recommendation reasons, grounded in the deterministic facts.

The deterministic reason (the most similar history item, the genres they share, the user's
profile topics when the augment stage made a profile) is always computed. With ``--llm-reasons``
the ``reason`` template turns those facts into one sentence; the sentence is accepted only if it

* passes the ``reason`` schema (one JSON object, 15..240 characters) and the injection check,
* names the similar history item (or, without history, the recommended item) it is grounded on,
  and has at least 4 words of its own (a bare title is not a reason),
* mentions no genre/topic of the dataset's vocabulary that is not among the facts;

otherwise (after the bounded repairs) the deterministic text is shown. Accepted sentences are
shown with the ``[generated]`` mark. Cached like every generation (.cache/augment/).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from genre_tasks.features.augment import templates
from genre_tasks.features.augment.cache import GenerationCache
from genre_tasks.features.augment.engine import Job, run_jobs
from genre_tasks.features.augment.stage import GENERATED

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
#: a reason must say something besides the title it names
MIN_OWN_WORDS = 4


def _short(title: str) -> str:
    """'Star Wars (1977)' -> 'star wars' (titles are matched without the year, case-insensitive)."""
    return _YEAR.sub("", str(title)).strip().lower()


def grounded(sentence: str, facts: dict, vocabulary: Sequence[str]) -> str | None:
    """None if ``sentence`` is grounded in ``facts``, else the broken rule."""
    text = sentence.lower()
    anchor = facts.get("similar_to") or facts.get("recommended")
    if anchor and _short(anchor) not in text:
        return f"does not name '{anchor}'"
    rest = text.replace(_short(anchor), " ") if anchor else text
    if len(re.findall(r"[a-z]+", rest)) < MIN_OWN_WORDS:
        return f"not a sentence: fewer than {MIN_OWN_WORDS} words besides the item's title"
    allowed = {g.lower() for g in [*(facts.get("shared_genres") or []), *(facts.get("profile_topics") or [])]}
    for g in vocabulary:
        word = g.lower()
        if word not in allowed and re.search(rf"\b{re.escape(word)}\b", text):
            return f"mentions the genre '{g}', which is not among the facts"
    return None


def llm_reasons(facts: Sequence[dict], deterministic: Sequence[str], backend, cache_dir,
                vocabulary: Sequence[str], max_new_tokens: int = 48, max_repairs: int = 1) -> list[dict]:
    """Per recommendation: ``{"reason", "generated": bool, "error"}`` — the LLM sentence (marked
    ``[generated]``) when it is valid and grounded, else the deterministic text."""
    tpl = templates.load("reason")
    forbidden = tpl.example_strings()
    jobs, where = [], []
    for k, f in enumerate(facts):
        if not f or not f.get("recommended"):
            continue
        shown = {key: f[key] for key in ("recommended", "similar_to", "shared_genres", "profile_topics")
                 if f.get(key)}
        chat = tpl.render(facts=templates.data_block(shown, max_chars=800))
        jobs.append(Job("reason", str(f["recommended"]), chat, tpl.version, tuple(vocabulary), 1, forbidden))
        where.append(k)
    out = [{"reason": d, "generated": False, "error": None} for d in deterministic]
    if not jobs:
        return out
    records = run_jobs(jobs, backend, GenerationCache(cache_dir), batch_size=len(jobs),
                       max_new_tokens=max_new_tokens, max_repairs=max_repairs)
    for k, rec in zip(where, records):
        if rec["status"] != "ok":
            out[k]["error"] = rec["error"]
            continue
        sentence = rec["output"]["reason"]
        problem = grounded(sentence, facts[k], vocabulary)
        if problem:
            out[k]["error"] = f"not grounded: {problem}"
            continue
        out[k] = {"reason": f"{GENERATED} {sentence}", "generated": True, "error": None}
    return out
