"""`genre` console script: one sub-command per pipeline stage (what dvc.yaml runs).

    genre [--params params.yaml] [--override configs/tiny.yaml] [--root .] <stage>

Stage modules are imported lazily so `genre --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

#: stage name -> module in genre_tasks exposing ``main(params: dict, paths: Paths) -> dict``
STAGES: dict[str, str] = {
    "source": "genre_tasks.source",
    "ingest": "genre_tasks.ingest",
    "validate": "genre_tasks.validate",
    "preprocess": "genre_tasks.preprocess",
    "embed": "genre_tasks.embed",
    "genre": "genre_tasks.genre",
    "train": "genre_tasks.train",
    "evaluate": "genre_tasks.evaluate",
    "promote": "genre_tasks.promote",
}


def run_stage(name: str, params: dict, root: str | Path = ".") -> dict:
    """Run stage ``name`` with already-loaded params under project ``root``; return its summary."""
    from genre_tasks.schema import Paths

    module = importlib.import_module(STAGES[name])
    return module.main(params, Paths(root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genre", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--override", action="append", default=[],
                        help="YAML file deep-merged over the params (repeatable)")
    parser.add_argument("--root", default=".", help="project root holding data/ (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        sub.add_parser(name, help=f"run the {name} stage")
    return parser


def main(argv: list[str] | None = None) -> int:
    from genre_tasks.config import ParamsError, load_params
    from genre_tasks.errors import StageError
    from genre_tasks.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, args.override)
        summary = run_stage(args.command, params, args.root)
    except ParamsError as exc:
        print(f"genre {args.command}: bad params: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"genre {args.command}: FAILED\n{exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
