"""Validation of generated JSON: a schema per operation (genres/topics restricted to the
dataset's vocabulary, length bounds) plus an injection check.

:func:`parse_reply` turns the model's reply (the template's prefill + what it generated) into a
dict or raises :class:`InvalidOutput` with a message a repair prompt can quote. Only case is
normalised (``"drama"`` -> ``"Drama"``); anything else out of the vocabulary is an error.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

import jsonschema

from genre_tasks.features.augment.templates import json_strings

#: Phrases of an instruction that leaked from the data into the output (an injected item text
#: the model obeyed). Generated text containing one is rejected.
INJECTION_PATTERNS = re.compile(
    r"ignore (all |any )?(the )?(previous|prior|above) instructions|disregard (the )?(previous|above)"
    r"|system prompt|you are now|new instructions|<\s*/?\s*(item|history|facts)\s*>",
    re.I)

LIMITS = {
    "summary": (20, 400),
    "profile": (15, 300),
    "title": (2, 80),
    "reason": (15, 240),
}


class InvalidOutput(ValueError):
    """A generation broke its schema; the message names the rule (fed to the repair prompt)."""


def _text(name: str) -> dict:
    lo, hi = LIMITS[name]
    return {"type": "string", "minLength": lo, "maxLength": hi}


def _genres(vocabulary: Sequence[str], lo: int, hi: int) -> dict:
    return {"type": "array", "items": {"enum": list(vocabulary)}, "minItems": lo, "maxItems": hi,
            "uniqueItems": True}


def schema_for(operation: str, vocabulary: Sequence[str], n_items: int = 1) -> dict:
    """The JSON schema of one operation's output."""
    if operation == "enrich_items":
        props = {"summary": _text("summary"), "genres": _genres(vocabulary, 1, 3)}
    elif operation == "profile_users":
        props = {"topics": _genres(vocabulary, 1, 4), "profile": _text("profile")}
    elif operation == "synthesize_cold_users":
        item = {"type": "object", "additionalProperties": False, "required": ["title", "genres"],
                "properties": {"title": _text("title"), "genres": _genres(vocabulary, 1, 3)}}
        props = {"items": {"type": "array", "items": item, "minItems": 1, "maxItems": n_items}}
    elif operation == "reason":
        props = {"reason": _text("reason")}
    else:
        raise ValueError(f"unknown operation {operation!r}")
    return {"type": "object", "additionalProperties": False, "required": sorted(props),
            "properties": props}


def extract_json(text: str) -> dict:
    """The first complete JSON object in ``text`` (text after it is ignored)."""
    start = text.find("{")
    if start < 0:
        raise InvalidOutput("no JSON object in the reply")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(obj, dict):
        raise InvalidOutput("the reply is not a JSON object")
    return obj


def _normalise_case(obj, vocabulary: Sequence[str]):
    lower = {v.lower(): v for v in vocabulary}
    if isinstance(obj, dict):
        return {k: (_normalise_list(v, lower) if k in ("genres", "topics") else _normalise_case(v, vocabulary))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normalise_case(v, vocabulary) for v in obj]
    if isinstance(obj, str):
        return obj.strip()
    return obj


def _normalise_list(value, lower: dict):
    if not isinstance(value, list):
        return value
    return [lower.get(v.strip().lower(), v) if isinstance(v, str) else v for v in value]


def validate(obj: dict, operation: str, vocabulary: Sequence[str], n_items: int = 1,
             forbidden: frozenset[str] = frozenset()) -> dict:
    """``obj`` (case-normalised) if it satisfies the operation's schema, else InvalidOutput.

    ``forbidden``: free-text values that may not be copied verbatim (the prompt's few-shot
    example); vocabulary values are exempt."""
    obj = _normalise_case(obj, vocabulary)
    validator = jsonschema.Draft202012Validator(schema_for(operation, vocabulary, n_items))
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        message = e.message if len(e.message) < 200 else e.message[:197] + "..."
        raise InvalidOutput(f"{where}: {message}")
    for s in json_strings(obj):
        if INJECTION_PATTERNS.search(s):
            raise InvalidOutput(f"generated text repeats an instruction from the data: {s[:80]!r}")
        if s in forbidden and s not in vocabulary:
            raise InvalidOutput(f"copies the example instead of describing the input: {s[:80]!r}")
    return obj


def parse_reply(reply: str, operation: str, vocabulary: Sequence[str], n_items: int = 1,
                forbidden: frozenset[str] = frozenset()) -> dict:
    """Extract and validate; raises InvalidOutput naming the first broken rule."""
    return validate(extract_json(reply), operation, vocabulary, n_items, forbidden)
