"""The two-tower recommender (:class:`TorchRecommender`): scoring any catalogue, fitting
(:func:`fit_model`, the loop around :class:`genre_tasks.models.tower.Trainer` with early stopping
on validation nDCG@10), persistence. The network itself is :mod:`genre_tasks.models.tower`; the
``train`` stage that fits every strategy and selects one is :mod:`genre_tasks.models.train`.

Score of item i for user u = ``user(u) . item(i) + bias(i)``; users with an empty history get
the ``no_history_fallback`` scores instead (:func:`fallback_scores`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from genre_tasks.models.determinism import deterministic, passive_openmp

passive_openmp()  # before torch's first import: see its docstring
import torch  # noqa: E402

from genre_tasks.models.params import TrainParams  # noqa: E402
from genre_tasks.models.tower import (Catalogue, Trainer, TwoTower, build_catalogue, build_net,
                                      history_matrix)
from genre_tasks.models.validation import eval_users, validation_ndcg
from genre_tasks.models.views import EvalData, FitData

#: score parts (:meth:`TorchRecommender.score`): the whole score, the item-bias prior alone
#: (non-personalised), the user . item part alone
PARTS = ("full", "prior", "personal")
MODEL_FILE = "model.pt"
META_FILE = "meta.json"


def fallback_scores(kind: str, data: FitData) -> np.ndarray:
    """Scores [I] for users with an empty history.

    ``popularity``   log1p(data.popularity) (positives per item in the fit rows);
    ``genre_prior``  item_genres . (genre distribution of all fit positives), a prior that also
                     covers items nobody interacted with.
    """
    pop = np.asarray(data.popularity, dtype=np.float64)
    if kind == "popularity":
        return np.log1p(pop).astype(np.float32)
    if kind == "genre_prior":
        g = np.asarray(data.item_genres, dtype=np.float64)
        dist = pop @ g
        total = dist.sum()
        dist = dist / total if total > 0 else np.full(g.shape[1], 1.0 / max(g.shape[1], 1))
        return (g @ dist).astype(np.float32)
    raise ValueError(f"no_history_fallback {kind!r} not in ('popularity', 'genre_prior')")




# --- recommender -----------------------------------------------------------------------------

class TorchRecommender:
    """A trained :class:`TwoTower` that implements :class:`genre_tasks.models.views.Recommender`.

    ``meta`` holds what is needed to rebuild and re-fit it: params (the train section),
    strategy, item_ids (the id table's order), genre_names, vec_dim, dim, best_epoch.
    Scoring works on any catalogue (see :meth:`score`).
    """

    def __init__(self, net: TwoTower, meta: dict) -> None:
        self.net = net.eval()
        self.meta = meta
        self.strategy: str = meta["strategy"]
        self.name = f"genre_{self.strategy}"
        self.params: dict = dict(meta.get("params", {}))
        self.item_ids: list[str] = [str(i) for i in meta["item_ids"]]
        self.genre_names: list[str] = list(meta["genre_names"])
        self.fallback: str = self.params.get("no_history_fallback", "popularity")
        self._session: tuple[FitData, tuple] | None = None

    # Recommender protocol
    def fit(self, data: FitData) -> "TorchRecommender":
        """Re-train from scratch on ``data`` with the stored params for ``best_epoch`` epochs."""
        p = TrainParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.params.items()})
        epochs = int(self.meta.get("best_epoch") or p.epochs)
        fitted = fit_model(p, self.strategy, data, ev=None, epochs=epochs, show_progress=False).recommender
        self.net, self.meta = fitted.net, {**fitted.meta, "best_epoch": epochs}
        self.item_ids = fitted.item_ids
        self.genre_names = fitted.genre_names
        return self

    def catalogue(self, data: FitData) -> Catalogue:
        same = len(self.item_ids) == data.n_items and np.array_equal(
            np.asarray(self.item_ids, dtype=str), np.asarray(data.item_ids).astype(str))
        return build_catalogue(self.net, data, None if same else self.item_ids, self.genre_names,
                               bool(self.params.get("use_genres", True)))

    @torch.no_grad()
    def _items(self, data: FitData) -> tuple[torch.Tensor, torch.Tensor, Catalogue]:
        """Item representations [I + 1, dim] (row I = padding, zero), biases [I + 1] and the
        catalogue of ``data``; reused inside a :meth:`scoring_session` on the same ``data``."""
        session = getattr(self, "_session", None)
        if session is not None and session[0] is data:
            return session[1]
        cat = self.catalogue(data)
        rep, bias = self.net.items(cat)
        rep[data.n_items] = 0.0
        return rep, bias, cat

    @contextlib.contextmanager
    def scoring_session(self, data: FitData):
        """Score calls on ``data`` inside it reuse one item-tower pass and one catalogue build
        (features of every item) instead of one per call: per user batch, that work grows with
        the catalogue. The network must not be trained inside it
        (:func:`genre_tasks.models.views.scoring_session`)."""
        before = getattr(self, "_session", None)
        self._session = None
        self._session = (data, self._items(data))
        try:
            yield self
        finally:
            self._session = before

    @torch.no_grad()
    def _users(self, histories: Sequence[np.ndarray], reps: torch.Tensor, pad: int,
               batch: int = 4096) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        hist, mask = history_matrix(histories, self.net.history_max, pad)
        out, weights = [], []
        for s in range(0, len(hist), batch):
            h = torch.from_numpy(hist[s:s + batch])
            m = torch.from_numpy(mask[s:s + batch])
            u, w = self.net.pool(reps, h, m)
            out.append(u)
            weights.append(w)
        return (torch.cat(out) if out else torch.zeros(0, self.net.dim)), weights

    def item_representations(self, data: FitData) -> np.ndarray:
        """[I, dim + 1] float32: item tower output for data's items, last column = item bias."""
        self.net.eval()
        rep, bias, _ = self._items(data)
        return torch.cat([rep[:-1], bias[:-1, None]], dim=1).numpy().astype(np.float32)

    def user_vectors(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        """[n, dim + 1] float32 user vectors (last column 1) so that score = U @ item_representations.T.

        Rows of empty histories are all zero: :meth:`score` gives those users the fallback.
        """
        self.net.eval()
        rep, _, cat = self._items(data)
        u, _ = self._users(histories, rep, cat.pad)
        out = torch.cat([u, torch.ones(len(u), 1)], dim=1).numpy().astype(np.float32)
        empty = np.array([len(h) == 0 for h in histories], dtype=bool)
        out[empty] = 0.0
        return out

    def attention(self, histories: Sequence[np.ndarray], data: FitData) -> list[np.ndarray]:
        """Per user, the pooling weight of each history item (as used, last ``history_max``).

        Explains a recommendation: which liked items the user vector is made of. Mean pooling
        gives uniform weights.
        """
        self.net.eval()
        rep, _, cat = self._items(data)
        hist, mask = history_matrix(histories, self.net.history_max, cat.pad)
        _, weights = self._users(histories, rep, cat.pad)
        out = []
        if self.net.pooling == "mean":
            for m in mask:
                out.append(np.full(int(m.sum()), 1.0 / max(int(m.sum()), 1), np.float32))
            return out
        w_all = torch.cat(weights).numpy() if weights else np.zeros((0, hist.shape[1]), np.float32)
        for w, m in zip(w_all, mask):
            out.append(w[m].astype(np.float32))
        return out

    def score(self, histories: Sequence[np.ndarray], data: FitData, part: str = "full") -> np.ndarray:
        """Scores [len(histories), data.n_items] float32 over data's catalogue (any catalogue).

        ``histories[j]`` are item_idx of ``data``. Items are represented from data.item_vectors /
        data.item_genres (by genre name) and, for id-based strategies, the model's id rows
        matched by item_id (unknown ids contribute nothing). Empty histories get
        :func:`fallback_scores`.

        ``part`` (see :data:`PARTS`): ``full`` = user . item + bias(item); ``prior`` = the item
        bias alone (one non-personalised list for every user: how much a popularity guess from
        the item's features explains); ``personal`` = user . item without the bias.
        """
        if part not in PARTS:
            raise ValueError(f"part {part!r} not in {PARTS}")
        self.net.eval()
        rep, bias, cat = self._items(data)
        with torch.no_grad():
            if part == "prior":
                scores = np.broadcast_to(bias[:-1].numpy().astype(np.float32),
                                         (len(histories), data.n_items)).copy()
            else:
                u, _ = self._users(histories, rep, cat.pad)
                scores = (u @ rep[:-1].T + (bias[:-1] if part == "full" else 0.0)).numpy().astype(np.float32)
        empty = np.array([len(h) == 0 for h in histories], dtype=bool)
        if empty.any():
            scores[empty] = fallback_scores(self.fallback, data)
        return scores


# --- persistence -----------------------------------------------------------------------------

def save(rec: TorchRecommender, model_dir: str | Path) -> tuple[Path, Path]:
    """Write model.pt (state_dict) and meta.json into ``model_dir`` atomically."""
    from genre_tasks import io

    model_dir = Path(model_dir)
    buf = BytesIO()  # not the temp file: torch.save names the archive after the file (random)
    torch.save(rec.net.state_dict(), buf)
    with io.atomic_path(model_dir / MODEL_FILE) as tmp:
        tmp.write_bytes(buf.getvalue())
    io.write_json(rec.meta, model_dir / META_FILE)
    return model_dir / MODEL_FILE, model_dir / META_FILE


def load_recommender(model_dir: str | Path) -> TorchRecommender:
    """Rebuild the TorchRecommender saved in ``model_dir`` (model.pt + meta.json)."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    net = build_net(meta)
    state = torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return TorchRecommender(net, meta)


# --- fitting ---------------------------------------------------------------------------------

@dataclass
class FitResult:
    recommender: Any  # genre_tasks.models.model.TorchRecommender
    curve: list[dict]  # per epoch: epoch, train_loss, valid_ndcg@10 (None without eval), seconds
    best_epoch: int
    best_ndcg: float
    n_examples: int
    seconds: float


def warm_state(net, init, item_ids) -> dict:
    """``init``'s (a TorchRecommender) weights for ``net`` (same strategy and sizes): every tensor
    as it is, except the id tables, whose rows are matched by item id (items ``init`` never saw
    keep their fresh initialisation: new ids are appended, not re-learnt from scratch)."""
    state = {k: v.clone() for k, v in init.net.state_dict().items()}
    own = net.state_dict()
    if "id_emb.weight" in own:
        pos = {iid: k for k, iid in enumerate(init.item_ids)}
        for key in ("id_emb.weight", "id_bias.weight"):
            fresh = own[key].clone()
            for row, iid in enumerate(item_ids):
                k = pos.get(str(iid))
                if k is not None:
                    fresh[row] = state[key][k]
            state[key] = fresh
        state["id_known"] = own["id_known"].clone()
    return state


def _prepare(p: TrainParams, strategy: str, fit: FitData, init: Any) -> tuple[TrainParams, Trainer, "TorchRecommender"]:
    """The network (random or ``init``'s weights), its Trainer and the recommender around its
    evaluation weights. Draws the initialisation from torch's global generator: the caller seeds it."""
    genre_names = list(init.genre_names) if init is not None else list(fit.genre_names)
    if init is not None:  # the architecture is the one being warm-started
        ip = init.params
        p = dataclasses.replace(p, dim=int(ip["dim"]), hidden=int(init.meta["hidden"]),
                                pooling=ip["pooling"], history_max=int(ip["history_max"]))
    net = TwoTower(strategy, n_ids=fit.n_items, vec_dim=int(fit.item_vectors.shape[1]),
                   n_genres=len(genre_names), dim=p.dim, hidden=p.hidden, pooling=p.pooling,
                   dropout=p.dropout, history_max=p.history_max,
                   id_dropout=p.id_dropout if strategy == "hybrid" else 0.0)
    if init is not None:
        if init.strategy != strategy:
            raise ValueError(f"warm start: {init.strategy} weights for a {strategy} model")
        net.load_state_dict(warm_state(net, init, fit.item_ids))
    trainer = Trainer(net, fit, loss=p.loss, negatives=p.negatives,
                      negative_sampling=p.negative_sampling, negative_sharing=p.negative_sharing,
                      logq_correction=p.logq_correction,
                      batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                      use_genres=p.use_genres, genre_names=genre_names, seed=p.seed,
                      ema_decay=p.ema_decay, dislike_weight=p.dislike_weight)
    meta = {"strategy": strategy, "params": p.as_dict(), "item_ids": [str(i) for i in fit.item_ids],
            "genre_names": genre_names, "vec_dim": int(fit.item_vectors.shape[1]),
            "dim": p.dim, "hidden": p.hidden, "id_dropout": net.id_dropout,
            "fit_phase": fit.phase, "n_examples": trainer.n_examples}
    return p, trainer, TorchRecommender(trainer.model, meta)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _epochs(p: TrainParams, strategy: str, fit: FitData, ev: EvalData | None, trainer: Trainer,
            rec: "TorchRecommender", epochs: int, show_progress: bool,
            on_epoch: Callable[[int, float, float], None] | None, live: Callable[..., None] | None,
            on_best: Callable[[int], None] | None = None) -> tuple[list[dict], float, int, bool]:
    """The epoch loop of :func:`fit_model` (early stopping with ``ev``); leaves the trainer's
    model on the best epoch's weights. ``on_best(e)``: epoch e is the best so far. Returns
    (curve, best valid nDCG@10, best epoch, whether ``ev`` had users to evaluate)."""
    from tqdm.auto import tqdm

    eval_u = eval_users(ev)[0] if ev is not None else None
    use_eval = eval_u is not None and len(eval_u) > 0
    curve: list[dict] = []
    best, best_epoch, since = -math.inf, 0, 0
    best_state = None
    for e in range(1, epochs + 1):
        t0 = time.perf_counter()
        bar = (lambda it, e=e: logged_progress(
            tqdm(it, desc=f"train {strategy} epoch {e}", unit="batch", leave=False,
                 disable=None if show_progress else True), f"train {strategy} {fit.phase} epoch {e}"))
        loss = trainer.epoch(bar)
        seconds = time.perf_counter() - t0
        ndcg = validation_ndcg(rec, fit, ev, p.seed) if use_eval else None
        curve.append({"epoch": e, "train_loss": loss, "valid_ndcg@10": ndcg, "seconds": seconds})
        if on_epoch is not None:
            on_epoch(e, loss, seconds)
        if live is not None:
            live(e, loss, seconds, ndcg)
        if not use_eval:
            best_epoch = e
            continue
        if ndcg > best:
            best, best_epoch, since = ndcg, e, 0
            best_state = _state(trainer.model)
            if on_best is not None:
                on_best(e)
        else:
            since += 1
            if since >= p.patience:
                break
    if best_state is not None:  # the early-stopping run ends on its best epoch's weights
        trainer.model.load_state_dict(best_state)
    trainer.net.eval()
    return curve, best, best_epoch, use_eval


def fit_model(p: TrainParams, strategy: str, fit: FitData, ev: EvalData | None = None,
              epochs: int | None = None, show_progress: bool = True,
              on_epoch: Callable[[int, float, float], None] | None = None,
              live: Callable[..., None] | None = None, init: Any = None) -> FitResult:
    """Train ``strategy`` on ``fit``.

    With ``ev``: up to ``epochs`` (default p.epochs) epochs, evaluating nDCG@10 after each and
    stopping after ``p.patience`` epochs without improvement; best_epoch = the best one.
    Without ``ev``: exactly ``epochs`` epochs (best_epoch = epochs). The returned recommender
    holds the weights of the best epoch (with ``ev``) or of the last one (without).
    ``init``: a TorchRecommender of the same strategy to start from (warm start: its weights,
    its genre vocabulary, id rows matched by item id) instead of a random initialisation.
    """
    passive_openmp()
    epochs = p.epochs if epochs is None else int(epochs)
    t_start = time.perf_counter()
    with deterministic(p.seed, p.threads):
        p, trainer, rec = _prepare(p, strategy, fit, init)
        curve, best, best_epoch, use_eval = _epochs(p, strategy, fit, ev, trainer, rec, epochs,
                                                    show_progress, on_epoch, live)
    rec.meta["best_epoch"] = best_epoch
    rec.meta["history"] = untimed(curve)
    return FitResult(recommender=rec, curve=curve, best_epoch=best_epoch,
                     best_ndcg=best if use_eval else float("nan"), n_examples=trainer.n_examples,
                     seconds=time.perf_counter() - t_start)


def side_by_side(p: TrainParams, strategy: str, warm: bool) -> bool:
    """Whether :func:`fit_and_refit` may run the early-stopping fit and the refit at the same
    time (``train.parallel_refit``: ``always``, or ``warm`` for warm starts; ``p.threads`` >= 2).
    Only when training draws nothing from torch's global generator (no dropout, no hybrid id
    dropout): two fits drawing from it at once would make the draws depend on timing."""
    wanted = p.parallel_refit == "always" or (p.parallel_refit == "warm" and warm)
    draws = p.dropout > 0 or (strategy == "hybrid" and p.id_dropout > 0)
    return wanted and p.refit and p.threads >= 2 and not draws


class _Stop(Exception):
    """Ends the refit's current epoch: an epoch past the one the refit needs."""


class _SideRefit(threading.Thread):
    """The refit (no validation, up to ``epochs`` epochs) in its own thread, keeping the
    weights after each epoch that may still become the best one of the early-stopping fit."""

    def __init__(self, trainer: Trainer, epochs: int, threads: int, desc: str) -> None:
        super().__init__(name="genre-refit", daemon=True)
        self.trainer, self.threads, self.desc = trainer, threads, desc
        self.lock = threading.Lock()
        self.limit, self.keep_from = epochs, 0
        self.snapshots: dict[int, dict] = {0: _state(trainer.model)}
        self.curve: list[dict] = []
        self.error: BaseException | None = None

    def _checked(self, e: int):
        def progress(it):
            for x in logged_progress(it, f"{self.desc} epoch {e}"):
                if e > self.limit:
                    raise _Stop
                yield x
        return progress

    def run(self) -> None:
        try:
            torch.set_num_threads(self.threads)  # per thread: this one's intra-op threads
            e = 0
            while e < self.limit:
                e += 1
                t0 = time.perf_counter()
                loss = self.trainer.epoch(self._checked(e))
                with self.lock:
                    self.curve.append({"epoch": e, "train_loss": loss, "valid_ndcg@10": None,
                                       "seconds": time.perf_counter() - t0})
                    if e >= self.keep_from:
                        self.snapshots[e] = _state(self.trainer.model)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() in the caller's thread
            self.error = exc

    def best_is(self, epoch: int) -> None:
        """Epoch ``epoch`` is the early-stopping fit's best so far: earlier ones are not needed."""
        with self.lock:
            self.keep_from = epoch
            for k in [k for k in self.snapshots if k < epoch]:
                del self.snapshots[k]

    def stop_after(self, epoch: int) -> None:
        """Let the refit run up to ``epoch`` epochs (stopping any epoch past it) and wait for it."""
        with self.lock:
            self.limit = epoch
        self.join()

    def finish(self, epoch: int) -> tuple[dict, list[dict]]:
        """(The refit's weights after ``epoch`` epochs, its curve up to there), once it got there."""
        self.stop_after(epoch)
        if self.error is not None:
            raise self.error
        return self.snapshots[epoch], self.curve[:epoch]


def fit_and_refit(p: TrainParams, strategy: str, fit_v: FitData, ev_v: EvalData, fit_t: FitData,
                  live: Callable[..., None] | None = None, live_refit: Callable[..., None] | None = None,
                  init: Any = None) -> tuple[FitResult, FitResult]:
    """The early-stopping fit on ``fit_v`` (validated on ``ev_v``) and the refit on ``fit_t``,
    side by side: one thread each, ``p.threads // 2`` intra-op threads each (:func:`side_by_side`
    says when this is allowed). The refit runs ahead without knowing the best epoch count,
    keeping its weights after each epoch that may still be the best; when early stopping ends,
    it is stopped (or run on) at the best epoch. Nothing depends on the epoch total, so the result
    is bitwise the refit :func:`fit_model` would give for that count with the same threads. The
    two-tower step gains little from a second thread, so two fits at once take 0.6-0.8x the time
    of one after the other (``benchmarks/bench_warm.py`` with ``parallel_refit`` never vs warm;
    less inside Airflow: README). Returns (early-stopping result, refit result) as two
    :func:`fit_model` calls would."""
    passive_openmp()
    threads = max(1, p.threads // 2)
    t_start = time.perf_counter()
    with deterministic(p.seed, threads):
        pv, valid_tr, valid_rec = _prepare(p, strategy, fit_v, init)
        torch.manual_seed(p.seed)  # the refit's initialisation: as in a fit of its own
        _, refit_tr, refit_rec = _prepare(p, strategy, fit_t, init)
        side = _SideRefit(refit_tr, p.epochs, threads, f"train {strategy} {fit_t.phase}")
        side.start()
        try:
            curve, best, best_epoch, use_eval = _epochs(pv, strategy, fit_v, ev_v, valid_tr, valid_rec,
                                                        p.epochs, True, None, live, on_best=side.best_is)
        except BaseException:
            side.stop_after(0)  # stop it at once; the fit's error is the one raised
            raise
        state, refit_curve = side.finish(best_epoch)
        refit_tr.model.load_state_dict(state)
        refit_tr.net.eval()
        refit_tr.model.eval()
    valid_rec.meta["best_epoch"] = best_epoch
    valid_rec.meta["history"] = untimed(curve)
    refit_rec.meta["best_epoch"] = best_epoch
    refit_rec.meta["history"] = untimed(refit_curve)
    if live_refit is not None:
        for c in refit_curve:
            live_refit(c["epoch"], c["train_loss"], c["seconds"], None)
    seconds = time.perf_counter() - t_start
    return (FitResult(recommender=valid_rec, curve=curve, best_epoch=best_epoch,
                      best_ndcg=best if use_eval else float("nan"), n_examples=valid_tr.n_examples,
                      seconds=seconds),
            FitResult(recommender=refit_rec, curve=refit_curve, best_epoch=best_epoch, best_ndcg=float("nan"),
                      n_examples=refit_tr.n_examples, seconds=seconds))


#: seconds between two progress lines of a training epoch (:func:`logged_progress`)
PROGRESS_SECONDS = 60.0


def logged_progress(it, desc: str, every: float = PROGRESS_SECONDS, log: logging.Logger | None = None):
    """Yield from ``it``, logging ``desc: batch i/n, s/batch`` at most every ``every`` seconds
    (a long epoch shows its rate in the stage log, where the tqdm bar is off)."""
    log = log or logging.getLogger("genre.train")
    n = len(it) if hasattr(it, "__len__") else None
    t0 = last = time.perf_counter()
    for i, x in enumerate(it, 1):
        yield x
        now = time.perf_counter()
        if now - last >= every:
            last = now
            log.info("%s: batch %d/%s, %.3f s/batch", desc, i, n if n is not None else "?", (now - t0) / i)


def untimed(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "seconds"} for c in curve]
