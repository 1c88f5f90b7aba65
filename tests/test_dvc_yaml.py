"""genre_tasks.registry.dvc_yaml: DVC parses each YAML text once while a stage runs in-process."""
from __future__ import annotations

import io

import pytest

pytest.importorskip("dvc")

import dvc.utils.serialize as serialize  # noqa: E402
import dvc.utils.serialize._yaml as yaml_module  # noqa: E402
import dvc.utils.strictyaml as strictyaml  # noqa: E402

from genre_tasks.registry import dvc_yaml  # noqa: E402

TEXT = "stages:\n  train:  # the model\n    cmd: genre train\n    deps: [a, b]\n"


def _originals():
    return yaml_module.parse_yaml, serialize.parse_yaml, strictyaml.parse_yaml


def test_same_text_is_parsed_once_and_every_caller_gets_its_own_copy(monkeypatch):
    calls = []
    real = yaml_module.parse_yaml

    def counting(text, path, typ="safe"):
        calls.append((path, typ))
        return real(text, path, typ=typ)

    monkeypatch.setattr(yaml_module, "parse_yaml", counting)
    dvc_yaml._parsed.clear()
    with dvc_yaml.parsed_once():
        a = yaml_module.load_yaml.__globals__["parse_yaml"](TEXT, "dvc.yaml")  # what load_yaml calls
        b = strictyaml.parse_yaml(TEXT, "dvc.yaml")
        a["stages"]["train"]["deps"].append("changed by a caller")
        c = serialize.parse_yaml(TEXT, "other/dvc.yaml")
        rt = strictyaml.parse_yaml(TEXT, "dvc.yaml", typ="rt")
        rt2 = strictyaml.parse_yaml(TEXT, "dvc.yaml", typ="rt")
    assert calls == [("dvc.yaml", "safe"), ("dvc.yaml", "rt")]  # one real parse per (text, kind)
    assert b == c == real(TEXT, "x") and b is not c
    assert b["stages"]["train"]["deps"] == ["a", "b"]  # a caller's change does not leak
    # a round-trip parse keeps what DVC needs to write the file back (comments included)
    out = io.StringIO()
    from ruamel.yaml import YAML

    YAML(typ="rt").dump(rt2, out)
    assert "# the model" in out.getvalue() and rt is not rt2
    assert yaml_module.parse_yaml is counting  # put back as found


def test_a_corrupt_text_raises_dvcs_error_each_time():
    from dvc.utils.serialize import YAMLFileCorruptedError

    with dvc_yaml.parsed_once():
        for _ in range(2):
            with pytest.raises(YAMLFileCorruptedError, match="dvc.lock"):
                strictyaml.parse_yaml("a: [1, 2\n", "dvc.lock")


def test_dvcs_parser_is_back_after_the_outermost_context():
    before = _originals()
    with dvc_yaml.parsed_once():
        inside = _originals()
        with dvc_yaml.parsed_once():
            assert _originals() == inside
        assert _originals() == inside and all(getattr(f, "genre_cached", False) for f in inside)
    assert _originals() == before


def test_at_most_max_texts_are_kept(monkeypatch):
    monkeypatch.setattr(dvc_yaml, "MAX_TEXTS", 3)
    dvc_yaml._parsed.clear()
    with dvc_yaml.parsed_once():
        for i in range(5):
            strictyaml.parse_yaml(f"a: {i}\n", "p.yaml")
    assert len(dvc_yaml._parsed) == 3 and ("safe", "a: 4\n") in dvc_yaml._parsed
