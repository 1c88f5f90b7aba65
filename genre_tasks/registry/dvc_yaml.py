"""DVC's YAML parsing done once per text while a stage runs in this process.

One ``dvc repro --single-item <stage>`` (and the ``dvc push`` after it) parses params.yaml ~13
times (once per group of params dependencies), dvc.lock 4-5 times and dvc.yaml 4 times, each
with ruamel.yaml, whose constructor is pure Python even with the C parser: on a 9-stage run of
the pipeline ~0.4-0.6 s of a run-cache-restored stage's ~0.9 s went into YAML, the same texts
again and again.

:func:`parsed_once` keeps, while it is active, the parse of every (text, kind) DVC asked for and
hands DVC a deep copy of it when the same text comes again (a copy: DVC's callers may change what
they get). The result is exactly what DVC's own parser returns for that text; errors are not
kept (a corrupt file raises every time, with DVC's message). ``dvc.utils.serialize``'s plot
parsers (``PARSERS``) are left alone: only plots use them. Used around every use of DVC's
Python API: :mod:`~genre_tasks.registry.repro`, :mod:`~genre_tasks.registry.workspace`,
:mod:`genre_tasks.feedback.record`.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

#: texts kept per process (params.yaml, dvc.yaml, the versions of dvc.lock a stage sees, ...)
MAX_TEXTS = 32

_lock = threading.Lock()
_depth = 0
_original: Any = None  # DVC's parse_yaml while patched
_parsed: OrderedDict[tuple[str, str], Any] = OrderedDict()


def _modules():
    import dvc.utils.serialize as serialize
    import dvc.utils.serialize._yaml as yaml_module
    import dvc.utils.strictyaml as strictyaml

    return serialize, yaml_module, strictyaml


def _cached(parse):
    def parse_yaml(text, path, typ="safe"):
        key = (typ, text)
        with _lock:
            hit = _parsed.get(key)
            if hit is not None:
                _parsed.move_to_end(key)
        if hit is None:
            hit = parse(text, path, typ=typ)  # DVC's own: raises DVC's error for a corrupt file
            with _lock:
                _parsed[key] = hit
                while len(_parsed) > MAX_TEXTS:
                    _parsed.popitem(last=False)
        return copy.deepcopy(hit)

    parse_yaml.genre_cached = True
    return parse_yaml


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """While active (nesting allowed), DVC parses each YAML text once; DVC's own parser is put
    back when the outermost one ends. The parses are kept (at most :data:`MAX_TEXTS`, the least
    recently used go) for the next activation in this process: the push after a stage, the
    next stage of the task."""
    global _depth, _original
    serialize, yaml_module, strictyaml = _modules()
    with _lock:
        if _depth == 0:
            _original = yaml_module.parse_yaml
            yaml_module.parse_yaml = serialize.parse_yaml = strictyaml.parse_yaml = _cached(_original)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                yaml_module.parse_yaml = serialize.parse_yaml = strictyaml.parse_yaml = _original
                _original = None
