"""``genre feedback ...``: run | status | record | replay."""
from __future__ import annotations

import argparse
import datetime as dt
import sys

from genre_tasks import config, logs
from genre_tasks import schema as S
from genre_tasks.feedback.params import as_datetime
from genre_tasks.feedback.record import record_store
from genre_tasks.feedback.loop import run, status


# --------------------------------------------------------------------------------------
# CLI: genre feedback ...
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genre feedback", description="Feedback loop: new interaction batches -> store.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--root", default=".")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="validate, score, apply and record every batch in the landing folder")
    r.add_argument("--logical-date", default=None,
                   help="ISO date-time the batches are validated against (default: now, UTC)")
    r.add_argument("--no-prequential", action="store_true", help="do not score the champion")
    r.add_argument("--no-dvc", action="store_true", help="do not record the store with DVC")
    r.add_argument("--no-push", action="store_true", help="dvc commit but do not push")
    r.add_argument("--allow-new-items", action="store_true", default=None,
                   help="accept item ids unknown to the items table")
    sub.add_parser("status", help="landing folder, quarantine, store and DVC record")
    rec = sub.add_parser("record", help="record the store's version with DVC (commit + push)")
    rec.add_argument("--no-push", action="store_true")
    rp = sub.add_parser("replay", help="replay MovieLens' real future interactions as weekly batches")
    mode = rp.add_mutually_exclusive_group(required=True)
    mode.add_argument("--init", action="store_true",
                      help="cut the data after the cutoff into weekly pending batches")
    mode.add_argument("--next", action="store_true", help="release the next pending batch")
    mode.add_argument("--status", action="store_true", help="pending / released batches")
    rp.add_argument("--cutoff", default=None,
                    help="ISO date: the initial store holds the interactions before it "
                         "(default: ingest.until); must equal ingest.until")
    rp.add_argument("--reset", action="store_true",
                    help="with --init: delete the replay state, the feedback folders and the "
                         "store parts first")
    rp.add_argument("--corrupt", action="store_true",
                    help="with --next: release a deliberately corrupted copy of the next batch "
                         "(rating 11, unknown item, future timestamp, duplicates) instead")
    return parser


def feedback_cli(argv: list[str] | None = None) -> int:
    """``genre feedback [--root R] [--params P] [--override O] <run|status|record|replay> ...``.

    Prints a JSON summary; exit code 0, 1 (a stage refused: message on stderr) or 2 (params).
    """
    from genre_tasks.feedback import replay  # cli is the top of feedback: no circle
    from genre_tasks.errors import exit_code

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "replay" and (args.reset and not args.init or args.corrupt and not args.next):
        parser.error("replay: --reset goes with --init, --corrupt with --next")
    logs.setup_logging()
    paths = S.Paths(args.root)

    def body() -> dict:
        params = config.load_params(args.params, args.override)
        if args.command == "run":
            moment = (as_datetime(args.logical_date) if args.logical_date
                      else dt.datetime.now(dt.timezone.utc))  # the CLI boundary: now is the run's date
            out = run(params, paths, moment, prequential_scoring=False if args.no_prequential else None,
                      dvc=False if args.no_dvc else None, push=False if args.no_push else None,
                      allow_new_items=args.allow_new_items)
            for batch_id, msg in out.get("messages", {}).items():
                print(f"batch {batch_id} quarantined: {msg}", file=sys.stderr)
            for name, msg in {**out.get("refused", {}), **out.get("not_processed", {})}.items():
                print(f"{name}: {msg}", file=sys.stderr)
        elif args.command == "status":
            out = status(params, paths)
        elif args.command == "record":
            out = record_store(params, paths, push=False if args.no_push else None)
        else:
            if args.init:
                out = replay.init(params, paths, cutoff=args.cutoff, reset=args.reset)
            elif args.next:
                out = replay.next_batch(params, paths, corrupt=args.corrupt)
            else:
                out = replay.replay_status(params, paths)
        return out

    return exit_code(f"feedback {args.command}", body)
