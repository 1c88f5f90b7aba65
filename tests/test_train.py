"""train stage + two-tower model on a tiny structured synthetic dataset.

Items come in clusters (one genre per cluster, item vectors = cluster centroid + noise); each
user likes the items of one cluster and dislikes a few others, so both the content and the
collaborative towers can learn something, and items nobody rated can only be placed by content.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from genre_tasks import config, io
from genre_tasks import schema as S
from genre_tasks.models.views import Dataset, FitData
from genre_tasks.data.preprocess import PreprocessParams, preprocess

torch = pytest.importorskip("torch")

from genre_tasks.models import model as M  # noqa: E402
from genre_tasks.models import tower  # noqa: E402
from genre_tasks.models import train  # noqa: E402

N_CLUSTERS, PER_CLUSTER, N_UNRATED, N_USERS, VEC_DIM = 4, 16, 3, 48, 24


def make_raw(seed: int = 0):
    """Raw items/interactions + item vectors (rows in items order); the last N_UNRATED items
    of each cluster are never rated."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(N_CLUSTERS, VEC_DIM))
    ids, titles, genres, cluster, vecs = [], [], [], [], []
    for c in range(N_CLUSTERS):
        for j in range(PER_CLUSTER):
            ids.append(f"m{c}_{j}")
            titles.append(f"Movie {c}-{j}")
            genres.append([f"G{c}"] + (["Extra"] if j % 5 == 0 else []))
            cluster.append(c)
            vecs.append(centroids[c] + 0.6 * rng.normal(size=VEC_DIM))
    vecs = np.asarray(vecs, dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = pd.DataFrame({S.ITEM_ID: ids, S.TITLE: titles, S.TEXT: titles, S.GENRES: genres})
    cluster = np.asarray(cluster)
    rated = np.array([int(i.split("_")[1]) < PER_CLUSTER - N_UNRATED for i in ids])
    rows = []
    for u in range(N_USERS):
        c = u % N_CLUSTERS
        liked = rng.permutation(np.flatnonzero((cluster == c) & rated))
        # popularity skew: lower item numbers are liked by more users
        liked = liked[: rng.integers(8, len(liked) + 1)]
        other = rng.choice(np.flatnonzero((cluster != c) & rated), size=3, replace=False)
        picks = [(i, 5.0) for i in liked] + [(i, float(rng.integers(1, 3))) for i in other]
        order = rng.permutation(len(picks))
        for t, k in enumerate(order):
            i, r = picks[k]
            rows.append((f"u{u}", ids[i], 1_000_000 + 1000 * t + u, r))
    inter = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING])
    inter[S.USER_ID] = inter[S.USER_ID].astype("string")
    inter[S.ITEM_ID] = inter[S.ITEM_ID].astype("string")
    inter[S.LABEL] = pd.array([pd.NA] * len(inter), dtype="Int8")
    inter[S.IMPRESSION_ID] = pd.array([pd.NA] * len(inter), dtype="string")
    return items, inter, vecs, cluster, ~rated


def write_processed(root, seed: int = 0) -> tuple[S.Paths, np.ndarray, np.ndarray]:
    items, inter, vecs, cluster, unrated = make_raw(seed)
    paths = S.Paths(root)
    items_p, inter_p, hist, stats = preprocess(items, inter, PreprocessParams())
    io.write_parquet(items_p, paths.items)
    io.write_parquet(inter_p, paths.interactions)
    io.write_parquet(hist, paths.histories)
    io.write_json(stats, paths.split_info)
    io.save_npy(vecs, paths.vectors)  # preprocess keeps the items' order: item_idx = row
    io.write_parquet(items_p[[S.ITEM_ID, S.ITEM_IDX]], paths.vector_index)
    return paths, cluster, unrated


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    paths, cluster, unrated = write_processed(tmp_path_factory.mktemp("synth"))
    ds = Dataset.load(paths)
    fit, ev = ds.phase("valid")
    return paths, ds, fit, ev, cluster, unrated


P = train.TrainParams(dim=16, hidden=32, history_max=10, epochs=6, patience=6, batch_size=64,
                      negatives=8, lr=0.01, dropout=0.0, threads=1, seed=7)


def random_ndcg(fit, ev, seeds=range(5)) -> float:
    from genre_tasks.evaluation import metrics

    out = []
    for s in seeds:
        scores = np.random.default_rng(s).random((len(ev.users), fit.n_items))
        out.append(metrics.ranking_metrics(scores, ev.targets, tie=metrics.tie_order(fit.n_items, 0),
                                           exclude=fit.seen.tocsr()[ev.users])["ndcg@10"].mean())
    return float(np.mean(out))


@pytest.fixture(scope="module")
def fitted(synth):
    _, _, fit, ev, _, _ = synth
    return {s: M.fit_model(P, s, fit, ev, show_progress=False) for s in train.TWO_TOWER}


def test_params_match_params_yaml():
    params = config.load_params("params.yaml")
    p = config.section(train.TrainParams, "train", params)
    assert set(params["train"]) <= {f.name for f in dataclasses.fields(train.TrainParams)}
    assert set(p.strategies) <= set(train.STRATEGIES)
    with pytest.raises(config.ParamsError):
        config.section(train.TrainParams, "train", {"train": {"strategies": ["nope"]}})
    with pytest.raises(config.ParamsError):
        config.section(train.TrainParams, "train", {"train": {"loss": "bpr", "negatives": 0}})


def test_importing_the_stage_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, genre_tasks.models.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_training_examples_are_leave_future_out():
    flat, pos, start = tower.training_examples([np.array([5, 6, 7]), np.array([], np.int64), np.array([1, 2])])
    assert flat.tolist() == [5, 6, 7, 1, 2]
    # targets 6, 7 (user 0) and 2 (user 2); each history = the earlier positives only
    assert [flat[p] for p in pos] == [6, 7, 2]
    assert [flat[s:p].tolist() for s, p in zip(start, pos)] == [[5], [5, 6], [1]]


@pytest.mark.parametrize("strategy", train.TWO_TOWER)
def test_training_reduces_loss_and_beats_random(synth, fitted, strategy):
    _, _, fit, ev, _, _ = synth
    res = fitted[strategy]
    losses = [c["train_loss"] for c in res.curve]
    assert losses[-1] < 0.8 * losses[0]
    assert res.best_ndcg > random_ndcg(fit, ev) + 0.1
    assert res.best_epoch == int(np.argmax([c["valid_ndcg@10"] for c in res.curve])) + 1


def test_training_is_deterministic(synth, tmp_path):
    _, _, fit, ev, _, _ = synth
    p = dataclasses.replace(P, epochs=2)
    a = M.fit_model(p, "hybrid", fit, ev, show_progress=False)
    b = M.fit_model(p, "hybrid", fit, ev, show_progress=False)
    assert [c["valid_ndcg@10"] for c in a.curve] == [c["valid_ndcg@10"] for c in b.curve]
    assert [c["train_loss"] for c in a.curve] == [c["train_loss"] for c in b.curve]
    h = [fit.histories[u] for u in range(fit.n_users)]
    assert np.array_equal(a.recommender.score(h, fit), b.recommender.score(h, fit))
    # the saved files are byte-identical too (DVC sees no change on a re-run)
    (pa, ma), (pb, mb) = M.save(a.recommender, tmp_path / "a"), M.save(b.recommender, tmp_path / "b")
    assert pa.read_bytes() == pb.read_bytes() and ma.read_text() == mb.read_text()
    # the global torch settings are restored
    assert not torch.are_deterministic_algorithms_enabled()
    from torch.utils import deterministic

    assert deterministic.fill_uninitialized_memory  # torch's default, put back


@pytest.mark.parametrize("case", ["early_stopped", "to_the_end", "warm"])
def test_side_by_side_refit_is_the_sequential_refit(synth, case):
    """fit_and_refit (the early-stopping fit and the refit at once, one thread each) gives
    bitwise what fit_model gives one after the other with one thread: the same early-stopping
    curve and weights, and the refit's weights after exactly the best epoch count, also when
    early stopping ends before the refit (which runs ahead) and when it runs to the budget."""
    _, ds, fit, ev, _, _ = synth
    fit_t, _ = ds.phase("test")
    p = dataclasses.replace(P, threads=2, ema_decay=0.9, parallel_refit="always",
                            **({"epochs": 12, "patience": 1, "lr": 0.05} if case == "early_stopped"
                               else {"epochs": 3}))
    init = None
    if case == "warm":
        init = M.fit_model(dataclasses.replace(p, threads=1), "content", fit, ev, show_progress=False).recommender
    assert M.side_by_side(p, "content", warm=False)
    refit_live = []
    valid, refit = M.fit_and_refit(p, "content", fit, ev, fit_t, init=init,
                                   live_refit=lambda *a: refit_live.append(a))
    one = dataclasses.replace(p, threads=1)
    v1 = M.fit_model(one, "content", fit, ev, show_progress=False, init=init)
    r1 = M.fit_model(one, "content", fit_t, None, epochs=v1.best_epoch, show_progress=False, init=init)
    if case == "early_stopped":
        assert v1.best_epoch < len(v1.curve) < p.epochs  # stopped early, before the budget
    elif case == "to_the_end":
        assert v1.best_epoch == len(v1.curve) == p.epochs
    else:  # the budget reached, the best epoch before it: the refit ran past the one it needs
        assert v1.best_epoch < len(v1.curve) == p.epochs
    assert valid.best_epoch == refit.best_epoch == v1.best_epoch
    assert M.untimed(valid.curve) == M.untimed(v1.curve)
    assert M.untimed(refit.curve) == M.untimed(r1.curve) and len(refit.curve) == v1.best_epoch
    assert [a[0] for a in refit_live] == list(range(1, v1.best_epoch + 1))
    for got, want in ((valid, v1), (refit, r1)):
        sa, sb = got.recommender.net.state_dict(), want.recommender.net.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        meta = {**got.recommender.meta, "params": {**got.recommender.meta["params"], "threads": 1}}
        assert meta == want.recommender.meta  # the configured threads (2) are recorded as given
        assert not got.recommender.net.training
    assert torch.get_num_threads() != 1 or P.threads == 1  # the caller's thread count is restored


def test_side_by_side_only_without_global_random_draws():
    """Two fits drawing dropout masks from torch's one global generator at once would make the
    draws depend on thread timing: those fits stay one after the other."""
    p = dataclasses.replace(P, threads=2, parallel_refit="warm")
    assert M.side_by_side(p, "content", warm=True) and not M.side_by_side(p, "content", warm=False)
    always = dataclasses.replace(p, parallel_refit="always")
    assert M.side_by_side(always, "content", warm=False)
    assert M.side_by_side(always, "hybrid", warm=False) is False  # id dropout draws
    assert M.side_by_side(dataclasses.replace(always, id_dropout=0.0), "hybrid", warm=False)
    assert not M.side_by_side(dataclasses.replace(always, dropout=0.1), "content", warm=False)
    assert not M.side_by_side(dataclasses.replace(always, threads=1), "content", warm=False)
    assert not M.side_by_side(dataclasses.replace(always, parallel_refit="never"), "content", warm=True)
    assert not M.side_by_side(dataclasses.replace(always, refit=False), "content", warm=True)


def test_side_by_side_refit_error_reaches_the_caller(synth, monkeypatch):
    """An error in the refit's thread is raised in the caller's (not lost with the thread)."""
    _, ds, fit, ev, _, _ = synth
    fit_t, _ = ds.phase("test")
    real = tower.Trainer.epoch

    def epoch(self, progress=None):
        if self.data is fit_t:
            raise MemoryError("refit out of memory")
        return real(self, progress)

    monkeypatch.setattr(tower.Trainer, "epoch", epoch)
    with pytest.raises(MemoryError, match="refit out of memory"):
        M.fit_and_refit(dataclasses.replace(P, threads=2, epochs=2), "content", fit, ev, fit_t)


@pytest.mark.parametrize("sharing", ["batch", "example"])
def test_sampled_step_scores_only_the_sampled_items(synth, sharing):
    """negatives > 0: the step's scores equal the [batch, distinct items] formulation, but no
    tensor of that shape (or batch x catalogue) is ever formed: a step's cost is bounded by the
    batch, not by the catalogue. Shared negatives are one [k] draw for the whole batch."""
    from torch.overrides import TorchFunctionMode

    _, _, fit, _, _, _ = synth
    k, bs = 3, 32
    p = dataclasses.replace(P, negatives=k, batch_size=bs)
    net = tower.TwoTower("content", fit.n_items, VEC_DIM, len(fit.genre_names), dim=p.dim, hidden=p.hidden,
                         history_max=p.history_max, dropout=0.0)
    tr = tower.Trainer(net, fit, loss="softmax", negatives=k, negative_sampling="popularity",
                       logq_correction=False, batch_size=bs, lr=p.lr, weight_decay=0.0, use_genres=True,
                       genre_names=fit.genre_names, seed=0, negative_sharing=sharing)
    hist, mask, target = tr._batch(np.arange(bs))
    neg = torch.from_numpy(tr._sample(bs))
    assert neg.shape == ((k,) if sharing == "batch" else (bs, k))
    n_distinct = len(torch.unique(torch.cat([hist.reshape(-1), target, neg.reshape(-1)])))
    assert n_distinct > max(p.dim, p.history_max, k + 1)  # else the check below proves nothing

    class Shapes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                          if isinstance(t, torch.Tensor)]
            return out

    net.eval()  # no dropout: the two formulations see the same network
    with Shapes() as rec:
        s_pos, s_neg = tr.sampled_scores(hist, mask, target, neg)
    wide = [s for s in rec.seen if len(s) == 2 and s[0] == bs and s[1] > max(p.dim, p.history_max, k + 1)]
    assert not wide, wide
    assert s_pos.shape == (bs,) and s_neg.shape == (bs, k)
    # the reference: every item of the catalogue scored, then the target / negatives picked
    with torch.no_grad():
        rep, bias = net.items(tr.cat, torch.arange(fit.n_items + 1))
        u, _ = net.pool(rep, hist, mask)
        full = u @ rep.T + bias
    assert torch.allclose(s_pos, full.gather(1, target[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(s_neg, full.gather(1, neg.expand(bs, k)), atol=1e-5)


@pytest.mark.parametrize("logq", [False, True])
def test_full_softmax_step_ranges_over_the_known_items_only(synth, logq):
    """negatives 0: the step's loss is the cross-entropy over the items the fit data mentions
    (minus log q with logq_correction), computed here the plain way; the unrated items and the
    padding row get no probability mass, so no gradient reaches their biases."""
    _, _, fit, _, _, unrated = synth
    bs = 32
    net = tower.TwoTower("content", fit.n_items, VEC_DIM, len(fit.genre_names), dim=P.dim, hidden=P.hidden,
                         history_max=P.history_max, dropout=0.0)
    tr = tower.Trainer(net, fit, loss="softmax", negatives=0, negative_sampling="popularity",
                       logq_correction=logq, batch_size=bs, lr=P.lr, weight_decay=0.0, use_genres=True,
                       genre_names=fit.genre_names, seed=0)
    known = np.asarray(fit.seen.sum(axis=0)).ravel() > 0
    assert (~known).sum() >= unrated.sum() > 0  # else the check proves nothing
    hist, mask, target = tr._batch(np.arange(bs))
    net.train()
    with torch.no_grad():
        rep, bias = net.items(tr.cat, torch.arange(fit.n_items + 1))
        u, _ = net.pool(rep, hist, mask)
        logits = (u @ rep.T + bias)[:, :fit.n_items][:, known]
        if logq:
            logits = logits - tr.log_q[:fit.n_items][known]
        col = torch.from_numpy(np.cumsum(known) - 1)[target]  # target's column among the known items
        want = float(torch.nn.functional.cross_entropy(logits, col))
    # the content bias's gradient, per item = its input row x d loss / d bias_i: zero rows for
    # items without mass are seen through a leaf bias added in the same place
    probe = torch.zeros(fit.n_items + 1, requires_grad=True)
    items = net.items
    net.items = lambda *a, **k: (lambda r, b: (r, b + probe))(*items(*a, **k))
    try:
        got = tr.step(hist, mask, target)
    finally:
        del net.items
    assert got == pytest.approx(want, rel=1e-5)
    grad = probe.grad.numpy()
    assert np.all(grad[:fit.n_items][~known] == 0.0) and grad[fit.n_items] == 0.0
    assert np.any(grad[:fit.n_items][known] != 0.0)


def test_validation_scores_users_in_cell_bounded_batches(synth, fitted, monkeypatch):
    from genre_tasks.models import validation

    _, _, fit, ev, _, _ = synth
    rec = fitted["content"].recommender
    ref = validation.validation_ndcg(rec, fit, ev, seed=3)
    sizes = []
    real = rec.score
    monkeypatch.setattr(rec, "score", lambda h, data: sizes.append(len(h)) or real(h, data))
    monkeypatch.setattr(validation, "BATCH_CELLS", 5 * fit.n_items)
    tower_passes = []
    real_items = rec.net.items
    monkeypatch.setattr(rec.net, "items", lambda *a, **k: tower_passes.append(1) or real_items(*a, **k))
    assert validation.validation_ndcg(rec, fit, ev, seed=3) == pytest.approx(ref, abs=1e-12)
    assert max(sizes) == 5 and sum(sizes) == len(ev.users)
    # one item-tower pass for all the batches (the scoring session), not one per batch
    assert len(sizes) > 1 and len(tower_passes) == 1
    assert rec._session is None  # closed: a later call on changed weights recomputes
    rec.score([fit.histories[0]], fit)
    assert len(tower_passes) == 2


def test_evaluation_scores_a_two_tower_with_one_item_pass(synth, fitted, monkeypatch):
    """evaluate's batches (protocol.evaluate_recommender) share one item-tower pass, also
    through fusion and the part views; the metrics equal one batch for everyone."""
    from genre_tasks.evaluation import protocol
    from genre_tasks.evaluation.evaluate import PartView

    _, _, fit, ev, _, _ = synth
    rec = fitted["content"].recommender
    ref = protocol.evaluate_recommender(rec, fit, ev, seed=1, batch_users=10_000)
    passes = []
    real_items = rec.net.items
    monkeypatch.setattr(rec.net, "items", lambda *a, **k: passes.append(1) or real_items(*a, **k))
    res = protocol.evaluate_recommender(rec, fit, ev, seed=1, batch_users=4)
    assert len(passes) == 1
    assert res.metrics == pytest.approx(ref.metrics, abs=1e-9)
    protocol.evaluate_recommender(PartView(rec, "personal", "personal"), fit, ev, seed=1, batch_users=4)
    assert len(passes) == 2


def test_long_epochs_log_their_rate(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="genre.train"):
        out = list(M.logged_progress(range(3), "train content valid epoch 1", every=0.0))
    assert out == [0, 1, 2]
    assert "train content valid epoch 1: batch 3/3" in caplog.text and "s/batch" in caplog.text


def test_early_stopping_respects_patience(synth):
    _, _, fit, ev, _, _ = synth
    res = M.fit_model(dataclasses.replace(P, epochs=40, patience=2), "collaborative", fit, ev,
                          show_progress=False)
    assert len(res.curve) == min(40, res.best_epoch + 2)


def test_content_scores_unseen_items_collaborative_does_not(synth, fitted):
    _, _, fit, _, cluster, unrated = synth
    unseen = np.flatnonzero(unrated)
    assert fit.popularity[unseen].sum() == 0 and np.asarray(fit.seen.sum(0)).ravel()[unseen].sum() == 0
    users = np.arange(fit.n_users)
    h = [fit.histories[u] for u in users]
    # user "u<k>" likes cluster k % 4 (user_idx follows the sorted ids)
    user_cluster = np.array([int(uid[1:]) % N_CLUSTERS for uid in fit.user_ids])
    for strategy in ("content", "hybrid"):
        s = fitted[strategy].recommender.score(h, fit)[:, unseen]
        assert s.std(axis=1).min() > 0  # unseen items are told apart
        same = cluster[unseen][None, :] == user_cluster[:, None]
        # for most users, the unseen items of their own cluster score higher than the others
        gap = np.array([s[j, same[j]].mean() - s[j, ~same[j]].mean() for j in range(len(users))])
        assert (gap > 0).mean() > 0.9, strategy
    s = fitted["collaborative"].recommender.score(h, fit)[:, unseen]
    assert np.all(s == s[:, :1])  # no id embedding: every unseen item scores the same


def _extended(fit: FitData) -> FitData:
    """fit's catalogue, items in reverse order, genres in another column order + a new item
    whose id the model never saw, with a genre it never saw."""
    order = np.arange(fit.n_items)[::-1]
    rng = np.random.default_rng(3)
    v = rng.normal(size=(1, fit.item_vectors.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v)
    names = ["Brand-New"] + list(fit.genre_names)[::-1]
    g = np.concatenate([np.zeros((fit.n_items, 1), np.float32), fit.item_genres[:, ::-1]], axis=1)[order]
    g = np.concatenate([g, np.eye(1, len(names), 0, dtype=np.float32)])
    pop = np.concatenate([fit.popularity[order], [0]])
    return dataclasses.replace(
        fit, n_items=fit.n_items + 1, item_ids=np.concatenate([fit.item_ids[order], ["never-seen"]]),
        item_vectors=np.concatenate([fit.item_vectors[order], v]), item_genres=g, genre_names=names,
        popularity=pop, timestamps=np.concatenate([fit.timestamps[order], [0]]),
        positives=None, seen=None, histories=[])


@pytest.mark.parametrize("strategy", train.TWO_TOWER)
def test_score_on_another_catalogue(synth, fitted, strategy):
    _, _, fit, _, _, _ = synth
    rec = fitted[strategy].recommender
    other = _extended(fit)
    remap = np.empty(fit.n_items, np.int64)
    remap[np.arange(fit.n_items)[::-1]] = np.arange(fit.n_items)  # old idx -> new idx
    h = [fit.histories[u] for u in range(10)]
    base = rec.score(h, fit)
    s = rec.score([remap[x] for x in h], other)
    assert s.shape == (10, fit.n_items + 1) and np.isfinite(s).all()
    np.testing.assert_allclose(s[:, remap], base, rtol=1e-5, atol=1e-5)
    reps = rec.item_representations(other)
    users = rec.user_vectors([remap[x] for x in h], other)
    np.testing.assert_allclose(users @ reps.T, s, rtol=1e-4, atol=1e-4)
    if strategy == "collaborative":
        unknown = np.asarray(fit.seen.sum(axis=0)).ravel() == 0
        assert np.allclose(s[:, -1:], base[:, unknown][:, :1])  # same as any item without id


def test_empty_history_gets_the_fallback(synth, fitted):
    _, _, fit, _, _, _ = synth
    rec = fitted["hybrid"].recommender
    s = rec.score([np.zeros(0, np.int64), fit.histories[0]], fit)
    np.testing.assert_allclose(s[0], np.log1p(fit.popularity))
    assert not np.allclose(s[1], s[0])
    rec.fallback = "genre_prior"
    g = rec.score([np.zeros(0, np.int64)], fit)[0]
    dist = fit.popularity @ fit.item_genres
    np.testing.assert_allclose(g, fit.item_genres @ (dist / dist.sum()), rtol=1e-5)
    rec.fallback = "popularity"
    assert np.all(rec.user_vectors([np.zeros(0, np.int64)], fit) == 0)
    w = rec.attention([fit.histories[0]], fit)[0]
    assert len(w) == min(len(fit.histories[0]), P.history_max) and abs(w.sum() - 1) < 1e-5


@pytest.mark.parametrize("overrides", [
    {"loss": "bpr", "pooling": "mean", "negative_sampling": "uniform"},
    {"negatives": 0, "use_genres": False},
    {"logq_correction": True, "ema_decay": 0.9},
    {"negatives": 5, "negative_sharing": "batch", "logq_correction": True},
    {"negatives": 5, "negative_sharing": "example", "loss": "bpr"},
    {"pooling": "self_attention", "dropout": 0.1},
])
def test_loss_and_pooling_variants_train(synth, overrides):
    _, _, fit, _, _, _ = synth
    res = M.fit_model(dataclasses.replace(P, **overrides), "hybrid", fit, None, epochs=2,
                          show_progress=False)
    assert res.best_epoch == 2 and all(np.isfinite(c["train_loss"]) for c in res.curve)
    assert np.isfinite(res.recommender.score([fit.histories[0]], fit)).all()


def copy_processed(paths: S.Paths, root) -> S.Paths:
    """The processed tables and item vectors of ``paths`` copied under ``root``."""
    out = S.Paths(root)
    for name in ("items", "interactions", "histories", "vectors", "vector_index"):
        target = getattr(out, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(getattr(paths, name).read_bytes())
    return out


def test_stage_writes_outputs_and_models_reload(synth, tmp_path):
    paths, *_ = synth
    root = copy_processed(paths, tmp_path)
    params = {"train": {**dataclasses.asdict(dataclasses.replace(P, epochs=3, patience=1)),
                        "strategies": ["content", "collaborative"]}}
    summary = train.main(params, root)

    assert summary["selected"] in ("content", "collaborative")
    selected = io.read_json(root.model_dir / "selected.json")
    assert selected["strategy"] == summary["selected"]
    assert set(selected["valid_ndcg@10"]) == {"content", "collaborative"}
    assert selected["valid_ndcg@10"][selected["strategy"]] == max(selected["valid_ndcg@10"].values())
    m = io.read_json(root.metrics("train"))
    for s in ("content", "collaborative"):
        d = root.model_dir / s
        assert (d / "model.pt").exists() and (d / "curve.csv").exists()
        meta = json.loads((d / "meta.json").read_text())
        assert meta["fit_phase"] == "test" and meta["strategy"] == s
        assert meta["best_epoch"] == m["strategies"][s]["best_epoch"] >= 1
        assert len(meta["history"]) == m["strategies"][s]["epochs_run"]
        assert {"seconds_per_epoch", "seconds", "peak_rss_mb", "valid_ndcg@10"} <= set(m["strategies"][s])
        rec = train.load_recommender(d)
        fit_t, _ = Dataset.load(root).phase("test")
        scores = rec.score([fit_t.histories[0], np.zeros(0, np.int64)], fit_t)
        assert scores.shape == (2, fit_t.n_items) and np.isfinite(scores).all()
    curve = pd.read_csv(root.plots_dir / "train_curve.csv")
    assert list(curve.columns) == ["strategy", "epoch", "train_loss", "valid_ndcg@10"]
    assert set(curve["strategy"]) == {"content", "collaborative"}
    assert (root.model_dir / "train_curve.png").stat().st_size > 1000
    assert not list(root.model_dir.glob(".*"))  # no temporary files left behind


def test_validation_on_a_user_sample_is_stated(synth, tmp_path, caplog):
    """train.valid_max_users: early stopping and selection on a seeded sample of valid users,
    recorded in metrics/train.json and logged; the same sample on a re-run."""
    paths, *_ = synth
    params = {"train": {**dataclasses.asdict(dataclasses.replace(P, epochs=2, patience=1)),
                        "strategies": ["content"], "valid_max_users": 7}}
    with caplog.at_level("WARNING"):
        train.main(params, copy_processed(paths, tmp_path / "a"))
    m = io.read_json((tmp_path / "a" / "metrics" / "train.json"))
    total = m["valid_users"]["users_total"]
    assert total > 7 and m["valid_users"] == {"users_total": total, "users": 7, "sampled": True, "seed": P.seed}
    assert "SAMPLE of users (train.valid_max_users=7" in caplog.text
    again = copy_processed(paths, tmp_path / "b")
    train.main(params, again)
    assert io.read_json(again.metrics("train"))["strategies"]["content"]["valid_ndcg@10"] == \
        m["strategies"]["content"]["valid_ndcg@10"]
    params["train"]["valid_max_users"] = None
    full = copy_processed(paths, tmp_path / "c")
    train.main(params, full)
    assert io.read_json(full.metrics("train"))["valid_users"]["sampled"] is False
    with pytest.raises(config.ParamsError, match="valid_max_users"):
        config.section(train.TrainParams, "train", {"train": {"valid_max_users": 0}})


def test_refit_through_the_recommender_protocol(synth, fitted):
    from genre_tasks.models.views import Recommender

    _, ds, fit, _, _, _ = synth
    r = fitted["content"].recommender
    assert isinstance(r, Recommender)
    fit_t, _ = ds.phase("test")
    clone = M.TorchRecommender(tower.build_net(r.meta), {**r.meta, "best_epoch": 1})
    clone.fit(fit_t)
    assert clone.meta["fit_phase"] == "test"
    assert np.isfinite(clone.score([fit_t.histories[1]], fit_t)).all()


def test_sequence_aware_pooling_learns_and_reads_the_order(synth):
    """pooling: self_attention (one SASRec block): beats random like the others, and, unlike
    the mean, its user vector depends on the order of the history."""
    _, _, fit, ev, _, _ = synth
    p = dataclasses.replace(P, pooling="self_attention")
    res = M.fit_model(p, "content", fit, ev, show_progress=False)
    assert res.best_ndcg > random_ndcg(fit, ev) + 0.1
    rec = res.recommender
    h = next(x for x in fit.histories if len(x) >= 4)
    forward, backward = rec.user_vectors([h, h[::-1].copy()], fit)
    assert not np.allclose(forward, backward, atol=1e-5)
    w = rec.attention([h], fit)[0]
    assert len(w) == min(len(h), P.history_max) and abs(w.sum() - 1) < 1e-5
    mean = M.fit_model(dataclasses.replace(P, pooling="mean"), "content", fit, None, epochs=1,
                       show_progress=False).recommender
    a, b = mean.user_vectors([h, h[::-1].copy()], fit)
    assert np.allclose(a, b, atol=1e-5)  # the control: a mean cannot see the order
    # saved and reloaded (the pooling is rebuilt from meta), same scores
    clone = M.TorchRecommender(tower.build_net(rec.meta), rec.meta)
    clone.net.load_state_dict(rec.net.state_dict())
    assert np.allclose(clone.score([h], fit), rec.score([h], fit), atol=1e-6)


def test_budgeted_search_tries_the_current_values_first_and_trains_the_winner(synth, tmp_path, monkeypatch):
    paths, *_ = synth
    calls = []
    real_fit = M.fit_model
    monkeypatch.setattr(M, "fit_model", lambda *a, **k: calls.append(k.get("epochs")) or real_fit(*a, **k))
    root = copy_processed(paths, tmp_path)
    space = {"lr": [0.001, 0.01, 0.05], "pooling": ["mean", "self_attention"]}
    params = {"train": {**dataclasses.replace(P, epochs=3, patience=1).as_dict(),
                        "strategies": ["content"], "search_trials": 3, "search_space": space}}
    summary = train.main(params, root)
    record = summary["strategies"]["content"]["search"]
    trials = record["trials"]
    assert record["grid_size"] == 6 and len(trials) == 3
    assert trials[0]["values"] == {"lr": P.lr, "pooling": P.pooling}  # the current values first
    assert len({tuple(sorted(t["values"].items())) for t in trials}) == 3  # no configuration twice
    scores = [t["valid_ndcg@10"] for t in trials]
    assert record["chosen"] == scores.index(max(scores))
    chosen = trials[record["chosen"]]["values"]
    meta = json.loads((root.model_dir / "content" / "meta.json").read_text())
    assert {k: meta["params"][k] for k in chosen} == chosen  # the winner is what was trained
    # the first seed's valid fit is the winning trial's (reused, not fitted again)
    assert summary["strategies"]["content"]["valid_ndcg@10"] == pytest.approx(max(scores))
    assert summary["strategies"]["content"]["epochs_run"] == trials[record["chosen"]]["epochs_run"]
    assert len(calls) == len(trials) + 1  # the trials + the refit: the winner's valid fit is not repeated
    with pytest.raises(config.ParamsError, match=r"train.search_space.seed: not searchable"):
        config.section(train.TrainParams, "train", {"train": {"search_space": {"seed": [1, 2]}}})
    with pytest.raises(config.ParamsError, match=r"train.search_space.pooling: value 'nope'"):
        config.section(train.TrainParams, "train", {"train": {"search_space": {"pooling": ["nope"]}}})
