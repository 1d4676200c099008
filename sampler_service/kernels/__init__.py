"""Compiled CPU kernels (numba), each the fast path of a torch reference kept beside its caller
and tested against it: `cpu_statistics` (moments of whole rows), `cpu_compact` (threshold
compaction into sparse rows), `cpu_mass_cut` (top-p's nucleus). Importing this package needs
numba (the `server` extra); callers fall back to their torch path without it."""
from __future__ import annotations

import threading
from typing import Any, Callable

import numba

#: Rows from which a kernel spreads rows over threads; fewer run on the calling thread (waking
#: a team costs more than it saves on a few rows).
PARALLEL_MIN_ROWS = 8

# One launch at a time: numba's "workqueue" threading layer refuses concurrent launches.
_launch = threading.Lock()

# Parallel kernels run on numba's own "workqueue" threads, which sleep between launches. Its
# OpenMP layer would start a second OpenMP runtime beside torch's, whose threads spin after
# each launch on the cores torch's next operation needs.
numba.config.THREADING_LAYER = "workqueue"


def run_rows(kernel: Callable[..., None], rows: int, threads: int, *arguments: Any) -> None:
    """Runs a row kernel (a `numba.prange` over rows) on up to `threads` threads, or on one for
    fewer than `PARALLEL_MIN_ROWS` rows. The same compiled code runs every row whatever the
    batch, so a row's results never depend on its batch mates (a serial compilation of the
    same loop vectorises differently and rounds differently)."""
    with _launch:
        numba.set_num_threads(1 if rows < PARALLEL_MIN_ROWS else
                              max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        kernel(*arguments)
