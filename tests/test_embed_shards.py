"""Scale-out of embed: shards encode disjoint slices whose parts fill the cache; the embed stage
then encodes nothing and its vectors equal the single-process run's (max abs diff <= 1e-6).

A killed shard (a truncated part) and a part of another model are ignored, never mixed in.
"""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from genre_tasks.config import ParamsError, from_dict, section
from genre_tasks.features import embed
from genre_tasks.schema import Paths
from test_embed import PARAMS, TEXTS, run_embed, write_items

MORE = TEXTS + [f"Film number {k} ({1950 + k}). Genres: Drama." for k in range(23)]


@pytest.mark.parametrize("n_unique,n_shards", [(0, 1), (1, 3), (7, 2), (31, 4), (100, 7)])
def test_shard_slices_are_disjoint_and_cover_every_text(n_unique, n_shards):
    hashes = [f"{k:040x}" for k in range(n_unique)][::-1]  # any order in, sorted slices out
    parts = [embed.shard_slice(hashes + hashes[:3], s, n_shards) for s in range(n_shards)]
    flat = [h for part in parts for h in part]
    assert len(flat) == len(set(flat)) == n_unique  # disjoint, duplicates counted once
    assert set(flat) == set(hashes)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        embed.shard_slice(hashes, n_shards, n_shards)


def test_shards_param_is_validated():
    assert from_dict(embed.EmbedParams, {}).shards == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ParamsError, match="shards"):
            section(embed.EmbedParams, "embed", {"embed": {"shards": bad}})


def _sharded(root, texts, n_shards, parts_dir) -> tuple[Paths, list[dict]]:
    """Each shard in its own folder (a worker of its own: no shared cache) -> parts_dir."""
    out = []
    for s in range(n_shards):
        worker = write_items(root / f"worker{s}", texts)
        p = from_dict(embed.EmbedParams, {**PARAMS, "shards": n_shards})
        out.append(embed.run_shard(p, worker, s, parts_dir))
    return out


@pytest.mark.slow
def test_sharded_embed_equals_single_process_and_survives_a_killed_shard(tmp_path):
    single = write_items(tmp_path / "single", MORE, shuffle=True)
    one = run_embed(single)
    assert one["n_texts_encoded"] == len(set(MORE))
    expected = np.load(single.vectors)

    parts = tmp_path / "parts"
    n = 3
    # shard 1 is "killed" mid-write: a truncated part is what a crash could leave behind
    parts.mkdir()
    (parts / embed.shard_file_name(1, n)).write_bytes(b"PK\x03\x04 truncated")
    reports = _sharded(tmp_path, MORE, n, parts)  # the retry of shard 1 overwrites it
    assert sum(r["n_texts"] for r in reports) == len(set(MORE))
    assert all(r["n_texts_encoded"] == r["n_texts"] for r in reports)
    again = _sharded(tmp_path, MORE, n, tmp_path / "parts_again")  # a second retry: same bytes' worth
    for a, b in zip(reports, again):
        with np.load(a["file"]) as za, np.load(b["file"]) as zb:
            assert np.array_equal(za["hashes"], zb["hashes"])
            assert np.array_equal(za["vectors"], zb["vectors"])

    reduce = write_items(tmp_path / "reduce", MORE, shuffle=True)
    p = from_dict(embed.EmbedParams, {**PARAMS, "shards": n})
    imported = sum(embed.import_shard(p, reduce, part) for part in sorted(parts.glob("*.npz")))
    assert imported == len(set(MORE))
    summary = run_embed(reduce, shards=n)
    assert summary["n_texts_encoded"] == 0 and summary["n_cached"] == len(MORE)
    got = np.load(reduce.vectors)
    assert got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    print(f"sharded ({n} shards) vs single-process embed: max abs diff {diff:.3g}, "
          f"bitwise equal: {np.array_equal(got, expected)}")
    assert diff <= 1e-6
    pd.testing.assert_frame_equal(pd.read_parquet(reduce.vector_index), pd.read_parquet(single.vector_index))


@pytest.mark.slow
def test_bad_parts_are_ignored_and_the_stage_encodes_their_texts(tmp_path):
    parts = tmp_path / "parts"
    reports = _sharded(tmp_path, TEXTS, 2, parts)
    target = write_items(tmp_path / "target", TEXTS)
    p = from_dict(embed.EmbedParams, {**PARAMS, "shards": 2})
    # a truncated part (shard killed during upload): refused, adds nothing
    broken = tmp_path / "broken.npz"
    broken.write_bytes(open(reports[0]["file"], "rb").read()[:200])
    assert embed.import_shard(p, target, broken) == 0
    # a part of another model id (e.g. another max_length): refused
    other = tmp_path / "other.npz"
    shutil.copy(reports[0]["file"], other)
    with np.load(other) as z:
        data = dict(z)
    data["model_id"] = np.asarray("0" * 20)
    np.savez(other, **data)
    assert embed.import_shard(p, target, other) == 0
    # a part whose vectors were tampered with (not unit norm): refused
    data["model_id"] = np.asarray(reports[0]["model_id"])
    data["vectors"] = data["vectors"] * 2
    np.savez(other, **data)
    assert embed.import_shard(p, target, other) == 0
    # only shard 1's part arrives: the stage encodes shard 0's texts itself
    assert embed.import_shard(p, target, reports[1]["file"]) == reports[1]["n_texts"]
    summary = run_embed(target, shards=2)
    assert summary["n_texts_encoded"] == reports[0]["n_texts"]
