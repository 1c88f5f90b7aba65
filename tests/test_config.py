"""Params coercion (pydantic, strict): every wrong type or unknown key is refused, naming the
dotted key; what YAML legitimately gives (lists for tuples, ints for floats) is accepted."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from genre_tasks.config import ParamsError, from_dict
from genre_tasks.data.ingest import IngestParams


@dataclass(frozen=True)
class Inner:
    k: int = 3
    names: tuple[str, ...] = ("a",)

    def validate(self) -> None:
        if self.k > 100:
            raise ParamsError("inner.k must be <= 100")


@dataclass(frozen=True)
class Outer:
    rate: float = 0.1
    flag: bool = True
    mode: Literal["fast", "slow"] = "fast"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        if self.rate < 0:
            raise ParamsError("rate must be >= 0")


def test_yaml_shapes_are_accepted() -> None:
    p = from_dict(Outer, {"rate": 1, "inner": {"k": 5, "names": ["x", "y"]}, "limit": None}, "s")
    assert p.rate == 1.0 and isinstance(p.rate, float)
    assert p.inner == Inner(k=5, names=("x", "y"))
    assert p.limit is None and p.mode == "fast"


@pytest.mark.parametrize("data,needle", [
    ({"inner": {"k": "5"}}, "s.inner.k"),           # no "5" -> 5
    ({"inner": {"k": True}}, "s.inner.k"),          # no True -> 1
    ({"flag": 1}, "s.flag"),                        # no 1 -> True
    ({"flag": "yes"}, "s.flag"),
    ({"rate": "0.1"}, "s.rate"),
    ({"mode": "medium"}, "s.mode"),
    ({"limit": 2.5}, "s.limit"),
    ({"inner": {"names": "x"}}, "s.inner.names"),   # a string is not a list of names
    ({"colour": "red"}, "s: unknown key(s) ['colour']"),
    ({"inner": {"kk": 1}}, "s.inner: unknown key(s) ['kk']; allowed: ['k', 'names']"),
    ({"rate": -1.0}, "rate must be >= 0"),          # the dataclass's own rule still runs
    ({"inner": {"k": 101}}, "inner.k must be <= 100"),  # ... and a nested one's
])
def test_wrong_types_and_unknown_keys_are_refused(data: dict, needle: str) -> None:
    with pytest.raises(ParamsError) as info:
        from_dict(Outer, data, "s")
    assert needle in str(info.value)


def test_a_real_section_names_the_nested_key() -> None:
    with pytest.raises(ParamsError, match=r"ingest.tabular: unknown key\(s\) \['colour'\]"):
        from_dict(IngestParams, {"tabular": {"colour": 1}}, "ingest")
