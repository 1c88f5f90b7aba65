"""The registered model: a self-contained MLflow pyfunc that recommends from item ids.

``mlflow.pyfunc.load_model("models:/genre-recommender@champion")`` alone can recommend: the
model carries everything it needs in one artifact folder (the *bundle*), and the project code
travels with it (``code_paths``), so neither data/ nor a checkout is needed to serve it.

Bundle (artifact ``bundle``)::

    model/               the trained strategy folder (model.pt, meta.json, curve.csv)
    items.parquet        item_id, title, genres (list[str]), popularity, timestamp  [I rows]
    vectors.npy          [I, d] float32 language-model item vectors (row i = items row i)
    representations.npy  [I, r] float32 item representations of the trained item tower
    info.json            strategy, loader, lineage of the data the bundle was built from

Request (one row per request)::

    history     list[str]  item ids the user liked, oldest first (unknown ids are ignored)
    k           int        how many items to return (default 10)
    timestamps  list[int]  optional, one per history item: the history is ordered by them

Response: ``item_ids`` list[str] and ``scores`` list[float] per request, best first, history
items excluded; an empty (or all-unknown) history gets the most popular items.

`mlflow models serve -m models:/genre-recommender@champion --env-manager local` serves it:
POST /invocations ``{"dataframe_records": [{"history": ["1", "50"], "k": 5}]}``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:  # the class must derive from PythonModel; mlflow is imported with this module
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a hard dependency of the pipeline
    PythonModel = object  # type: ignore[assignment,misc]

from genre_tasks.models import views as D
from genre_tasks import io
from genre_tasks import schema as S

log = logging.getLogger("genre.serving")

DEFAULT_LOADER = "genre_tasks.models.train:load_recommender"
DEFAULT_K = 10
BUNDLE = "bundle"
#: packages the served model imports, pinned to the versions installed here
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "scipy", "pyarrow", "cloudpickle", "pyyaml",
                "scikit-learn")


def pip_requirements(extra: Sequence[str] = ()) -> list[str]:
    """Explicit pins read from the installed distributions (local labels like +cpu dropped),
    so log_model never infers requirements (slow) nor records a local-only torch build."""
    pins = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version}")
    return [*pins, *extra]


def load_loader(spec: str):
    """``"package.module:function"`` -> the function."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "load_recommender")


# --- the bundle -----------------------------------------------------------------------------
def serving_fit(items: pd.DataFrame, vectors: np.ndarray) -> D.FitData:
    """A user-free FitData over the bundle's catalogue: what ``score`` needs to rank items."""
    from scipy import sparse

    genres, names = D.genre_matrix([list(g) for g in items[S.GENRES]])
    n = len(items)
    return D.FitData(
        phase="test", n_users=0, n_items=n, item_ids=items[S.ITEM_ID].astype(str).to_numpy(),
        user_ids=np.empty(0, dtype=object), rows=pd.DataFrame(),
        positives=sparse.csr_matrix((0, n), dtype=np.float32), seen=sparse.csr_matrix((0, n), dtype=bool),
        histories=[], item_vectors=np.asarray(vectors, dtype=np.float32), item_genres=genres,
        genre_names=names, popularity=items["popularity"].to_numpy(np.int64),
        timestamps=items["timestamp"].to_numpy(np.int64))


def build_bundle(model_dir: Path, fit: D.FitData, titles: Sequence[str], target: Path,
                 loader: str = DEFAULT_LOADER, info: dict | None = None) -> Path:
    """Write the bundle of the model in ``model_dir`` for the catalogue of ``fit`` to ``target``.

    ``titles[i]`` is the title of ``fit``'s item i. Item representations are computed once here
    (``recommender.item_representations(fit)``) for explanations and similarity look-ups.
    """
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copytree(model_dir, target / "model")
    genres = [[fit.genre_names[j] for j in np.flatnonzero(row)] for row in fit.item_genres]
    items = pd.DataFrame({S.ITEM_ID: fit.item_ids.astype(str), S.TITLE: [str(t) for t in titles],
                          S.GENRES: genres, "popularity": np.asarray(fit.popularity, np.int64),
                          "timestamp": np.asarray(fit.timestamps, np.int64)})
    items.to_parquet(target / "items.parquet", index=False)
    np.save(target / "vectors.npy", np.asarray(fit.item_vectors, np.float32))
    rec = load_loader(loader)(model_dir)
    reps = item_representations(rec, fit)
    np.save(target / "representations.npy", reps)
    # TorchRecommender representations end with the item-bias column (score = U @ R.T)
    bias_column = bool(callable(getattr(rec, "user_vectors", None)) and reps.shape[1] > 1)
    io.write_json({"loader": loader, "recommender": getattr(rec, "name", model_dir.name),
                   "n_items": int(fit.n_items), "representation_bias_column": bias_column,
                   **(info or {})}, target / "info.json")
    return target


def item_representations(rec: Any, fit: D.FitData) -> np.ndarray:
    """[I, r] float32: the recommender's item representations, else the LM vectors."""
    fn = getattr(rec, "item_representations", None)
    reps = fn(fit) if callable(fn) else fit.item_vectors
    if hasattr(reps, "detach"):  # a torch tensor
        reps = reps.detach().cpu().numpy()
    return np.asarray(reps, dtype=np.float32)


# --- the pyfunc -----------------------------------------------------------------------------
class GenreRecommenderModel(PythonModel):
    """Recommends item ids for item-id histories (see the module docstring for the contract).

    After ``load_context``: :attr:`recommender` is the trained model (a ``data.Recommender``
    whose ``score(histories, data)`` works on any catalogue, so promote can re-score it on
    today's test split), :attr:`fit` the bundle's catalogue as FitData, :attr:`items` the item
    table, :attr:`representations` the item representations.
    """

    def __init__(self, loader: str = DEFAULT_LOADER) -> None:
        self.loader = loader
        self.info: dict = {}
        self.recommender = None
        self.fit = None
        self.items = None
        self.representations = None

    # -- loading
    def load_context(self, context) -> None:
        self.load_bundle(Path(context.artifacts[BUNDLE]))

    def load_bundle(self, bundle: Path) -> "GenreRecommenderModel":
        bundle = Path(bundle)
        info = json.loads((bundle / "info.json").read_text())
        self.loader = info.get("loader", self.loader)
        self.info = info
        self.items = pd.read_parquet(bundle / "items.parquet")
        self.fit = serving_fit(self.items, np.load(bundle / "vectors.npy"))
        self.representations = np.load(bundle / "representations.npy").astype(np.float32)
        self.recommender = load_loader(self.loader)(bundle / "model")
        self._index = {iid: i for i, iid in enumerate(self.items[S.ITEM_ID].astype(str))}
        self._pop_order = np.lexsort((np.arange(len(self.items)), -self.fit.popularity))
        return self

    # -- re-scoring (promote)
    def score(self, histories: Sequence[np.ndarray], data: D.FitData) -> np.ndarray:
        """Scores [len(histories), data.n_items] for histories of ``data``'s item_idx, computed
        from this model's OWN bundle (its vectors, genres, popularity and item index), never
        from ``data``'s features: a registered model is judged on the artifacts it was
        registered with. Items are matched by item id; history items the bundle does not know
        are dropped and items it does not know score ``-inf`` (ranked last)."""
        ids = np.asarray(data.item_ids).astype(str)
        own = np.asarray([self._index.get(i, -1) for i in ids], dtype=np.int64)  # data idx -> bundle idx
        mapped = [own[np.asarray(h, dtype=np.int64)] for h in histories]
        mapped = [h[h >= 0] for h in mapped]
        scores = np.asarray(self.recommender.score(mapped, self.fit), dtype=np.float32)
        out = np.full((len(histories), len(ids)), -np.inf, dtype=np.float32)
        known = own >= 0
        out[:, known] = scores[:, own[known]]
        return out

    # -- serving
    def to_indices(self, history: Any, timestamps: Any = None) -> np.ndarray:
        """Item ids (oldest first, or ordered by ``timestamps``) -> known item_idx (int64)."""
        ids = _as_list(history)
        ts = _as_list(timestamps)
        if ts and len(ts) == len(ids):
            order = np.argsort(np.asarray(ts, dtype=np.int64), kind="stable")
            ids = [ids[i] for i in order]
        idx = [self._index.get(str(i)) for i in ids]
        return np.asarray([i for i in idx if i is not None], dtype=np.int64)

    def recommend(self, histories: Sequence[np.ndarray], ks: Sequence[int]) -> list[tuple[list[str], list[float]]]:
        """Top-k (item ids, scores) per history of item_idx; history items excluded."""
        n_items = self.fit.n_items
        out: list[tuple[list[str], list[float]] | None] = [None] * len(histories)
        with_hist = [j for j, h in enumerate(histories) if len(h)]
        scores = None
        if with_hist:
            scores = np.asarray(self.recommender.score([histories[j] for j in with_hist], self.fit),
                                dtype=np.float64)
        ids = self.fit.item_ids
        for row, j in enumerate(with_hist):
            s = scores[row].copy()
            s[histories[j]] = -np.inf
            k = max(0, min(int(ks[j]), n_items - len(np.unique(histories[j]))))
            top = _top_k(s, k)
            out[j] = ([str(ids[i]) for i in top], [float(s[i]) for i in top])
        pop = self.fit.popularity.astype(np.float64)
        for j, h in enumerate(histories):
            if out[j] is None:  # popularity fallback
                k = max(0, min(int(ks[j]), n_items))
                top = self._pop_order[:k]
                out[j] = ([str(ids[i]) for i in top], [float(pop[i]) for i in top])
        return out  # type: ignore[return-value]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in df.columns:
            raise ValueError("model input needs a 'history' column (list of item ids per row)")
        default_k = int((params or {}).get("k", DEFAULT_K))
        ks = [_as_k(v, default_k) for v in (df["k"] if "k" in df.columns else [default_k] * len(df))]
        ts_col = df["timestamps"] if "timestamps" in df.columns else [None] * len(df)
        histories = [self.to_indices(h, t) for h, t in zip(df["history"], ts_col)]
        recs = self.recommend(histories, ks)
        return pd.DataFrame({"item_ids": [r[0] for r in recs], "scores": [r[1] for r in recs]})

    # -- explanations (recommend CLI)
    def explain_facts(self, history_ids: Sequence[str], item_ids: Sequence[str]) -> list[dict]:
        """The facts behind each recommended item's reason: ``{"recommended", "similar_to",
        "similarity", "shared_genres"}`` (the history item closest to it by item representation,
        cosine); ``{}`` for an unknown item, ``{"recommended", "popular": True}`` without history."""
        titles = self.items[S.TITLE].astype(str).to_numpy()
        hist = [self._index[str(h)] for h in history_ids if str(h) in self._index]
        if not hist:
            return [{"recommended": titles[self._index[str(i)]] if str(i) in self._index else None,
                     "popular": True} for i in item_ids]
        reps = self.representations
        if self.info.get("representation_bias_column"):
            reps = reps[:, :-1]
        norm = reps / np.maximum(np.linalg.norm(reps, axis=1, keepdims=True), 1e-12)
        genres = self.items[S.GENRES].to_numpy()
        facts = []
        for iid in item_ids:
            i = self._index.get(str(iid))
            if i is None:
                facts.append({})
                continue
            sims = norm[hist] @ norm[i]
            best = int(np.argmax(sims))
            h = hist[best]
            facts.append({"recommended": titles[i], "similar_to": titles[h],
                          "similarity": round(float(sims[best]), 2),
                          "shared_genres": sorted(set(genres[i]) & set(genres[h]))})
        return facts

    def explain(self, history_ids: Sequence[str], item_ids: Sequence[str]) -> list[str]:
        """A short reason per recommended item: the history item closest to it by item
        representation (cosine), with the genres they share."""
        return [deterministic_reason(f) for f in self.explain_facts(history_ids, item_ids)]


def deterministic_reason(facts: dict) -> str:
    """The reason text of :meth:`GenreRecommenderModel.explain_facts`' facts (always available)."""
    if not facts:
        return ""
    if facts.get("popular"):
        return "popular with everyone"
    reason = f"like '{facts['similar_to']}' (similarity {facts['similarity']:.2f}"
    shared = facts.get("shared_genres") or []
    return reason + (f"; shared genres: {', '.join(shared)})" if shared else ")")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, float) and np.isnan(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return list(json.loads(text))
        return [t for t in text.replace(",", " ").split() if t]
    return list(value)


def _as_k(value: Any, default: int) -> int:
    try:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return default
        return max(0, int(value))
    except (TypeError, ValueError):
        return default


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best finite scores, best first; ties by item index (deterministic)."""
    finite = np.flatnonzero(np.isfinite(scores))
    if k <= 0 or not len(finite):
        return np.empty(0, dtype=np.int64)
    s = scores[finite]
    order = np.lexsort((finite, -s))
    return finite[order[:k]]


def content_key(bundle: Path) -> str:
    """sha256 of everything in a bundle that changes predictions: the model folder (weights and
    meta.json, which holds serving params such as ``no_history_fallback``), the item table,
    the item vectors, the loader, and the source of the ``genre_tasks`` code shipped with the
    model. Lineage records (info.json's git commit, params hash) are deliberately left out: a
    re-run after a commit that changes none of these finds the same registered version."""
    import hashlib

    bundle = Path(bundle)
    h = hashlib.sha256()
    files = sorted(f for f in (bundle / "model").rglob("*") if f.is_file())
    files += [bundle / "items.parquet", bundle / "vectors.npy"]
    for f in files:
        h.update(f"{f.relative_to(bundle).as_posix()}={io.file_md5(f)}\n".encode())
    info = json.loads((bundle / "info.json").read_text())
    h.update(f"loader={info.get('loader')}\n".encode())
    h.update(f"code={code_hash()}\n".encode())
    return h.hexdigest()


def code_hash() -> str:
    """md5 over the genre_tasks sources (relative path + content), what ``code_paths`` ships."""
    import hashlib

    root = Path(code_path())
    h = hashlib.md5()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# --- logging --------------------------------------------------------------------------------
def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(Array(DataType.string), "history"),
                     ColSpec(DataType.long, "k", required=False),
                     ColSpec(Array(DataType.long), "timestamps", required=False)])
    outputs = Schema([ColSpec(Array(DataType.string), "item_ids"),
                      ColSpec(Array(DataType.double), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def code_path() -> str:
    """The genre_tasks package folder (shipped with the model)."""
    import genre_tasks

    return str(Path(genre_tasks.__file__).resolve().parent)


MODEL_SCRIPT = """\
# The GENRE recommender pyfunc (MLflow "models from code"); genre_tasks ships in code_paths.
import mlflow

from genre_tasks.registry.serving import GenreRecommenderModel

mlflow.models.set_model(GenreRecommenderModel())
"""


def log_model(model_dir: Path | None, fit: D.FitData, titles: Sequence[str], work_dir: Path,
              name: str = "model", loader: str = DEFAULT_LOADER, info: dict | None = None,
              tags: dict | None = None, extra_code_paths: Sequence[str] = ()):
    """Log the model in ``model_dir`` as a pyfunc to the active run; return the ModelInfo.

    ``work_dir`` receives the bundle before upload (``model_dir`` None: the bundle already in
    ``work_dir/bundle`` is logged as it is). The input example is a real history (the three
    most popular items of the catalogue).
    """
    import mlflow

    work_dir = Path(work_dir)
    bundle = work_dir / BUNDLE
    if model_dir is not None:
        build_bundle(Path(model_dir), fit, titles, bundle, loader, info)
    top = np.argsort(-np.asarray(fit.popularity), kind="stable")[:3]
    example = pd.DataFrame({"history": [[str(fit.item_ids[i]) for i in top]], "k": [5]})
    # "models from code": the model is this module's class, rebuilt at load time (no pickle)
    script = work_dir / "genre_model.py"
    script.write_text(MODEL_SCRIPT)

    def _log():
        with warnings.catch_warnings():  # the example's int column "k" triggers a generic hint
            warnings.filterwarnings("ignore", message=".*Integer columns", category=UserWarning)
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(script), artifacts={BUNDLE: str(bundle)},
                code_paths=[code_path(), *extra_code_paths], pip_requirements=pip_requirements(),
                signature=signature(), input_example=example, tags=tags)

    run = mlflow.active_run()
    if run is None:
        return _log()
    # MLflow 3 links every metric of the active run to a new LoggedModel, one get-history request
    # per metric key: ~350 in a pipeline run, minutes through an MLflow server with auth. Logged
    # from a thread with no active run (the fluent run is thread-local), in the run's experiment,
    # the model is then linked to the run as its output with one request.
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.entities import LoggedModelOutput

    def _log_outside_run():
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        return _log()

    with ThreadPoolExecutor(max_workers=1) as pool:
        info = pool.submit(_log_outside_run).result()
    mlflow.MlflowClient().log_outputs(run.info.run_id, [LoggedModelOutput(info.model_id, step=0)])
    return info


# --- integrity of the registered artifacts ----------------------------------------------------
#: model version tag: sha256 over every file of the version's model folder in the artifact
#: store (see :func:`artifacts_digest`), recorded at registration, in the registry database
ARTIFACTS_TAG = "genre.artifacts_sha256"


class ArtifactsTampered(RuntimeError):
    """A registered version's files differ from those recorded at registration (or nothing was
    recorded): the model is not loaded, none of its code runs."""


def artifacts_digest(folder: Path) -> str:
    """sha256 over ``<relative path>=<sha256 of the file>`` lines of every file under ``folder``
    (sorted; symlinks refused). Covers the pyfunc's code (``code/``, ``python_model.py``), the
    ``MLmodel`` file, requirements and the bundle: whatever would run or be read at load."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_symlink():
            raise ArtifactsTampered(f"{f}: a symlink in a model's artifacts")
        if f.is_file():
            digest = hashlib.sha256()
            with open(f, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            h.update(f"{f.relative_to(folder).as_posix()}={digest.hexdigest()}\n".encode())
    return h.hexdigest()


def _version_of(client, uri: str):
    """The ModelVersion a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI names."""
    rest = uri[len("models:/"):] if uri.startswith("models:/") else ""
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if rest.count("/") == 1:
        name, version = rest.split("/")
        return client.get_model_version(name, version)
    raise ValueError(f"{uri}: not a registered model URI (models:/<name>/<version> or models:/<name>@<alias>)")


def _download_version(client, mv, dst: Path) -> Path:
    """The version's model folder, downloaded from the artifact store into ``dst``."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                dst_path=str(dst), tracking_uri=client.tracking_uri)
    return Path(local)


def record_artifacts_digest(client, name: str, version: str, work: Path) -> str:
    """At registration: hash the version's files as the artifact store now holds them and tag
    the version with it (the tag lives in the registry's database, not beside the files)."""
    mv = client.get_model_version(name, version)
    dst = Path(work) / f"verify-{version}"
    shutil.rmtree(dst, ignore_errors=True)
    digest = artifacts_digest(_download_version(client, mv, dst))
    client.set_model_version_tag(name, version, ARTIFACTS_TAG, digest)
    shutil.rmtree(dst, ignore_errors=True)
    log.info("%s v%s: artifacts sha256 %s recorded", name, version, digest)
    return digest


def load_pyfunc(uri: str, client=None):
    """``mlflow.pyfunc.load_model`` of a registered version, verified first: the version's files
    are downloaded into a private folder, hashed, and compared with the version's
    :data:`ARTIFACTS_TAG`; only a match is loaded (from that folder, so the files that run are
    the files that were checked). Raises :class:`ArtifactsTampered` otherwise."""
    import atexit
    import tempfile

    import mlflow

    client = client or mlflow.MlflowClient()
    mv = _version_of(client, uri)
    expected = (mv.tags or {}).get(ARTIFACTS_TAG)
    if not expected:
        raise ArtifactsTampered(f"{uri} (v{mv.version}): no {ARTIFACTS_TAG} tag recorded at registration; "
                                "refusing to run code from the artifact store unverified")
    # kept for the life of the process: the loaded model imports its shipped code from there
    tmp = Path(tempfile.mkdtemp(prefix="genre-model-"))
    atexit.register(shutil.rmtree, tmp, True)
    local = _download_version(client, mv, tmp)
    actual = artifacts_digest(local)
    if actual != expected:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactsTampered(f"{uri} (v{mv.version}): artifacts in the store hash to {actual}, "
                                f"registration recorded {expected}; refusing to load")
    log.info("%s v%s: artifacts verified (sha256 %s)", mv.name, mv.version, actual[:12])
    return mlflow.pyfunc.load_model(str(local))


def load(uri: str, client=None) -> GenreRecommenderModel:
    """The verified pyfunc of a registered version (:func:`load_pyfunc`), unwrapped to the
    GenreRecommenderModel. Any other URI (a run's or a logged model's) loads unverified."""
    import mlflow

    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        return load_pyfunc(uri, client).unwrap_python_model()
    return mlflow.pyfunc.load_model(uri).unwrap_python_model()


def load_local(bundle: Path) -> GenreRecommenderModel:
    """The GenreRecommenderModel of a bundle folder on disk (before it is logged)."""
    return GenreRecommenderModel().load_bundle(Path(bundle))
