"""Compiled CPU kernels (numba), each the fast path of a torch reference kept beside its caller
and tested against it: `cpu_statistics` (moments of whole rows), `cpu_compact` (threshold
compaction into sparse rows)."""
from __future__ import annotations

import threading
from typing import Any, Callable

#: Rows from which a kernel spreads rows over threads; fewer run on the calling thread (waking
#: a team costs more than it saves on a few rows).
PARALLEL_MIN_ROWS = 8

# numba's fallback "workqueue" threading layer refuses concurrent parallel launches.
_launch = threading.Lock()


def run_rows(serial: Callable[..., None], parallel: Callable[..., None], rows: int, threads: int,
             *arguments: Any) -> None:
    """Runs a row kernel: `serial` on this thread for few rows or one thread, else `parallel`
    (a `numba.prange` over rows) on up to `threads` threads."""
    if rows < PARALLEL_MIN_ROWS or threads <= 1:
        serial(*arguments)
        return
    import numba
    with _launch:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        parallel(*arguments)
