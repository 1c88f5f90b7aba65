"""Headline metrics (what `dvc metrics show` prints) and the wide training curve (`dvc plots`)."""
from __future__ import annotations

import json

import pandas as pd
import yaml

from genre_tasks import io
from genre_tasks.evaluation import headline
from genre_tasks.schema import Paths


def test_headline_keeps_a_handful_of_numbers(tmp_path):
    paths = Paths(tmp_path)
    evaluate = {"selected": "hybrid", "split": "user_temporal", "seed": 42,
                "models": {"hybrid": {"ndcg@10": 0.148712, "recall@10": 0.18, "auc": 0.627, "mrr": 0.24},
                           "MostPop": {"ndcg@10": 0.0808}, "EASE": {"ndcg@10": 0.1586},
                           "Random": {"ndcg@10": 0.005}},
                "chosen_hyperparameters": {"EASE": {"lambda": 250.0}}}
    io.write_json(evaluate, paths.metrics("evaluate"))
    out = headline.write("evaluate", paths)
    assert out == tmp_path / "metrics" / "headline" / "evaluate.json"
    assert json.loads(out.read_text()) == {"test_ndcg@10": 0.1487, "test_recall@10": 0.18,
                                           "test_auc": 0.627, "mostpop_ndcg@10": 0.0808,
                                           "ease_ndcg@10": 0.1586}
    validate = {"success": False, "expectations_evaluated": 43, "expectations_successful": 41}
    assert headline.headline("validate", validate) == {"gx_passed": False, "gx_failed": 2}
    train = {"selected": "content", "strategies": {"content": {"valid_ndcg@10": 0.15391, "best_epoch": 7,
                                                               "seconds": 12.0}}}
    assert headline.headline("train", train) == {"selected": "content", "valid_ndcg@10": 0.1539, "best_epoch": 7}
    assert headline.write("promote", paths) is None  # no record yet: nothing written


def test_wide_curve_has_one_column_per_strategy(tmp_path):
    paths = Paths(tmp_path)
    long = pd.DataFrame({"strategy": ["content", "content", "content", "hybrid", "hybrid"],
                         "epoch": [1, 2, 3, 1, 2], "train_loss": [5.0, 4.0, 3.5, 5.1, 4.2],
                         "valid_ndcg@10": [0.10, 0.12, 0.125, 0.09, 0.13]})
    io.write_text(long.to_csv(index=False), paths.plots_dir / "train_curve.csv")
    wide = pd.read_csv(headline.wide_curve(paths))
    assert list(wide.columns) == ["epoch", "content", "collaborative", "hybrid"]
    assert wide["epoch"].tolist() == [1, 2, 3]
    assert wide["content"].tolist() == [0.10, 0.12, 0.125]
    assert wide["collaborative"].isna().all() and pd.isna(wide["hybrid"].iloc[2])


def test_dvc_yaml_declares_headlines_as_metrics_and_the_plots():
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    for name, stage in doc["stages"].items():
        if name == "source":
            continue
        assert stage["metrics"] == [f"metrics/headline/{name}.json"], name
        assert f"metrics/{name}.json" in stage["outs"], name  # the full record travels too
    plots = {next(iter(p)): next(iter(p.values())) for p in doc["plots"]}
    assert plots["train_curve"]["y"] == {"plots/train_curve_wide.csv": list(headline.STRATEGIES)}
    assert plots["comparison"]["y"] == {"plots/comparison.csv": "model"}


def test_the_curve_columns_are_the_epoch_trained_strategies():
    from genre_tasks.models import train

    assert tuple(headline.STRATEGIES) == tuple(train.TWO_TOWER)  # ease: a lambda grid, no epochs
