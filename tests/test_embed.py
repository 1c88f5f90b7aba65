"""embed stage: encode_texts parity with sentence-transformers, outputs, and the text cache.

Uses the real packaged all-MiniLM-L6-v2 (loaded once per process, ~2 s).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from genre_tasks.features import embed
from genre_tasks import schema as S
from genre_tasks.config import ParamsError, from_dict
from genre_tasks.errors import StageError
from genre_tasks.schema import Paths

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "Four Rooms (1995). Genres: Thriller.",
    "Get Shorty (1995). Genres: Action, Comedy, Drama.",
    "Copycat (1995). Genres: Crime, Drama, Thriller.",
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",  # duplicate of item 0
    "A very long title about a very long film that goes on and on (1997). Genres: Drama, Romance, War.",
    "x",
    "Twelve Monkeys (1995). Genres: Drama, Sci-Fi.",
    "Babe (1995). Genres: Children's, Comedy, Drama.",
]

PARAMS = {"model_path": None, "batch_size": 4, "max_length": 128, "threads": 2, "show_progress": False}


def write_items(root, texts: list[str], ids: list[str] | None = None, shuffle: bool = False) -> Paths:
    paths = Paths(root)
    ids = ids or [f"i{k}" for k in range(len(texts))]
    df = pd.DataFrame({
        S.ITEM_ID: pd.array(ids, dtype="string"),
        S.ITEM_IDX: np.arange(len(texts), dtype=np.int32),
        S.TITLE: [t.split(" (")[0] for t in texts],
        S.TEXT: pd.array(texts, dtype="string"),
        S.GENRES: [["Drama"] for _ in texts],
    })
    if shuffle:
        df = df.sample(frac=1.0, random_state=0)
    paths.items.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(paths.items, index=False)
    return paths


def run_embed(paths: Paths, **over) -> dict:
    return embed.main({"embed": {**PARAMS, **over}}, paths)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers vectors of TEXTS (the tool a user would otherwise pick)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(embed.default_model_path()), device="cpu")
    return st.encode(TEXTS, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)


@pytest.mark.slow
def test_encode_texts_unit_norm_and_parity(reference: np.ndarray) -> None:
    vectors = embed.encode_texts(TEXTS, batch_size=4, max_length=128, threads=2)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cos = (vectors * reference).sum(axis=1)
    assert cos.min() > 0.999, cos
    # length bucketing restores the input order: reversed input -> reversed rows
    rev = embed.encode_texts(TEXTS[::-1], batch_size=3)
    np.testing.assert_allclose(rev[::-1], vectors, atol=1e-5)
    assert embed.encode_texts([]).shape == (0, 384)


@pytest.mark.slow
def test_encode_texts_restores_thread_count() -> None:
    import torch

    before = torch.get_num_threads()
    embed.encode_texts(["one"], threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_embed_stage_outputs_and_cache(tmp_path, reference: np.ndarray) -> None:
    paths = write_items(tmp_path, TEXTS, shuffle=True)  # rows out of order: output follows item_idx
    first = run_embed(paths)
    assert first["n_items"] == 10 and first["dim"] == 384
    assert first["n_embedded"] == 10 and first["n_cached"] == 0
    assert first["n_unique_texts"] == 9 and first["n_texts_encoded"] == 9  # item 5 repeats item 0
    assert first["texts_per_second"] > 0
    assert json.loads(paths.metrics("embed").read_text()) == first

    vectors = np.load(paths.vectors)
    assert vectors.shape == (10, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[5])  # identical text -> identical vector
    assert ((vectors * reference).sum(axis=1) > 0.999).all()  # row i = item_idx i
    index = pd.read_parquet(paths.vector_index)
    assert index[S.ITEM_IDX].tolist() == list(range(10))
    assert index[S.ITEM_ID].tolist() == [f"i{k}" for k in range(10)]
    assert index["text_hash"].str.len().eq(40).all()

    # unchanged input: nothing is encoded, output is bit-identical
    second = run_embed(paths)
    assert second["n_embedded"] == 0 and second["n_cached"] == 10 and second["n_texts_encoded"] == 0
    assert second["model_id"] == first["model_id"]
    assert np.array_equal(np.load(paths.vectors), vectors)

    # 10 new items: exactly those are encoded
    more = TEXTS + [f"New movie number {k} (2001). Genres: Comedy." for k in range(10)]
    write_items(tmp_path, more)
    third = run_embed(paths)
    assert third["n_items"] == 20 and third["n_embedded"] == 10 and third["n_cached"] == 10
    assert third["n_texts_encoded"] == 10
    assert np.array_equal(np.load(paths.vectors)[:10], vectors)

    # one changed text: exactly one encoded
    changed = list(more)
    changed[3] = "Get Shorty (1995). Genres: Comedy, Crime."
    write_items(tmp_path, changed)
    fourth = run_embed(paths)
    assert fourth["n_embedded"] == 1 and fourth["n_cached"] == 19 and fourth["n_texts_encoded"] == 1
    new_vectors = np.load(paths.vectors)
    assert not np.allclose(new_vectors[3], vectors[3])
    np.testing.assert_allclose(new_vectors[3], embed.encode_texts([changed[3]])[0], atol=1e-5)

    # a different max_length is a different model id -> its own cache
    fifth = run_embed(paths, max_length=64)
    assert fifth["model_id"] != first["model_id"] and fifth["n_cached"] == 0


def test_cache_shards_compaction_and_corruption(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(embed, "MAX_SHARDS", 3)
    cache = embed.EmbeddingCache(tmp_path, "m1")
    rng = np.random.default_rng(0)
    hashes = [f"{k:040x}" for k in range(12)]
    vecs = rng.normal(size=(12, 4)).astype(np.float32)
    for k in range(0, 12, 2):
        cache.add(hashes[k:k + 2], vecs[k:k + 2])
    assert len(cache.shards()) <= 3
    got, found = cache.lookup(hashes + ["f" * 40])
    assert found.tolist() == [True] * 12 + [False]
    np.testing.assert_array_equal(got[:12], vecs)

    (cache.dir / "shard-99999999999999999999-0-bad.npz").write_bytes(b"not a zip")
    got, found = cache.lookup(hashes)
    assert found.all()  # the unreadable shard is skipped, the rest still serves

    empty = embed.EmbeddingCache(tmp_path, "other")
    got, found = empty.lookup(hashes)
    assert got is None and not found.any()


def test_params_validation_and_errors(tmp_path) -> None:
    with pytest.raises(ParamsError):
        from_dict(embed.EmbedParams, {**PARAMS, "batch_size": 0})
    with pytest.raises(ParamsError):
        from_dict(embed.EmbedParams, {**PARAMS, "unknown": 1})
    with pytest.raises(StageError, match="config.json"):
        embed.resolve_model_path(tmp_path / "nope")
    with pytest.raises(StageError, match="preprocess"):
        run_embed(Paths(tmp_path))


def test_model_id_is_stable() -> None:
    a = embed.model_id(None, 128)
    assert a == embed.model_id(embed.default_model_path(), 128)
    assert len(a) == 20 and a != embed.model_id(None, 256)


def test_int8_encoder_is_a_separate_model_id_close_to_float32():
    """embed.quantize: the compressed encoder's vectors are close to the float32 ones (the
    attention-only variant closer than quantizing every layer), unit norm, and never share a
    cache with them (another model id)."""
    from genre_tasks import config

    f32 = embed.encode_texts(TEXTS, batch_size=4)
    att = embed.encode_texts(TEXTS, batch_size=4, quantize="int8-attention")
    full = embed.encode_texts(TEXTS, batch_size=4, quantize="int8")
    assert not np.allclose(att, f32, atol=1e-4)  # really another encoder
    cos_att, cos_full = (att * f32).sum(1), (full * f32).sum(1)
    assert cos_att.min() > 0.98 and cos_full.min() > 0.9 and cos_att.mean() > cos_full.mean()
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    ids = {embed.model_id(None, 128, q) for q in embed.QUANTIZE}
    assert len(ids) == len(embed.QUANTIZE) and embed.model_id(None, 128) == embed.model_id(None, 128, "none")
    with pytest.raises(config.ParamsError, match="embed.quantize: 'int4'"):
        config.section(embed.EmbedParams, "embed", {"embed": {"quantize": "int4"}})


def test_onnx_encoder_without_onnxruntime_is_a_clear_error(tmp_path, monkeypatch) -> None:
    """embed.quantize onnx* without the onnx extra: a StageError naming the extra, not an
    ImportError from deep inside (the torch encoders keep working)."""
    monkeypatch.setenv("GENRE_ENCODER_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(StageError, match=r"onnxruntime is not installed.*\.\[onnx\]"):
        embed.encode_texts(["x"], quantize="onnx-int8")
