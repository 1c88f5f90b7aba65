"""Prompt templates: files under ``prompts/`` with a version string, rendered into chat messages.

File format (``prompts/<name>.txt``)::

    version: <name>/v<k>          # bump whenever the wording changes: it is part of the cache key
    --- system
    ...text with {{placeholders}}...
    --- user
    ...
    --- assistant
    {"summary": "                 # optional: a prefill the model's reply continues

Item text and histories are data, not instructions: :func:`data_block` JSON-escapes them (so a
title cannot close the ``<item>`` fence or fake a new chat turn) and each prompt holds exactly
one item or one user, so text of one item never reaches another item's prompt.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).with_name("prompts")
ROLES = ("system", "user", "assistant")
_SECTION = re.compile(r"^--- (system|user|assistant)\s*$", re.M)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
#: in an assistant prefill: "generate here until this stop string" (the program writes the JSON
#: keys and punctuation, the model only the values: a 135M model cannot be trusted with syntax).
#: ``{{choice:<stop>}}`` is a value from the job's vocabulary: the local backend's guided pass
#: lets the model pick only among those (constrained greedy); other backends generate it freely
#: and the schema check decides.
_GEN = re.compile(r"\{\{(gen|choice):(.+?)\}\}")


class TemplateError(ValueError):
    """A prompt file is malformed or a placeholder has no value."""


@dataclass(frozen=True)
class Template:
    """One prompt file: ``version`` (e.g. ``enrich_items/v1``), its chat turns and prefill."""

    name: str
    version: str
    turns: tuple[tuple[str, str], ...]  # (role, text) without the final assistant prefill
    prefill: str  # the start of the assistant's reply ("" = none)
    path: Path

    def example_strings(self) -> frozenset[str]:
        """Every JSON string value in the template's example replies (the few-shot turns): a
        generation that copies one of them verbatim is not about its own input."""
        out: set[str] = set()
        for role, text in self.turns:
            if role == "assistant":
                try:
                    out.update(json_strings(json.loads(text)))
                except json.JSONDecodeError:
                    continue
        return frozenset(out)

    def render(self, **values: str) -> tuple[list[dict], str]:
        """(messages [{"role", "content"}], prefill) with every ``{{name}}`` replaced."""
        def fill(text: str) -> str:
            def one(m: re.Match) -> str:
                if m.group(1) not in values:
                    raise TemplateError(f"{self.path}: no value for placeholder {{{{{m.group(1)}}}}}")
                return str(values[m.group(1)])
            return _PLACEHOLDER.sub(one, text)

        return [{"role": r, "content": fill(t)} for r, t in self.turns], fill(self.prefill)


def split_prefill(prefill: str) -> tuple[list[str], list[str]]:
    """``'{"a": "{{gen:"}}", "b": 1}'`` -> (literals ``['{"a": "', '", "b": 1}']``, stops ``['"']``).

    The reply is literals[0] + gen_0 + literals[1] + ... where gen_k is generated until stops[k]
    (excluded). Without markers: ([prefill], []) - one free generation after the prefill."""
    parts = _GEN.split(prefill)  # literal, kind, stop, literal, kind, stop, ..., literal
    return parts[0::3], parts[2::3]


def choice_values(prefill: str) -> list[bool]:
    """Per generated value of ``prefill`` (in :func:`split_prefill`'s order): is it a
    ``{{choice:...}}`` (a value from the vocabulary)?"""
    return [kind == "choice" for kind in _GEN.split(prefill)[1::3]]


def json_strings(obj) -> list[str]:
    """Every string value inside a parsed JSON value (dict values, list items), in order."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in json_strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in json_strings(v)]
    return []


def parse(text: str, name: str, path: Path) -> Template:
    first, _, rest = text.partition("\n")
    if not first.startswith("version:"):
        raise TemplateError(f"{path} line 1: must be 'version: {name}/v<k>', got {first!r}")
    version = first.split(":", 1)[1].strip()
    if not re.fullmatch(rf"{re.escape(name)}/v\d+", version):
        raise TemplateError(f"{path} line 1: version {version!r} must look like '{name}/v<k>'")
    parts = _SECTION.split(rest)
    if parts[0].strip():
        raise TemplateError(f"{path}: text before the first '--- <role>' line")
    turns = [(parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]
    if not turns:
        raise TemplateError(f"{path}: no '--- system|user|assistant' section")
    prefill = ""
    if turns[-1][0] == "assistant":
        prefill = turns.pop()[1].rstrip("\n")
    for role, body in turns:
        if not body.strip():
            raise TemplateError(f"{path}: empty '{role}' section")
    return Template(name, version, tuple(turns), prefill, path)


@functools.lru_cache(maxsize=32)
def load(name: str, directory: str | None = None) -> Template:
    """The template ``prompts/<name>.txt`` (or ``<directory>/<name>.txt``)."""
    path = (Path(directory) if directory else PROMPTS_DIR) / f"{name}.txt"
    if not path.is_file():
        raise TemplateError(f"prompt template {path} not found")
    return parse(path.read_text(encoding="utf-8"), name, path)


def data_block(value: object, max_chars: int = 600) -> str:
    """``value`` as inert data for a prompt: JSON-encoded (quotes, newlines and angle brackets
    escaped, so it cannot close a fence or start a chat turn) and cut to ``max_chars``."""
    text = json.dumps(value, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e")
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
