"""`genre` console script: one sub-command per pipeline stage (what dvc.yaml runs), plus tools.

    genre [--params params.yaml] [--override configs/tiny.yaml] [--root .] <command>

Stage commands print the stage's JSON summary. Modules are imported lazily so `genre --help`
stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from genre_tasks.errors import exit_code

#: stage name -> module in genre_tasks exposing ``main(params: dict, paths: Paths) -> dict``
STAGES: dict[str, str] = {
    "source": "genre_tasks.data.source",
    "ingest": "genre_tasks.data.ingest",
    "validate": "genre_tasks.data.validate",
    "preprocess": "genre_tasks.data.preprocess",
    "augment": "genre_tasks.features.augment.stage",
    "embed": "genre_tasks.features.embed",
    "genre": "genre_tasks.features.genre",
    "train": "genre_tasks.models.train",
    "evaluate": "genre_tasks.evaluation.evaluate",
    "promote": "genre_tasks.registry.promote",
}

#: commands with their own parser: name -> (module, function taking argv with the global
#: options forwarded, help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "feedback": ("genre_tasks.feedback.cli", "feedback_cli",
                 "feedback batches: run | status | record | replay --init/--next/--status"),
    "history": ("genre_tasks.feedback.history", "history_cli",
                "successive model versions with prequential and test metrics"),
    "llm-serve": ("genre_tasks.features.augment.server", "cli",
                  "OpenAI-compatible server around the local SmolLM2 model (127.0.0.1)"),
}


def run_stage(name: str, params: dict, root: str | Path = ".", **options) -> dict:
    """Run stage ``name`` with already-loaded params under project ``root``; return its summary.
    Also writes the stage's headline numbers (:mod:`genre_tasks.evaluation.headline`)."""
    from genre_tasks.schema import Paths

    from genre_tasks.evaluation import headline

    module = importlib.import_module(STAGES[name])
    summary = module.main(params, Paths(root), **options)
    headline.write(name, Paths(root))  # metrics/headline/<stage>.json: what `dvc metrics show` shows
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genre", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--override", action="append", default=[],
                        help="YAML file deep-merged over the params (repeatable)")
    parser.add_argument("--root", default=".", help="project root holding data/ (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGES:
        stage = sub.add_parser(name, help=f"run the {name} stage")
        if name == "promote":
            stage.add_argument("--force", action="store_true",
                               help="operator override: promote regardless of the gate (recorded)")
            stage.add_argument("--reason", default=None, help="why (recorded with --force)")
    rec = sub.add_parser("recommend", help="top-k for a user from the @champion model, with reasons")
    from genre_tasks.registry.recommend import add_arguments

    add_arguments(rec)
    sub.add_parser("registry", help="registered model versions, aliases and promotion decisions")
    sub.add_parser("tracking-init", help="create or upgrade the MLflow tracking store once, atomically "
                                         "(make setup / the DAG's first task run it)")
    lin = sub.add_parser("lineage", help="what a registered version was built from: git commit, "
                                         "params snapshot, DVC lock entries, GX result, metrics")
    lin.add_argument("version", help="version number or alias (champion, challenger)")
    co = sub.add_parser("checkout", help="restore a registered version's exact data and model "
                                         "into an empty folder from the DVC remote")
    co.add_argument("version", help="version number or alias (champion, challenger)")
    co.add_argument("--dir", required=True, help="empty folder to restore into")
    sub.add_parser("report", help="summary of the last pipeline run (split sizes ... registry)")
    for name, (_, _, help_text) in TOOLS.items():
        tool = sub.add_parser(name, help=help_text, add_help=False)
        tool.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def run_tool(name: str, args: argparse.Namespace) -> int:
    """Forward a tool command to its module, with the global options."""
    module, function, _ = TOOLS[name]
    forwarded = ["--root", args.root, "--params", args.params]
    for override in args.override:
        forwarded += ["--override", override]
    return getattr(importlib.import_module(module), function)(forwarded + list(args.args))


def main(argv: list[str] | None = None) -> int:
    from genre_tasks.config import load_params
    from genre_tasks.logs import setup_logging
    from genre_tasks.schema import Paths

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    setup_logging()
    if args.command in TOOLS:
        args.args = [*extra, *args.args]
        return run_tool(args.command, args)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "tracking-init":
        from genre_tasks.registry.tracking_store import init_store

        print(init_store(Paths(args.root)))
        return 0
    if args.command == "report":
        from genre_tasks.report import report

        print(report(Paths(args.root)))
        return 0

    def body() -> dict | int:
        params = load_params(args.params, args.override)
        if args.command == "recommend":
            from genre_tasks.registry.recommend import main as recommend_main

            return recommend_main(params, Paths(args.root), args.user, args.k, args.alias, args.llm_reasons)
        if args.command in ("lineage", "checkout"):
            from genre_tasks.registry import lineage

            if args.command == "lineage":
                return lineage.record(params, Paths(args.root), args.version)
            result = lineage.checkout(params, Paths(args.root), args.version, args.dir)
            return result if result["ok"] else (print(json.dumps(result, indent=2)) or 1)
        if args.command == "registry":
            from genre_tasks.registry.promote import registry_main

            return registry_main(params, Paths(args.root))
        options = {"force": args.force, "reason": args.reason} if args.command == "promote" else {}
        return run_stage(args.command, params, args.root, **options)

    return exit_code(args.command, body)


if __name__ == "__main__":
    sys.exit(main())
