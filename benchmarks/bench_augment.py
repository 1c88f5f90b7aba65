"""Generation figures of the augment stage's local backend (SmolLM2-135M GGUF, greedy).

    python benchmarks/bench_augment.py [--root .] [--items 32] [--threads 2] [--quantize none w8a8]
                                       [--stepwise 1 8] [--guided 8 32]
                                       [--rerun-override configs/genre.yaml]

1. load time of the GGUF model;
2. enrich_items on the same ``--items`` MovieLens items (data/processed/items.parquet), side by
   side in one run (nothing cached: backend calls only): the step-by-step reference (one batched
   ``generate`` per value, ``--stepwise`` batch sizes) and the guided pass the backend uses
   (``--guided`` batch sizes; its genre is constrained to the vocabulary as in the stage, unless
   ``--free-choices``). Items/s, generated tokens/s, replies passing the schema, replies (and
   first values) identical to the first variant's, and the time enriching all items would take.
   Each ``--quantize`` value (augment.quantize) runs every variant, one loaded model each, so the
   replies of a quantized model are compared with the float32 ones of the same run;
3. with ``--rerun-override``: the augment stage re-run with those params on the project, whose
   generation cache is complete after a first run: seconds and generations (should be 0).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from genre_tasks import schema as S
from genre_tasks.config import load_params, section
from genre_tasks.features.augment import stage
from genre_tasks.features.augment.backends import LocalBackend
from genre_tasks.features.augment import templates
from genre_tasks.features.augment.engine import generate_stepwise, generate_structured
from genre_tasks.features.augment.params import QUANTIZE, AugmentParams
from genre_tasks.features.augment.validation import InvalidOutput, parse_reply


def cpu_features() -> str:
    """The CPU's vector extensions that decide float32 / int8 matrix speed (Linux)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return "CPU: " + " ".join(f for f in wanted if f in flags)


def valid_count(jobs, replies) -> int:
    """Replies that pass the operation's schema as generated (before any repair prompt)."""
    ok = 0
    for job, text in zip(jobs, replies):
        try:
            parse_reply(text, job.operation, job.vocabulary, job.n_items)
            ok += 1
        except InvalidOutput:
            pass
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--stepwise", type=int, nargs="*", default=[1, 8],
                        help="batch sizes of the step-by-step reference (one generate call per value)")
    parser.add_argument("--guided", type=int, nargs="*", default=[8, 32],
                        help="batch sizes of the guided pass (the local backend's path)")
    parser.add_argument("--free-choices", action="store_true",
                        help="guided pass without the vocabulary constraint of {{choice:...}} values "
                             "(then its replies must equal the step-by-step reference's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--rerun-override", default=None)
    parser.add_argument("--quantize", choices=QUANTIZE, nargs="+", default=["none"],
                        help="augment.quantize values of the local backend, each run on every variant")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    print(f"load average {os.getloadavg()[0]:.1f} (2 shared cores); {cpu_features()}")
    backends = {}
    for q in args.quantize:
        backends[q] = LocalBackend(threads=args.threads, quantize=q)
        t0 = time.perf_counter()
        backends[q].load()
        print(f"model {backends[q].model_id}: loaded in {time.perf_counter() - t0:.1f} s")
    items = pd.read_parquet(S.Paths(root).items).sort_values(S.ITEM_IDX)
    vocab = stage.vocabulary(items)
    jobs = stage.item_jobs(items.head(args.items), vocab)
    chats = [j.chat for j in jobs]
    plans = [templates.split_prefill(prefill) for _, prefill in chats]
    tag = (lambda q: f" {q}") if len(args.quantize) > 1 else (lambda q: "")
    variants = [(f"stepwise x{size}{tag(q)}", backends[q], size, False) for q in args.quantize for size in args.stepwise]
    variants += [(f"guided x{size}{tag(q)}", backends[q], size, True) for q in args.quantize for size in args.guided]
    rows, texts = {}, {}
    for label, backend, size, guided in variants:
        backend.ends.clear()
        t0 = time.perf_counter()
        tokens, replies = 0, []
        for b in range(0, len(chats), size):
            part = chats[b:b + size]
            out = (generate_structured(backend, part, args.max_new_tokens,
                                       None if args.free_choices else [vocab] * len(part)) if guided
                   else generate_stepwise(backend, part, plans[b:b + size], args.max_new_tokens))
            tokens += sum(r.tokens for r in out)
            replies += [r.text for r in out]
        dt = time.perf_counter() - t0
        rows[label], texts[label] = len(chats) / dt, replies
        ends = f"; values ended {dict(backend.ends)}" if guided else ""
        print(f"{label:<18} {len(chats)} items in {dt:6.1f} s: {len(chats) / dt:.3f} items/s, "
              f"{tokens / dt:.1f} generated tokens/s ({tokens}); {valid_count(jobs, replies)} of "
              f"{len(jobs)} replies pass the schema (no repair){ends}", flush=True)
    reference = texts[variants[0][0]]
    for label, _, _, _ in variants[1:]:
        same = sum(a == b for a, b in zip(texts[label], reference))
        first = sum(a.split('"', 4)[:4] == b.split('"', 4)[:4] for a, b in zip(texts[label], reference))
        print(f"{label} / {variants[0][0]}: {rows[label] / rows[variants[0][0]]:.2f}x items/s; "
              f"{same} of {len(reference)} replies identical, {first} first values (summaries) identical")
    best = max(rows, key=rows.get)
    print(f"all {len(items)} items with {best} would take ~{len(items) / rows[best] / 60:.1f} min at this rate "
          f"(load {os.getloadavg()[0]:.1f})")
    if args.rerun_override:
        params = load_params(root / "params.yaml", [root / args.rerun_override])
        p = section(AugmentParams, "augment", params)
        t0 = time.perf_counter()
        summary = stage.run(p, S.Paths(root))
        print(f"cache-hit re-run of the augment stage ({args.rerun_override}): {time.perf_counter() - t0:.2f} s, "
              f"{summary['generations_this_run']} generations, {summary['cached']} cached")


if __name__ == "__main__":
    main()
