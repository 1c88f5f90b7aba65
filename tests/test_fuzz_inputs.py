"""Property / fuzz tests (Hypothesis) of issue 9, item 7: malformed rows for every adapter and
for feedback batches. For each generated input the outcome is either

* refused: a StageError whose message names the user's file, every located problem on a
  line (or row) that exists in that file - and NO output written (ingest removes its raw
  tables; a quarantined batch leaves the store untouched), or
* accepted: canonical tables, every row pointing at an existing line, the same result when
  read again, all outputs written (an applied batch: exactly its rows in the store, once);

never another exception (a traceback) and never a partial write. Mutations: a field replaced
by hostile text (empty, blanks, 'five', 'nan', '1e309', U+FFFD, NUL, quotes, separators,
non-ASCII digits, a very long value), a field dropped or added, raw bytes (invalid UTF-8, a
BOM, CR) inserted, lines blanked / deleted / duplicated, the file truncated.

The examples per target come from GENRE_FUZZ_EXAMPLES (default 25; CI may raise it); the
statistics (examples, refused, accepted, tracebacks, partial writes) are printed at the end
of the module (`pytest -s tests/test_fuzz_inputs.py`).
"""
from __future__ import annotations

import collections
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import MIND_BEHAVIORS, MIND_NEWS, ML_INTER, ML_ITEM, ROOT, tabular_frames, write_movielens

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from genre_tasks.data import adapters  # noqa: E402
from genre_tasks import feedback
from genre_tasks.data import ingest
from genre_tasks import schema as S  # noqa: E402
from genre_tasks.errors import StageError  # noqa: E402

EXAMPLES = int(os.environ.get("GENRE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

HOSTILE = ["", " ", "five", "nan", "inf", "-1", "1e309", "11", "\ufffd", "u\ufffd3", "\x00",
           '"', '"unclosed', "a,b", "a\tb", "N1-", "N1-x", "-", "١٢٣", "\u00a0", "x" * 5000,
           "13/45/2019 8:55:22 AM", "2019-02-30", "(no genres listed)", "None", "NULL"]
RAW_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r", b"\x00", b"\xe9t\xe9"]


def values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=20))


@st.composite
def mutated(draw, text: str, sep: str) -> bytes:
    """``text`` (a valid file) with 1-3 random mutations."""
    lines = [line.encode("utf-8") for line in text.splitlines()]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add", "bytes", "blank", "delete", "dup",
                                   "truncate"]))
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        fields = lines[i].split(sep.encode())
        k = draw(st.integers(0, len(fields) - 1))
        if op == "replace":
            fields[k] = draw(values()).encode("utf-8", "surrogatepass")
            lines[i] = sep.encode().join(fields)
        elif op == "drop" and len(fields) > 1:
            del fields[k]
            lines[i] = sep.encode().join(fields)
        elif op == "add":
            fields.insert(k, draw(values()).encode("utf-8", "surrogatepass"))
            lines[i] = sep.encode().join(fields)
        elif op == "bytes":
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.sampled_from(RAW_BYTES)) + lines[i][pos:]
        elif op == "blank":
            lines.insert(i, b"")
        elif op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "truncate":
            data = b"\n".join(lines)
            return data[: draw(st.integers(0, len(data)))]
    return b"\n".join(lines) + b"\n"


def n_lines(data: bytes) -> int:
    return data.count(b"\n") + 1


def check_refusal(exc: StageError, path: Path, data: bytes, target: str) -> None:
    """A refusal names the file; located problems lie on lines of that file."""
    message = str(exc)
    assert path.name in message, message
    for problem in getattr(exc, "problems", []):
        assert problem.file.endswith(path.name), problem
        assert problem.line is None or 1 <= problem.line <= n_lines(data), (problem, data)
        assert problem.rule, problem
    STATS[target]["refused"] += 1


def ingest_outcome(root: Path, p: ingest.IngestParams, path: Path, data: bytes,
                   target: str) -> None:
    """Run ingest on the mutated file: refused with nothing written, or accepted with all
    outputs, canonical, located, deterministic."""
    paths = S.Paths(root)
    outputs = [paths.raw_items, paths.raw_interactions, paths.raw_lines, paths.raw_manifest]
    path.write_bytes(data)
    STATS[target]["examples"] += 1
    try:
        ingest.run(p, paths)
    except StageError as exc:
        check_refusal(exc, path, data, target)
        partial = [o for o in outputs if o.exists()]
        STATS[target]["partial writes"] += len(partial)
        assert not partial, partial
        return
    except Exception:
        STATS[target]["tracebacks"] += 1
        raise
    missing = [o for o in outputs if not o.exists()]
    STATS[target]["partial writes"] += len(missing)
    assert not missing
    STATS[target]["accepted"] += 1
    inter = pd.read_parquet(paths.raw_interactions)
    # a mapped column missing from a tabular file is left out (validate reports it)
    assert [c for c in S.INTERACTION_COLUMNS if c in inter.columns] == list(inter.columns)
    lines = pd.read_parquet(paths.raw_lines)
    mine = lines[lines[S.SOURCE_FILE].str.endswith(path.name)]
    assert mine[S.SOURCE_LINE].between(1, n_lines(data)).all()
    again = adapters.load(p, paths.source)
    pd.testing.assert_frame_equal(again[1], inter, check_dtype=False)


@pytest.fixture
def make_params(make_ingest_params):
    return make_ingest_params


def _project(tmp_path_factory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    return root


# --- adapters -------------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_fuzz_movielens(tmp_path_factory, make_params, data):
    root = _project(tmp_path_factory, "ml")
    write_movielens(S.Paths(root).source)
    which = data.draw(st.sampled_from(["ml-100k.item", "ml-100k.inter"]))
    base = ML_ITEM if which.endswith("item") else ML_INTER
    path = S.Paths(root).source / "ml-100k" / which
    ingest_outcome(root, make_params(adapter="movielens-100k"), path,
                   data.draw(mutated(base, "\t")), f"movielens {which}")


def _tsv(rows) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


def fuzz_files(tmp_path_factory, make_params, data, adapter: str, texts: dict[str, str],
               sep: str) -> None:
    """Write the valid ``texts`` as the source files, mutate one of them, ingest."""
    root = _project(tmp_path_factory, adapter)
    source = S.Paths(root).source
    source.mkdir(parents=True)
    for name, text in texts.items():
        (source / name).write_text(text)
    which = data.draw(st.sampled_from(sorted(texts)))
    ingest_outcome(root, make_params(adapter=adapter), source / which,
                   data.draw(mutated(texts[which], sep)), f"{adapter} {which}")


@FUZZ
@given(st.data())
def test_fuzz_mind(tmp_path_factory, make_params, data):
    fuzz_files(tmp_path_factory, make_params, data, "mind",
               {"news.tsv": _tsv(MIND_NEWS), "behaviors.tsv": _tsv(MIND_BEHAVIORS)}, "\t")


@FUZZ
@given(st.data())
def test_fuzz_tabular_csv(tmp_path_factory, make_params, data):
    items, inter = tabular_frames()
    fuzz_files(tmp_path_factory, make_params, data, "tabular",
               {"items.csv": items.to_csv(index=False),
                "interactions.csv": inter.to_csv(index=False)}, ",")


# --- parse failures under validate.on_bad_rows: quarantine ------------------------------------
def _ingest(root: Path, p: ingest.IngestParams, on_bad_rows: str):
    """Ingest from a clean data/raw: (refusal or None, interactions with their lines or None,
    unparsed table or None)."""
    paths = S.Paths(root)
    shutil.rmtree(paths.root / "data" / "raw", ignore_errors=True)
    try:
        ingest.run(p, paths, on_bad_rows=on_bad_rows)
    except StageError as exc:
        return exc, None, None
    lines = pd.read_parquet(paths.raw_lines)
    inter = lines[lines["table"] == "interactions"]
    unparsed = pd.read_parquet(paths.raw_unparsed) if paths.raw_unparsed.exists() else None
    return None, inter, unparsed


@FUZZ
@given(st.data())
def test_fuzz_quarantine_agrees_with_reject(tmp_path_factory, make_params, data):
    """The same mutated file ingested under reject and under quarantine. Accepted under
    reject -> accepted under quarantine, the same rows, nothing unparsed. Refused under
    quarantine -> refused under reject too, nothing written. Refused under reject only ->
    every located problem of the refusal is a listed unparsed row (file, line in the file,
    column, raw value, rule) and no kept row comes from such a line."""
    adapter, name, sep, texts = data.draw(st.sampled_from([
        ("movielens-100k", "ml-100k/ml-100k.inter", "\t", None),
        ("mind", "behaviors.tsv", "\t", {"news.tsv": _tsv(MIND_NEWS),
                                         "behaviors.tsv": _tsv(MIND_BEHAVIORS)}),
        ("tabular", "interactions.csv", ",", "tabular"),
    ]))
    root = _project(tmp_path_factory, "q")
    paths = S.Paths(root)
    if adapter == "movielens-100k":
        write_movielens(paths.source)
        base = ML_INTER
    else:
        if texts == "tabular":
            items, inter = tabular_frames()
            texts = {"items.csv": items.to_csv(index=False),
                     "interactions.csv": inter.to_csv(index=False)}
        paths.source.mkdir(parents=True)
        for file, text in texts.items():
            (paths.source / file).write_text(text)
        base = texts[name]
    path = paths.source / name
    rows = base.splitlines()  # one value of a data row made hostile, then 1-3 mutations
    i = data.draw(st.integers(0 if adapter == "mind" else 1, len(rows) - 1))
    fields = rows[i].split(sep)
    fields[data.draw(st.integers(0, len(fields) - 1))] = data.draw(st.sampled_from(HOSTILE))
    rows[i] = sep.join(fields)
    payload = data.draw(mutated("\n".join(rows) + "\n", sep))
    path.write_bytes(payload)
    target = f"quarantine {adapter} {path.name}"
    p = make_params(adapter=adapter)
    STATS[target]["examples"] += 1
    try:
        r_exc, r_inter, r_unparsed = _ingest(root, p, "reject")
        q_exc, q_inter, q_unparsed = _ingest(root, p, "quarantine")
    except Exception:
        STATS[target]["tracebacks"] += 1
        raise
    assert r_unparsed is None  # reject never sets rows aside
    if q_exc is not None:
        check_refusal(q_exc, path, payload, target)
        assert r_exc is not None, "refused under quarantine, accepted under reject"
        written = [o for o in (paths.raw_items, paths.raw_interactions, paths.raw_lines,
                               paths.raw_manifest, paths.raw_unparsed) if o.exists()]
        STATS[target]["partial writes"] += len(written)
        assert not written, written
        return
    STATS[target]["accepted"] += 1
    if r_exc is None:
        assert q_unparsed is None
        pd.testing.assert_frame_equal(q_inter.reset_index(drop=True),
                                      r_inter.reset_index(drop=True))
        return
    STATS[target]["quarantined"] += 1
    assert q_unparsed is not None and len(q_unparsed), r_exc
    assert q_unparsed["source_file"].str.endswith(path.name).all()
    assert q_unparsed["source_line"].between(1, n_lines(payload)).all()
    assert q_unparsed["rule"].str.len().gt(0).all()
    listed = set(zip(q_unparsed["column"], q_unparsed["source_line"]))
    for problem in getattr(r_exc, "problems", []):  # what reject named is what was set aside
        assert (problem.column, problem.line) in listed, (problem, listed)
    kept = set(q_inter.loc[q_inter[S.SOURCE_FILE].str.endswith(path.name), S.SOURCE_LINE])
    assert not kept & set(q_unparsed["source_line"])


# --- feedback batches -------------------------------------------------------------------------
BATCH_CSV = ("user_id,item_id,timestamp,rating\n1,3,1700000000,4\n2,1,1700000060,2\n"
             "7,5,1700000120,5\n")


@FUZZ
@given(st.data())
def test_fuzz_feedback_batches(tmp_path_factory, data):
    root = _project(tmp_path_factory, "fb")
    paths = S.Paths(root)
    write_movielens(paths.source)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] = {**params["ingest"], "adapter": "movielens-100k", "max_users": None}
    params["feedback"] = {"prequential": False, "dvc": False}
    fp = feedback.FeedbackPaths(paths)
    fp.incoming.mkdir(parents=True)
    fmt = data.draw(st.sampled_from(["csv", "parquet"]))
    if fmt == "csv":
        payload = data.draw(mutated(BATCH_CSV, ","))
    else:  # hostile values in typed / string columns of a parquet batch
        frame = pd.read_csv(pd.io.common.StringIO(BATCH_CSV), dtype=str)
        col = data.draw(st.sampled_from(list(frame.columns)))
        frame.loc[data.draw(st.integers(0, 2)), col] = data.draw(values())
        buf = pd.io.common.BytesIO()
        frame.to_parquet(buf, index=False)
        payload = buf.getvalue()
    target = f"feedback batch .{fmt}"
    STATS[target]["examples"] += 1
    (fp.incoming / f"b1.{fmt}").write_bytes(payload)
    try:
        out = feedback.run(params, paths, "2026-01-05T00:00:00+00:00")
    except Exception:
        STATS[target]["tracebacks"] += 1
        raise
    store, parts = adapters.read_store(paths.source)
    ledger = adapters.read_ledger(paths.source)
    part_files = sorted(p.name for p in adapters.store_dir(paths.source).glob("*.parquet")) \
        if adapters.store_dir(paths.source).is_dir() else []
    partial = len(part_files) != len(ledger)
    STATS[target]["partial writes"] += partial
    assert not partial, (part_files, ledger)
    assert not list(fp.incoming.iterdir())  # processed: applied or quarantined
    if out["batches"]["b1"] == "applied":
        STATS[target]["accepted"] += 1
        assert len(store) == ledger["b1"]["rows"] and not feedback.event_keys(store).duplicated().any()
    else:
        assert out["batches"]["b1"] == "quarantined" and len(store) == 0 and not ledger
        message = (fp.quarantine / "b1" / "message.txt").read_text()
        assert f"b1.{fmt}" in message
        STATS[target]["refused"] += 1
    shutil.rmtree(root, ignore_errors=True)


def test_zz_fuzz_statistics():
    """Print the statistics of the targets above (run in file order, this one last)."""
    if not STATS:
        pytest.skip("no fuzz target ran in this session")
    lines = ["", f"fuzz statistics ({EXAMPLES} examples per target requested):",
             f"  {'target':40s} {'examples':>8s} {'refused':>8s} {'accepted':>8s} "
             f"{'quarantined':>11s} {'tracebacks':>10s} {'partial writes':>14s}"]
    for target, c in sorted(STATS.items()):
        lines.append(f"  {target:40s} {c['examples']:8d} {c['refused']:8d} {c['accepted']:8d} "
                     f"{c['quarantined']:11d} {c['tracebacks']:10d} {c['partial writes']:14d}")
        assert c["tracebacks"] == 0 and c["partial writes"] == 0
        assert c["examples"] == c["refused"] + c["accepted"]
    print("\n".join(lines))
