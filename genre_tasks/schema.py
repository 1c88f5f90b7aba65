"""Canonical data model: column names, dtypes and artifact paths, defined once.

Every stage, validation suite and test imports names from here.

``items`` (parquet, one row per item)
    item_id   str, unique, non-null
    title     str, non-empty
    text      str, the text the language model reads (title + extra fields)
    genres    list[str], possibly empty (labels of the genre classifier)
    ...       optional extra str columns (e.g. year, abstract, category)

``interactions`` (parquet, one row per event)
    user_id        str, non-null
    item_id        str, must exist in items
    timestamp      int64, unix seconds (UTC)
    rating         float64, nullable (explicit feedback, e.g. 1-5)
    label          Int8, nullable (implicit feedback 0/1, e.g. a MIND click)
    impression_id  str, nullable (MIND impression the event belongs to)
At least one of rating / label is non-null in every row.
"""
from __future__ import annotations

from pathlib import Path

# --- item columns ---------------------------------------------------------------
ITEM_ID = "item_id"
TITLE = "title"
TEXT = "text"
GENRES = "genres"
ITEM_COLUMNS = (ITEM_ID, TITLE, TEXT, GENRES)

# --- interaction columns --------------------------------------------------------
USER_ID = "user_id"
TIMESTAMP = "timestamp"
RATING = "rating"
LABEL = "label"
IMPRESSION_ID = "impression_id"
INTERACTION_COLUMNS = (USER_ID, ITEM_ID, TIMESTAMP, RATING, LABEL, IMPRESSION_ID)
INTERACTION_DTYPES = {
    USER_ID: "string",
    ITEM_ID: "string",
    TIMESTAMP: "int64",
    RATING: "float64",
    LABEL: "Int8",
    IMPRESSION_ID: "string",
}

# --- columns added by preprocess --------------------------------------------------
USER_IDX = "user_idx"  # dense int index 0..n_users-1
ITEM_IDX = "item_idx"  # dense int index 0..n_items-1 (row in the embedding matrix)
SPLIT = "split"  # "train" | "valid" | "test" | "excluded"
POSITIVE = "positive"  # bool: implicit positive label
COLD = "cold"  # on items: "test" | "valid" | null: part of a cold set (cold_items split)
#: per-item columns that follow from the split, not from the item: written to item_split.parquet,
#: so items.parquet (what augment/embed/genre read) does not change when only interactions do
ITEM_SPLIT_COLUMNS = (COLD, "pop_train", "pop_trainvalid")
ROW = "row"  # original row order, the tie-breaker of temporal sorting

# --- provenance of raw rows (ingest -> validate): where each row is in the USER's files ------
SOURCE_FILE = "source_file"  # the file a raw row was read from (as the adapter opened it)
SOURCE_LINE = "source_line"  # its 1-based line (text files) or row (parquet files)

SPLITS = ("train", "valid", "test")
SPLIT_MODES = ("user_temporal", "cold_items", "global_temporal")
#: input formats (genre_tasks.data.adapters.ADAPTERS) and registrable model strategies
#: (genre_tasks.models.train.STRATEGIES): the choice lists of the CLI and the trigger forms
ADAPTERS = ("movielens-100k", "mind", "tabular")
STRATEGIES = ("content", "collaborative", "hybrid", "ease", "fusion")


class Paths:
    """Artifact locations under a project root (all stages agree on these)."""

    def __init__(self, root: str | Path = ".") -> None:
        self.root = Path(root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    # source + ingest
    @property
    def source(self) -> Path:
        return self.root / "data" / "source"

    @property
    def raw_items(self) -> Path:
        return self.root / "data" / "raw" / "items.parquet"

    @property
    def raw_interactions(self) -> Path:
        return self.root / "data" / "raw" / "interactions.parquet"

    @property
    def raw_lines(self) -> Path:
        """Side table of ingest: (table, row) of a raw table -> (source_file, source_line)."""
        return self.root / "data" / "raw" / "lines.parquet"

    @property
    def raw_unparsed(self) -> Path:
        """Rows ingest left out because a value did not parse (``validate.on_bad_rows:
        quarantine`` only): table, source_file, source_line, column, value, rule."""
        return self.root / "data" / "raw" / "unparsed.parquet"

    @property
    def raw_input_interactions(self) -> Path:
        """Every interaction the user gave, before ``ingest.max_users`` / ``ingest.until``
        (written only when one of them slices; validate checks this table then)."""
        return self.root / "data" / "raw" / "input_interactions.parquet"

    @property
    def raw_manifest(self) -> Path:
        """What ingest read (source files with their md5, params) and what slicing kept."""
        return self.root / "data" / "raw" / "manifest.json"

    # validate
    @property
    def validation_dir(self) -> Path:
        return self.root / "data" / "validation"

    @property
    def validation_summary(self) -> Path:
        return self.validation_dir / "summary.json"

    # preprocess
    @property
    def processed_dir(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def items(self) -> Path:
        return self.processed_dir / "items.parquet"

    @property
    def interactions(self) -> Path:
        return self.processed_dir / "interactions.parquet"

    @property
    def histories(self) -> Path:
        return self.processed_dir / "histories.parquet"

    @property
    def item_split(self) -> Path:
        """item_idx + the split-derived item columns (:data:`ITEM_SPLIT_COLUMNS`)."""
        return self.processed_dir / "item_split.parquet"

    @property
    def split_info(self) -> Path:
        return self.processed_dir / "split.json"

    # embed
    @property
    def embeddings_dir(self) -> Path:
        return self.root / "data" / "embeddings"

    @property
    def vectors(self) -> Path:
        return self.embeddings_dir / "vectors.npy"

    @property
    def vector_index(self) -> Path:
        return self.embeddings_dir / "index.parquet"

    @property
    def embed_cache(self) -> Path:
        return self.root / ".cache" / "embeddings"

    @property
    def encoder_cache(self) -> Path:
        """Derived encoder files (the ONNX exports of embed.quantize onnx*), per model digest."""
        return self.root / ".cache" / "encoders"

    # genre
    @property
    def genre_dir(self) -> Path:
        return self.root / "data" / "genre"

    @property
    def genre_predictions(self) -> Path:
        return self.genre_dir / "predictions.parquet"

    # models, metrics, plots
    @property
    def model_dir(self) -> Path:
        return self.root / "data" / "model"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def metrics(self, stage: str) -> Path:
        return self.metrics_dir / f"{stage}.json"
