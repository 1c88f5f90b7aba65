"""`genre report`: the human-readable tail of a pipeline run, from the stages' metrics files.

Prints what each finished stage measured: split sizes, the validation summary, embedding
throughput, genre-classifier F1, the model comparison table and the registry state.
"""
from __future__ import annotations

import json
from pathlib import Path

from genre_tasks import schema as S


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def section_ingest(paths: S.Paths) -> list[str]:
    m = _load(paths.metrics("ingest"))
    if not m:
        return []
    lines = [f"## Input ({m.get('adapter')}): {m.get('n_items', 0):,} items, "
             f"{m.get('n_interactions', 0):,} interactions used"]
    sl = m.get("slice") or {}
    if sl.get("rows_dropped"):
        lines.append(f"- slice (until {sl.get('until')}, max_users {sl.get('max_users')}): kept "
                     f"{sl['rows_kept']:,} of {sl['rows_in']:,} validated interactions, dropped "
                     f"{sl['rows_dropped']:,}")
    text = m.get("text") or {}
    if text:
        lines.append(f"- item text: {text.get('template')}")
        if text.get("items") and text.get("title_only_items", 0) * 2 > text["items"]:
            lines.append(f"- WARNING: the text is only the title for {text['title_only_items']:,}"
                         f" of {text['items']:,} items")
    if m.get("placeholder_genre_items"):
        lines.append(f"- {m['placeholder_genre_items']:,} items had only a placeholder genre "
                     "(ingest.no_genre_tokens): no genre")
    return lines


def section_validate(paths: S.Paths) -> list[str]:
    m = _load(paths.metrics("validate"))
    if not m:
        return []
    lines = ["## Validation (Great Expectations)",
             f"- {'PASSED' if m['success'] else 'FAILED'}: {m['expectations_successful']}/"
             f"{m['expectations_evaluated']} expectations met on {m['items_rows']:,} items and "
             f"{m['interactions_rows']:,} interactions"]
    if m.get("quarantined_items") or m.get("quarantined_interactions"):
        lines.append(f"- on_bad_rows=quarantine: {m.get('quarantined_items', 0):,} items and "
                     f"{m.get('quarantined_interactions', 0):,} interactions set aside, reasons in "
                     f"{paths.validation_dir / 'quarantine.csv'}")
    lines.append(f"- Data Docs: {paths.validation_dir / 'docs' / 'index.html'}")
    return lines


def section_preprocess(paths: S.Paths) -> list[str]:
    m = _load(paths.metrics("preprocess"))
    if not m:
        return []
    lines = [f"## Splits ({m['mode']}): {m['n_users']:,} users, {m['n_items']:,} items, "
             f"{m['n_interactions']:,} interactions ({m['n_positives']:,} positive)",
             "| split | rows | positives | users | users with a positive |", "|---|---:|---:|---:|---:|"]
    for name in S.SPLITS:
        s = m[name]
        lines.append(f"| {name} | {s['rows']:,} | {s['positives']:,} | {s['users']:,} | {s['users_with_positive']:,} |")
    if "cold_test_items" in m:
        lines.append(f"cold items: {m['cold_test_items']} test, {m['cold_valid_items']} valid")
    return lines


def section_embed(paths: S.Paths) -> list[str]:
    m = _load(paths.metrics("embed"))
    if not m:
        return []
    return ["## Embeddings",
            f"- {m.get('n_items', '?'):,} items, dim {m.get('dim', '?')}: {m.get('n_embedded', '?')} embedded, "
            f"{m.get('n_cached', '?')} from cache; {m.get('texts_per_second', 0):.0f} texts/s, "
            f"{m.get('seconds', 0):.1f} s (model {m.get('model_id', '?')})"]


def section_genre(paths: S.Paths) -> list[str]:
    m = _load(paths.metrics("genre"))
    if not m:
        return []
    return ["## Genre classifier (held-out items)",
            f"- micro F1 {m.get('micro_f1', float('nan')):.3f}, macro F1 {m.get('macro_f1', float('nan')):.3f} "
            f"({m.get('n_labels', '?')} genres, {m.get('n_train', '?')} train / {m.get('n_test', '?')} held-out items)"]


def section_comparison(paths: S.Paths) -> list[str]:
    table = paths.root / "data" / "eval" / "comparison.md"
    if not table.exists():
        return []
    return ["## Model comparison (test split)", table.read_text().rstrip()]


def section_registry(paths: S.Paths) -> list[str]:
    m = _load(paths.metrics("promote"))
    if not m:
        return []
    lines = ["## Registry"]
    desc = m.get("description")
    if desc:
        lines.append(f"Last decision: {desc}")
    vb = m.get("vs_best_baseline") or {}
    if m.get("best_baseline") and vb and vb.get("reference", 0) > vb.get("challenger", 0):
        lines.append(f"**A baseline is the best model of this run:** {m['best_baseline']} "
                     f"{vb.get('metric')} {vb['reference']:.4f} vs the challenger {vb['challenger']:.4f} "
                     f"(gain {vb['gain']:+.4f}, 95% bounds [{vb['ci_lower']:+.4f}, {vb['ci_upper']:+.4f}]).")
    try:
        from genre_tasks.registry.promote import registry_state

        lines.append(registry_state(m.get("model_name", "genre-recommender"), paths))
    except Exception as exc:  # the report must not hide the rest of the run
        lines.append(f"(registry not readable: {exc})")
    return lines


SECTIONS = (section_ingest, section_validate, section_preprocess, section_embed, section_genre,
            section_comparison, section_registry)


def report(paths: S.Paths) -> str:
    """The report text (markdown) of whatever stages have run under ``paths``."""
    blocks = ["\n".join(lines) for fn in SECTIONS if (lines := fn(paths))]
    return "\n\n".join(blocks) if blocks else "no stage has run yet (try `dvc repro`)"
