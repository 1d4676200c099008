"""Compiled CPU kernels (numba), each the fast path of a torch reference kept beside its caller
and tested against it: `cpu_statistics` (moments of whole rows), `cpu_compact` (threshold
compaction into sparse rows), `cpu_mass_cut` (top-p's nucleus). Importing this package needs
numba (the `server` extra); callers fall back to their torch path without it."""
from __future__ import annotations

import os
import tempfile
import threading
from typing import Any, Callable

import numba

#: Rows from which a kernel spreads rows over threads; fewer run on the calling thread (waking
#: a team costs more than it saves on a few rows).
PARALLEL_MIN_ROWS = 8

def _cache_directory() -> bool:
    """Whether compiled kernels can be cached on disk, choosing where: `NUMBA_CACHE_DIR` when
    set, else beside the sources when writable, else a directory under the system's temporary
    one (a read-only install, e.g. a container's root file system)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    if os.access(os.path.dirname(__file__), os.W_OK):
        return True
    fallback = os.path.join(tempfile.gettempdir(), "sampler-sidecar-numba")
    try:
        os.makedirs(fallback, exist_ok=True)
    except OSError:
        return False
    if not os.access(fallback, os.W_OK):
        return False
    numba.config.CACHE_DIR = fallback
    return True


#: Whether the kernels' compiled code is cached on disk (else each start compiles, ~5 s).
CACHE = _cache_directory()

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


def warm() -> None:
    """Compiles (or loads from the cache) every kernel on tiny inputs, so that the first step
    does not pay for it: the server calls it before it reports SERVING."""
    import numpy as np

    from sampler_service.kernels import cpu_compact, cpu_draw, cpu_mass_cut, cpu_statistics, cpu_top_k
    logits = np.array([[0.0, -1.0, -2.0]], dtype=np.float32)
    best = logits.max(axis=1)
    zero = np.zeros(1, dtype=np.float32)
    half = np.full(1, 0.5)
    cpu_statistics.row_moments(logits, best, 1)
    cpu_compact.compact_at_least(logits, best, 2, 1)
    cpu_top_k.top_k_entries(logits, 2, 1)
    cpu_mass_cut.mass_cuts(logits, best, zero, half, 1)
    cpu_mass_cut.keys_beyond(logits, best, zero, zero, 1)
    cpu_draw.draw_columns(logits, best, half, 1)
