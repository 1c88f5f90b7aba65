"""params.yaml loading: one section per stage, each into a frozen, validated dataclass.

Each stage module defines its own ``@dataclass(frozen=True)`` params class and reads only
its own section, so `dvc.yaml` can declare exactly the params each stage depends on.
Overrides (e.g. ``configs/tiny.yaml``) are deep-merged on top of ``params.yaml``.
"""
from __future__ import annotations

import dataclasses
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
    ("augment", "model_path"): ".",
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


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError("; ".join(errors))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ParamsError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ParamsError(f"{where or cls.__name__}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def section(cls: type[T], name: str, params: dict | None = None,
            path: str | Path = DEFAULT_PARAMS) -> T:
    """Load section ``name`` of params (read from ``path`` if not given) into ``cls``."""
    params = load_params(path) if params is None else params
    if name not in params:
        raise ParamsError(f"params: section '{name}' is missing")
    return from_dict(cls, params[name] or {}, name)
