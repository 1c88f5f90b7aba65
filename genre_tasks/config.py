"""params.yaml loading: one section per stage, each into a frozen, validated dataclass.

Each stage module defines its own ``@dataclass(frozen=True)`` params class and reads only
its own section, so `dvc.yaml` can declare exactly the params each stage depends on.
Overrides (e.g. ``configs/tiny.yaml``) are deep-merged on top of ``params.yaml``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = "params.yaml"
#: Environment variable naming extra override files (os.pathsep-separated).
OVERRIDE_ENV = "GENRE_PARAMS_OVERRIDE"


class ParamsError(ValueError):
    """A params.yaml section is missing, has unknown keys or a value of the wrong type."""


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` with ``override`` merged in recursively (override wins)."""
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


#: Sections that define the registry gate, the data rules and the reference baselines: they come
#: from the committed params only (params.yaml and the project's configs/ files), never from a
#: trigger form, an ad-hoc override file or the environment.
PROTECTED_SECTIONS = ("promote", "validate", "evaluate")
#: run-time escape hatches inside protected sections (recorded as forced, with who and why)
ESCAPE_HATCHES = frozenset({("promote", "force")})
#: path-like params and the folder they are relative to; run-time values must stay in <root>/data
PATH_PARAMS: dict[tuple[str, ...], str] = {
    ("ingest", "mind", "news"): "data/source",
    ("ingest", "mind", "behaviors"): "data/source",
    ("ingest", "tabular", "items"): "data/source",
    ("ingest", "tabular", "interactions"): "data/source",
    ("feedback", "incoming"): ".",
    ("feedback", "workdir"): ".",
    ("embed", "model_path"): ".",
    ("genre", "model_path"): ".",
}
#: the folder of committed override files (configs/tiny.yaml ...), relative to params.yaml
CONFIGS_DIR = "configs"


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict) and obj:
        return [leaf for k, v in obj.items() for leaf in _leaves(v, (*prefix, str(k)))]
    return [(prefix, obj)]


def _get(params: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(params, dict) or key not in params:
            return _MISSING
        params = params[key]
    return params


_MISSING = object()


def guard_overrides(base: dict, overrides: dict, root: str | Path, source: str) -> None:
    """Refuse (ParamsError naming every offending key) run-time ``overrides`` that would

    * change a gate / data-rule / baseline setting (:data:`PROTECTED_SECTIONS`) from what
      ``base`` (the committed params) says, except the :data:`ESCAPE_HATCHES`;
    * point a path-like param (:data:`PATH_PARAMS`) outside ``<root>/data`` (absolute paths,
      ``..``, or symlinks that lead out).
    """
    root = Path(root).resolve()
    problems = []
    for path, value in _leaves(overrides or {}):
        if not path:
            continue
        dotted = ".".join(path)
        if path[0] in PROTECTED_SECTIONS and path not in ESCAPE_HATCHES:
            current = _get(base, path)
            if current is _MISSING or current != value:
                problems.append(f"{dotted}={value!r}: a {path[0]} setting; it comes from the committed "
                                f"params.yaml only (change it there, in a reviewed commit)")
            continue
        for key, rel_to in PATH_PARAMS.items():
            if path[:len(key)] == key and value is not None:
                target = (root / rel_to / str(value)).resolve()
                data = (root / "data").resolve()
                if target != data and data not in target.parents:
                    problems.append(f"{dotted}={value!r}: resolves to {target}, outside {data}")
    if problems:
        raise ParamsError(f"{source}: refused:\n- " + "\n- ".join(problems))


def apply_overrides(base: dict, overrides: dict, root: str | Path, source: str) -> dict:
    """``base`` with run-time ``overrides`` (a trigger form, ...) merged in, after
    :func:`guard_overrides`."""
    guard_overrides(base, overrides, root, source)
    return deep_merge(base, overrides or {})


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str | Path] | None = None) -> dict:
    """Read ``path`` and deep-merge each override file (and $GENRE_PARAMS_OVERRIDE) on top.

    Override files in the project's ``configs/`` folder are committed configuration (trusted);
    any other file goes through :func:`guard_overrides` (no gate settings, paths inside data/).
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    params = yaml.safe_load(path.read_text()) or {}
    root = path.resolve().parent
    configs = root / CONFIGS_DIR
    extra = [p for p in os.environ.get(OVERRIDE_ENV, "").split(os.pathsep) if p]
    for ov in [*(overrides or []), *extra]:
        ov = Path(ov)
        if not ov.exists():
            raise ParamsError(f"{ov}: override file not found")
        doc = yaml.safe_load(ov.read_text()) or {}
        if configs not in ov.resolve().parents:
            guard_overrides(params, doc, root, f"override file {ov}")
        params = deep_merge(params, doc)
    return params


def _adapter(cls: type) -> Any:
    """A pydantic TypeAdapter for the params dataclass ``cls`` that refuses unknown keys."""
    import pydantic

    def configure(c: type) -> None:  # the config travels on each (nested) dataclass
        if "__pydantic_config__" not in vars(c):
            c.__pydantic_config__ = pydantic.ConfigDict(extra="forbid")
        for hint in typing.get_type_hints(c).values():
            for t in (hint, *_type_args(hint)):
                if dataclasses.is_dataclass(t) and isinstance(t, type):
                    configure(t)

    configure(cls)
    return pydantic.TypeAdapter(cls)


def _type_args(hint: Any) -> list:
    out = []
    for a in typing.get_args(hint):
        out += [a, *_type_args(a)]
    return out


def _message(cls: type, err: dict, where: str) -> str:
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)] if err["loc"] else []
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        dotted = ".".join([where, *loc[:-1]] if where else loc[:-1]) or cls.__name__
        parent = cls
        for key in loc[:-1]:
            hint = typing.get_type_hints(parent).get(key)
            parent = next((t for t in (hint, *_type_args(hint)) if dataclasses.is_dataclass(t)), parent)
        allowed = sorted(f.name for f in dataclasses.fields(parent))
        return f"{dotted}: unknown key(s) ['{loc[-1]}']; allowed: {allowed}"
    dotted = ".".join([where, *loc] if where else loc) or cls.__name__
    return f"{dotted}: {err['msg']}, got {err.get('input')!r}"


def _validate_tree(obj: Any) -> None:
    """Run each (nested) dataclass's own ``validate()`` rules, innermost first."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _validate_tree(getattr(obj, f.name))
        check = getattr(obj, "validate", None)
        if callable(check):
            check()
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _validate_tree(v)


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (validated by pydantic: unknown keys and wrong
    types are refused with the dotted key named), then apply its own ``validate()`` rules."""
    import pydantic

    if not isinstance(data, dict):
        raise ParamsError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    # validated as JSON, strictly: mappings fill dataclasses, lists fill tuples, an int is a
    # float, but "5" is no int and 1 no bool; YAML dates (unquoted) arrive as their ISO text
    try:
        obj = _adapter(cls).validate_json(json.dumps(data, default=str), strict=True)
    except pydantic.ValidationError as exc:
        raise ParamsError("; ".join(_message(cls, e, where) for e in exc.errors())) from None
    _validate_tree(obj)
    return obj


def section(cls: type[T], name: str, params: dict | None = None,
            path: str | Path = DEFAULT_PARAMS) -> T:
    """Load section ``name`` of params (read from ``path`` if not given) into ``cls``."""
    params = load_params(path) if params is None else params
    if name not in params:
        raise ParamsError(f"params: section '{name}' is missing")
    return from_dict(cls, params[name] or {}, name)
