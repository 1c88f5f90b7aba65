"""The GENRE-style two-tower network in torch and its training step: items understood through
language-model vectors. The recommender around it (scoring, fitting, persistence) is
:mod:`genre_tasks.models.model`.

Item tower (one per ``strategy``), rows = items of a catalogue (a :class:`~genre_tasks.models.views.FitData`):

``content``        MLP([sqrt(d) * item_vectors, genre multi-hot]) -> ``dim``, plus a linear
                   content bias. Needs nothing but the item's text vector and genres, so it
                   scores items no one interacted with (cold items).
``collaborative``  a learned id embedding and id bias per item of the fit catalogue.
``hybrid``         content projection + id embedding, content bias + id bias. During training
                   the id part of each item is dropped with probability ``id_dropout`` so the
                   content part alone is a usable representation.

Id embeddings only count for *known* items: items with at least one interaction (any rating)
in the data the model was fitted on (``id_known``). Any other item (cold, new, or absent from the fit catalogue)
gets no id contribution, so ``hybrid`` falls back to its content part and ``collaborative``
gives all of them the same score (0: it cannot tell them apart).

User tower: the item-tower outputs of the user's ``history_max`` most recent positives,
pooled by NRMS-style additive attention (``a_j = softmax_j(q . tanh(W h_j + b) + r_j)`` with a
learned recency term ``r_j`` per position from the end), by a plain mean, or sequence-aware
by a one-layer SASRec block (:class:`SelfAttentionPooling`: position embeddings, the most recent
item attending over the history) (``pooling``), then a linear projection. There are no per-user parameters: any history can be scored
(inductive), which serving needs.

Score of item i for user u = ``user(u) . item(i) + bias(i)``; equivalently the dot product of
:meth:`TorchRecommender.user_vectors` [n, dim + 1] and :meth:`TorchRecommender.item_representations`
[I, dim + 1] (the last column carries the bias). Users with an empty history get the
``no_history_fallback`` scores instead: ``popularity`` (log1p of the catalogue's fit
popularity) or ``genre_prior`` (item genres . the genre distribution of the catalogue's
positives).

The training loop (:class:`Trainer`) turns each positive of the fit rows into a next-item
example: target = that positive, history = the user's earlier positives (leave-future-out);
a user's first positive has no history and is not an example. Losses: sampled softmax over the
positive and ``negatives`` negatives drawn per example from popularity^0.75 or uniformly
(optional logQ correction), full softmax over the catalogue when ``negatives`` is 0, or BPR.
Negatives and the full softmax range over the known items only, so items the fit data never
mentions (e.g. cold items) are never pushed down.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from genre_tasks.models.views import FitData

STRATEGIES = ("content", "collaborative", "hybrid")
#: user tower poolings: NRMS additive attention, a plain mean, a one-layer SASRec block
POOLINGS = ("attention", "mean", "self_attention")
#: sampled negatives (``negatives`` > 0): ``batch`` = k draws shared by every example of a batch
#: (TensorFlow's sampled_softmax_loss; the item tower runs over k extra rows per step, not B x k),
#: ``example`` = k draws per example
NEGATIVE_SHARING = ("batch", "example")
#: Exponent of the popularity distribution negatives are sampled from.
POP_EXPONENT = 0.75
#: steps between two :func:`release_free_memory` calls in an epoch
RELEASE_EVERY = 50


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_free_memory() -> None:
    """Give glibc's freed heap pages back to the OS (``malloc_trim``; a no-op elsewhere).

    A training step's tensors change size with every batch (the distinct items of the batch),
    and glibc's heap fragments under that: at 168,200 items the process grew ~16 MB per step
    although nothing was kept (a 100x epoch peaked at 17 GB RSS). Trimming every
    :data:`RELEASE_EVERY` steps bounds it: one 288-step epoch on a synthetic 168k catalogue
    peaked at 7,748 MiB without, 2,607 MiB with it, in the same 54.1 s (every 10 steps: 1,690
    MiB, 61.3 s)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def uses_content(strategy: str) -> bool:
    return strategy in ("content", "hybrid")


def uses_ids(strategy: str) -> bool:
    return strategy in ("collaborative", "hybrid")


# --- catalogue features ----------------------------------------------------------------------

@dataclass
class Catalogue:
    """Item-tower inputs for the items of one FitData, plus one padding row at index I.

    feats     [I + 1, vec_dim + G] float32 content features (None for collaborative)
    id_rows   [I + 1] int64 row of the model's id table (the unknown row for unknown items)
    known     [I + 1] float32 1 = the id part counts (known item), else 0
    n_items   I
    """

    feats: torch.Tensor | None
    id_rows: torch.Tensor
    known: torch.Tensor
    n_items: int

    @property
    def pad(self) -> int:
        return self.n_items


def genre_columns(model_genres: Sequence[str], data_genres: Sequence[str], item_genres: np.ndarray) -> np.ndarray:
    """item_genres [I, len(data_genres)] re-indexed to ``model_genres`` by name (missing -> 0)."""
    col = {g: j for j, g in enumerate(data_genres)}
    out = np.zeros((item_genres.shape[0], len(model_genres)), dtype=np.float32)
    for k, g in enumerate(model_genres):
        j = col.get(g)
        if j is not None:
            out[:, k] = item_genres[:, j]
    return out


# --- modules ---------------------------------------------------------------------------------

class AdditiveAttention(nn.Module):
    """NRMS additive attention pooling with a learned recency bias per position.

    The attention logit of a history item, ``q . tanh(W h + b)``, depends on the item only, so
    it is computed once per distinct item (:meth:`item_logits`) and gathered per position;
    :meth:`weights` adds the recency term and normalises over the real positions.
    """

    def __init__(self, dim: int, hidden: int, max_len: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.query = nn.Linear(hidden, 1, bias=False)
        self.recency = nn.Parameter(torch.zeros(max_len))

    def item_logits(self, rep: torch.Tensor) -> torch.Tensor:
        """rep [U, D] -> [U] attention logits."""
        return self.query(torch.tanh(self.proj(rep))).squeeze(-1)

    def weights(self, item_logit: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist [B, L] rows of item_logit (right-aligned; L-1 = most recent), mask [B, L] -> [B, L]."""
        L = hist.shape[1]
        logits = item_logit[hist] + self.recency[-L:]
        w = torch.softmax(logits.masked_fill(~mask, -1e30), dim=1)
        return w * mask.to(w.dtype)  # rows without any item: all zero


class SelfAttentionPooling(nn.Module):
    """Sequence-aware user encoder: a one-layer SASRec block read at the most recent position.

    The history rows get a learned position embedding (right-aligned: the last one is the most
    recent item); the most recent position attends over the whole history (multi-head
    scaled dot-product attention, padding masked), followed by the residual + LayerNorm and the
    position-wise feed-forward of a Transformer layer. With one layer and SASRec's causal mask,
    the last position's output is exactly this: every earlier position's output would only
    feed a next layer. The attention weights of that query (mean over heads) explain the user
    vector like the additive attention's.
    """

    def __init__(self, dim: int, max_len: int, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"self_attention pooling: dim {dim} is not divisible by {heads} heads")
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, rep: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rep [U, D], hist [B, L] (right-aligned), mask [B, L] -> user states [B, D], weights [B, L]."""
        L = hist.shape[1]
        m = mask.to(rep.dtype).unsqueeze(-1)
        x = (rep[hist] + self.position[-L:]) * m
        pad = ~mask
        pad[:, -1] = False  # a row without any item attends to its (zero) last slot, not to nothing
        q = x[:, -1:]
        a, w = self.attn(q, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=True)
        h = self.norm1(q + a)
        h = self.norm2(h + self.ff(h))
        return h[:, 0], w[:, 0] * mask.to(w.dtype)


class TwoTower(nn.Module):
    """Item tower (by strategy) + history-pooling user tower; see the module docstring."""

    def __init__(self, strategy: str, n_ids: int, vec_dim: int, n_genres: int, dim: int = 64,
                 hidden: int = 256, pooling: str = "attention", dropout: float = 0.1,
                 history_max: int = 50, id_dropout: float = 0.0) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} not in {STRATEGIES}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} not in {POOLINGS}")
        self.strategy, self.pooling, self.dim = strategy, pooling, dim
        self.n_ids, self.vec_dim, self.n_genres = n_ids, vec_dim, n_genres
        self.history_max, self.id_dropout = history_max, id_dropout
        if uses_content(strategy):
            in_dim = vec_dim + n_genres
            self.content = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                         nn.Linear(hidden, dim))
            self.content_bias = nn.Linear(in_dim, 1)
            nn.init.zeros_(self.content_bias.weight)
            nn.init.zeros_(self.content_bias.bias)
        if uses_ids(strategy):
            # row n_ids = unknown item: zero and never trained (padding_idx)
            self.id_emb = nn.Embedding(n_ids + 1, dim, padding_idx=n_ids)
            nn.init.normal_(self.id_emb.weight, std=0.1 if strategy == "collaborative" else 0.01)
            with torch.no_grad():
                self.id_emb.weight[n_ids].zero_()
            self.id_bias = nn.Embedding(n_ids + 1, 1, padding_idx=n_ids)
            nn.init.zeros_(self.id_bias.weight)
        self.register_buffer("id_known", torch.zeros(n_ids + 1))
        self.user_dropout = nn.Dropout(dropout)
        self.attention = AdditiveAttention(dim, dim, history_max) if pooling == "attention" else None
        self.sequence = (SelfAttentionPooling(dim, history_max, dropout=dropout)
                         if pooling == "self_attention" else None)
        self.user_proj = nn.Linear(dim, dim)

    # items
    def items(self, cat: Catalogue, idx: torch.Tensor | None = None,
              drop_ids: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations [n, dim] and biases [n] of catalogue rows ``idx`` [n] (None: every row,
        the padding row included, without gathering a copy of the features)."""
        n = cat.n_items + 1 if idx is None else len(idx)
        rep = None
        bias = torch.zeros(n)
        if uses_content(self.strategy):
            x = cat.feats if idx is None else cat.feats[idx]
            rep = self.content(x)
            bias = bias + self.content_bias(x).squeeze(-1)
        if uses_ids(self.strategy):
            rows = cat.id_rows if idx is None else cat.id_rows[idx]
            known = cat.known if idx is None else cat.known[idx]
            if drop_ids and self.training and self.id_dropout > 0:
                keep = (torch.rand(n) >= self.id_dropout).to(known.dtype)
                known = known * keep
            emb = self.id_emb(rows) * known.unsqueeze(-1)
            rep = emb if rep is None else rep + emb
            bias = bias + self.id_bias(rows).squeeze(-1) * known
        return rep, bias

    # users
    def pool(self, rep: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User vectors [B, dim] and pooling weights [B, L].

        rep [U, dim] item representations, hist [B, L] rows of ``rep`` (the user's most recent
        positives, right-aligned), mask [B, L] True = real item.
        """
        if self.sequence is not None:
            state, w = self.sequence(rep, hist, mask)
            return self.user_proj(self.user_dropout(state)), w
        if self.attention is not None:
            w = self.attention.weights(self.attention.item_logits(rep), hist, mask)
        else:
            m = mask.to(rep.dtype)
            w = m / m.sum(1, keepdim=True).clamp_min(1.0)
        # weighted sum of the history rows (embedding_bag: fast, deterministic backward on CPU)
        pooled = nn.functional.embedding_bag(hist, rep, per_sample_weights=w, mode="sum")
        return self.user_proj(self.user_dropout(pooled)), w


def build_catalogue(net: TwoTower, data: FitData, model_item_ids: Sequence[str] | None,
                    model_genres: Sequence[str], use_genres: bool) -> Catalogue:
    """Item-tower inputs of ``data``'s catalogue for ``net``.

    Content features come from data.item_vectors (scaled by sqrt(d)) and data.item_genres
    mapped by genre name onto ``model_genres``; id rows map data.item_ids onto
    ``model_item_ids`` by id (None = the catalogue *is* the model's: row i = item i).
    """
    n = data.n_items
    feats = None
    if uses_content(net.strategy):
        vec = np.asarray(data.item_vectors, dtype=np.float32)
        if vec.shape != (n, net.vec_dim):
            raise ValueError(f"item_vectors {vec.shape} do not match the model's vec_dim {net.vec_dim}")
        g = genre_columns(model_genres, data.genre_names, np.asarray(data.item_genres, dtype=np.float32))
        if not use_genres:
            g[:] = 0.0
        f = np.concatenate([vec * math.sqrt(net.vec_dim), g], axis=1)
        feats = torch.from_numpy(np.concatenate([f, np.zeros((1, f.shape[1]), np.float32)]))
    if model_item_ids is None:
        rows = np.arange(n, dtype=np.int64)
    else:
        pos = {str(i): k for k, i in enumerate(model_item_ids)}
        rows = np.array([pos.get(str(i), net.n_ids) for i in data.item_ids], dtype=np.int64)
    rows = np.concatenate([rows, [net.n_ids]]).astype(np.int64)
    id_rows = torch.from_numpy(rows)
    known = net.id_known[id_rows].clone()
    return Catalogue(feats=feats, id_rows=id_rows, known=known, n_items=n)


def history_matrix(histories: Sequence[np.ndarray], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``length`` items of each history, right-aligned: ([n, L] int64, [n, L] bool)."""
    n = len(histories)
    out = np.full((n, length), pad, dtype=np.int64)
    for j, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-length:] if length > 0 else np.zeros(0, np.int64)
        if len(h):
            out[j, length - len(h):] = h
    return out, out != pad




def build_net(meta: dict) -> TwoTower:
    p = meta["params"]
    return TwoTower(meta["strategy"], n_ids=len(meta["item_ids"]), vec_dim=int(meta["vec_dim"]),
                    n_genres=len(meta["genre_names"]), dim=int(p["dim"]), hidden=int(meta["hidden"]),
                    pooling=p["pooling"], dropout=float(p["dropout"]), history_max=int(p["history_max"]),
                    id_dropout=float(meta.get("id_dropout", 0.0)))




# --- training --------------------------------------------------------------------------------

def training_examples(histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-item examples: (flat positives [P], example position in flat [E], user start [E]).

    Example e has target ``flat[pos[e]]`` and history ``flat[start[e]:pos[e]]`` (the user's
    earlier positives); every positive except each user's first is an example.
    """
    lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    flat = (np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            if len(histories) and lens.sum() else np.zeros(0, np.int64))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    user_start = np.repeat(starts, lens)
    pos = np.arange(len(flat), dtype=np.int64)
    keep = pos > user_start
    return flat, pos[keep], user_start[keep]


class Trainer:
    """Trains a :class:`TwoTower` on one FitData, one epoch per :meth:`epoch` call.

    Deterministic for a given seed: batches and negatives come from a seeded numpy Generator,
    dropout from torch's seeded generator (callers set torch.manual_seed and deterministic mode).
    """

    def __init__(self, net: TwoTower, data: FitData, *, loss: str, negatives: int, negative_sampling: str,
                 logq_correction: bool, batch_size: int, lr: float, weight_decay: float,
                 use_genres: bool, genre_names: Sequence[str], seed: int, ema_decay: float = 0.0,
                 dislike_weight: float = 0.0, negative_sharing: str = "example") -> None:
        if negative_sharing not in NEGATIVE_SHARING:
            raise ValueError(f"negative_sharing {negative_sharing!r} not in {NEGATIVE_SHARING}")
        self.net, self.data = net, data
        self.loss, self.k, self.batch_size = loss, negatives, batch_size
        self.shared = negative_sharing == "batch"
        self.logq = logq_correction
        self.rng = np.random.default_rng(seed)
        pop = np.asarray(data.popularity, dtype=np.float64)
        seen_any = np.asarray(data.seen.sum(axis=0)).ravel() > 0
        known = seen_any.astype(np.float32)
        with torch.no_grad():
            net.id_known.zero_()
            net.id_known[:data.n_items] = torch.from_numpy(known)
        self.cat = build_catalogue(net, data, None, genre_names, use_genres)
        self.candidates = np.flatnonzero(seen_any)  # items negatives are drawn from
        if negative_sampling == "popularity":
            w = np.maximum(pop[self.candidates], 1.0) ** POP_EXPONENT
        elif negative_sampling == "uniform":
            w = np.ones(len(self.candidates))
        else:
            raise ValueError(f"negative_sampling {negative_sampling!r} not in ('popularity', 'uniform')")
        self.q = w / w.sum() if len(w) else w
        self.cdf = np.cumsum(self.q)
        logq = np.zeros(data.n_items + 1, np.float32)
        if len(self.candidates):
            logq[self.candidates] = np.log(self.q)
        self.log_q = torch.from_numpy(logq)
        # full softmax: one additive offset per catalogue row, added to the logits by the same
        # addmm that forms them (no [B, I] masked copy per step): -inf for the rows the fit data
        # never mentions (and the padding row), so they are never pushed down; - log q with
        # logq_correction
        offset = np.where(np.concatenate([seen_any, [False]]), 0.0, -np.inf).astype(np.float32)
        self.full_offset = torch.from_numpy(offset - logq if logq_correction else offset)
        self.flat, self.ex_pos, self.ex_start = training_examples(data.histories)
        self.flat_padded = np.concatenate([self.flat, [self.cat.pad]])
        # "seen, not liked": per user, the fit items rated below the positive threshold; with
        # dislike_weight > 0 each example also pushes its target above one of them (pairwise)
        self.dislike_weight = float(dislike_weight)
        if self.dislike_weight > 0:
            lens = np.fromiter((len(h) for h in data.histories), dtype=np.int64, count=len(data.histories))
            ex_user = np.repeat(np.arange(len(lens)), lens)[self.ex_pos]
            neg = (data.seen.astype(np.float32) - data.positives.astype(np.float32)).tocsr()
            neg.data = (neg.data > 0).astype(np.float32)
            neg.eliminate_zeros()
            self.dis_ptr, self.dis_items = neg.indptr.astype(np.int64), neg.indices.astype(np.int64)
            self.ex_user = ex_user
        self.opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
        # ``model``: the network to evaluate and save; an exponential moving average of the
        # trained weights when ema_decay > 0 (smooths the epoch-to-epoch noise of Adam)
        self.ema_decay, self.steps = ema_decay, 0
        self.model = copy.deepcopy(net).eval() if ema_decay > 0 else net
        if ema_decay > 0:
            for q in self.model.parameters():
                q.requires_grad_(False)
            self._ema_params, self._net_params = list(self.model.parameters()), list(net.parameters())

    @property
    def n_examples(self) -> int:
        return len(self.ex_pos)

    def _batch(self, ex: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L = self.net.history_max
        pos, start = self.ex_pos[ex], self.ex_start[ex]
        idx = pos[:, None] - L + np.arange(L)[None, :]
        valid = idx >= start[:, None]
        hist = np.where(valid, self.flat_padded[np.clip(idx, 0, None)], self.cat.pad)
        return torch.from_numpy(hist), torch.from_numpy(valid), torch.from_numpy(self.flat[pos])

    def _sample(self, n: int) -> np.ndarray:
        """Sampled negatives: [n, k] (one draw per example), or [k] for the whole batch when
        shared (``negative_sharing: batch``)."""
        u = self.rng.random(self.k if self.shared else (n, self.k))
        j = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.candidates) - 1)
        return self.candidates[j]

    def _dislikes(self, ex: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One "seen, not liked" item per example of ``ex`` (uniform over its user's), and a mask
        of the examples whose user has one."""
        u = self.ex_user[ex]
        lo, hi = self.dis_ptr[u], self.dis_ptr[u + 1]
        has = hi > lo
        pick = lo + np.floor(self.rng.random(len(ex)) * np.maximum(hi - lo, 1)).astype(np.int64)
        items = np.where(has, self.dis_items[np.minimum(pick, max(len(self.dis_items) - 1, 0))]
                         if len(self.dis_items) else 0, 0)
        return torch.from_numpy(items.astype(np.int64)), torch.from_numpy(has)

    def sampled_scores(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                       neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the targets [B] and of the sampled negatives [B, k] (training mode).

        ``neg``: [B, k] (each example its own negatives) or [k] (shared by the batch).
        The item tower runs once over the distinct items of the batch (histories, targets,
        negatives: at most B * (history_max + 1) + B * k rows, or + k when shared, whatever the
        catalogue's size), and only the scores the loss uses are formed: not the [B, distinct
        items] matrix, which grows to B * (history_max + k) columns on a big catalogue."""
        B, n_h = len(target), hist.numel()
        uniq, inv = torch.unique(torch.cat([hist.reshape(-1), target, neg.reshape(-1)]), return_inverse=True)
        rep, bias = self.net.items(self.cat, uniq, drop_ids=True)
        u, _ = self.net.pool(rep, inv[:n_h].reshape(hist.shape), mask)
        t_row, n_rows = inv[n_h:n_h + B], inv[n_h + B:]
        s_pos = (u * rep[t_row]).sum(1) + bias[t_row]
        if neg.dim() == 1:  # shared: one [B, d] x [d, k] product
            s_neg = u @ rep[n_rows].T + bias[n_rows]
        else:
            n_rows = n_rows.reshape(B, -1)
            s_neg = torch.bmm(rep[n_rows], u.unsqueeze(2)).squeeze(2) + bias[n_rows]
        return s_pos, s_neg

    def step(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
             dislikes: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        net = self.net
        B = len(target)
        if self.k <= 0:  # full softmax over the known items of the catalogue
            rep, bias = net.items(self.cat, drop_ids=True)
            u, _ = net.pool(rep, hist, mask)
            logits = torch.addmm(bias + self.full_offset, u, rep.T)
            loss = nn.functional.cross_entropy(logits, target)
            if dislikes is not None and bool(dislikes[1].any()):
                items, has = dislikes
                s_pos = logits.gather(1, target.unsqueeze(1)).squeeze(1)
                s_dis = (u * rep[items]).sum(1) + bias[items]
                pair = nn.functional.softplus(-(s_pos - s_dis))[has]
                loss = loss + self.dislike_weight * pair.mean()
        else:
            neg = torch.from_numpy(self._sample(B))
            s_pos, s_neg = self.sampled_scores(hist, mask, target, neg)
            same = neg == target.unsqueeze(1)  # [B, k]: neg is [B, k] or shared [k] (broadcast)
            if self.loss == "bpr":
                diff = s_pos.unsqueeze(1) - s_neg
                w = (~same).to(diff.dtype)
                loss = (nn.functional.softplus(-diff) * w).sum() / w.sum().clamp_min(1.0)
            else:
                if self.logq:
                    s_pos = s_pos - self.log_q[target]
                    s_neg = s_neg - self.log_q[neg]  # [B, k] or [k] (broadcast)
                s_neg = s_neg.masked_fill(same, float("-inf"))
                loss = nn.functional.cross_entropy(torch.cat([s_pos.unsqueeze(1), s_neg], dim=1),
                                                   torch.zeros(B, dtype=torch.long))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema_decay > 0:
            # warm-up (as TensorFlow's ExponentialMovingAverage with num_updates): the average
            # follows the weights closely in the first steps, so short runs are not dominated
            # by the random initialisation
            self.steps += 1
            decay = min(self.ema_decay, (1.0 + self.steps) / (10.0 + self.steps))
            with torch.no_grad():  # one multi-tensor op (as torch.optim.swa_utils' EMA)
                torch._foreach_lerp_(self._ema_params, self._net_params, 1.0 - decay)
        return float(loss.detach())

    def epoch(self, progress: Callable[[Any], Any] | None = None) -> float:
        """One pass over the shuffled examples; returns the mean training loss."""
        self.net.train()
        order = self.rng.permutation(self.n_examples)
        total, n = 0.0, 0
        batches = range(0, len(order), self.batch_size)
        it = progress(batches) if progress is not None else batches
        for i, s in enumerate(it):
            ex = order[s:s + self.batch_size]
            hist, mask, target = self._batch(ex)
            loss = self.step(hist, mask, target, self._dislikes(ex) if self.dislike_weight > 0 else None)
            total += loss * len(ex)
            n += len(ex)
            if (i + 1) % RELEASE_EVERY == 0:
                release_free_memory()
        self.net.eval()
        return total / max(n, 1)
