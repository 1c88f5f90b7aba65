"""Determinism and threading of torch fitting; importing this module does not import torch."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE, unless set).

    Only effective before torch is first imported. On a shared 2-core machine, spinning
    threads made 2-thread training 5-8x slower than 1 thread under load; passive waiting
    removed that (measured in benchmarks/bench_train.py's session).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, force deterministic algorithms and ``threads`` threads; restore afterwards."""
    import torch

    import torch.utils.deterministic as det

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also NaN-fills every new uninitialised tensor by default (a guard
    # against kernels that read memory they never wrote). None of ours do, and the fill cost
    # ~6 % of a two-tower epoch (~90 fill_ calls per step); results are bitwise the same.
    det.fill_uninitialized_memory = False
    torch.manual_seed(seed)
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
