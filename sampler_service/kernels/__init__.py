"""Compiled CPU kernels (numba), each the fast path of a torch reference kept beside its caller
and tested against it: `cpu_statistics` (raw statistics of whole rows), `cpu_compact` (threshold
compaction into sparse rows), `cpu_mass_cut` (top-p's nucleus), `cpu_divide` (temperature).
Importing this package needs numba (the `server` extra); callers fall back to their torch path
without it."""
from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numba

#: Rows, and elements of the rows' array, from which a kernel spreads rows over threads;
#: fewer run on the calling thread: handing a part to another thread costs ~20-30 µs, more
#: than it saves on a few rows or a small array (2 cores, 64 x 1024: the statistics 42 µs on
#: one thread, 46 on two; a divide 11 against 28; even at 64 x 2048 against 1 << 17).
PARALLEL_MIN_ROWS = 8
PARALLEL_MIN_ELEMENTS = 1 << 17

def _prefer_wide_vectors() -> None:
    """On a CPU with AVX-512, lets LLVM vectorise with 512-bit registers (its default tuning
    for Intel server parts prefers 256): the kernels' inline exp and sums run ~1.4x faster
    (64 x 128256 moments on two threads 3.8 -> 2.5 ms). Set before the first compilation; a
    user's NUMBA_CPU_NAME / NUMBA_CPU_FEATURES is kept as it is."""
    if numba.config.CPU_FEATURES or numba.config.CPU_NAME:
        return
    try:
        import llvmlite.binding as llvm
        features = llvm.get_host_cpu_features()
    except (ImportError, RuntimeError):
        return
    if features.get("avx512f"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_prefer_wide_vectors()


def _cache_directory() -> bool:
    """Whether compiled kernels can be cached on disk, choosing where: `NUMBA_CACHE_DIR` when
    set, else beside the sources when writable, else a directory under the system's temporary
    one (a read-only install, e.g. a container's root file system)."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:  # numba's own setting, if it can be written (else: no cache, not a failed start)
        try:
            os.makedirs(given, exist_ok=True)
        except OSError:
            return False
        return os.access(given, os.W_OK)
    if os.access(os.path.dirname(__file__), os.W_OK):
        return True
    try:
        fallback = os.path.join(tempfile.gettempdir(), "sampler-sidecar-numba")
        os.makedirs(fallback, exist_ok=True)
    except OSError:  # gettempdir() raises FileNotFoundError when no temporary directory works
        return False
    if not os.access(fallback, os.W_OK):
        return False
    numba.config.CACHE_DIR = fallback
    return True


#: Whether the kernels' compiled code is cached on disk (else each start compiles, ~5 s).
CACHE = _cache_directory()

#: Threads that run the other parts of a batch's rows (the calling thread runs the first).
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                       thread_name_prefix="sampler-kernel")
        return _pool


def run_rows(kernel: Callable[..., None], rows: int, threads: int, *arguments: Any) -> None:
    """Runs a row kernel, `kernel(start, stop, *arguments)` over rows [start, stop) (compiled
    with nogil), whose first argument is the [rows, C] array it walks: on the calling thread
    for fewer than `PARALLEL_MIN_ROWS` rows or `PARALLEL_MIN_ELEMENTS` elements of that array,
    or one thread, else as up to `threads` contiguous parts run at once, the first on the
    calling thread. The same compiled loop runs every row whatever the batch, so a row's
    results never depend on its batch mates, and a lone row pays no thread hand-off (numba's
    own parallel launch cost ~20 µs even on one thread)."""
    small = rows < PARALLEL_MIN_ROWS or arguments[0].size < PARALLEL_MIN_ELEMENTS
    parts = 1 if small else max(1, min(threads, rows))
    if parts == 1:
        kernel(0, rows, *arguments)
        return
    bounds = [rows * i // parts for i in range(parts + 1)]
    others = [_executor().submit(kernel, bounds[i], bounds[i + 1], *arguments)
              for i in range(1, parts)]
    kernel(bounds[0], bounds[1], *arguments)
    for other in others:
        other.result()


def warm() -> None:
    """Compiles (or loads from the cache) every kernel on tiny inputs, so that the first step
    does not pay for it: the server calls it before it reports SERVING."""
    import numpy as np

    from sampler_service.kernels import (cpu_compact, cpu_divide, cpu_draw, cpu_mass_cut,
                                         cpu_statistics, cpu_top_k)
    logits = np.array([[0.0, -1.0, -2.0]], dtype=np.float32)
    best = logits.max(axis=1)
    zero = np.zeros(1, dtype=np.float32)
    half = np.full(1, 0.5)
    cpu_statistics.row_moments(logits, best, 1)
    cpu_statistics.row_statistics(logits, 1)
    cpu_compact.compact_at_least(logits, best, 2, 1)
    cpu_top_k.top_k_entries(logits, 2, 1)
    cpu_mass_cut.mass_cuts(logits, best, zero, half, 1)
    cpu_mass_cut.keys_beyond(logits, best, zero, zero, 1)
    cpu_draw.draw_columns(logits, best, half, 1)
    cpu_divide.divide_rows(logits, np.ones(1, dtype=np.float32), logits.copy(), 1)
    cpu_divide.divide_rows(logits.copy(), np.ones(1, dtype=np.float32), None, 1)
