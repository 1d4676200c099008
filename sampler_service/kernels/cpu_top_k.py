"""Each row's k best logits on float32 CPU rows, compiled by numba: one pass, no sort.

A best-first buffer of the row's k best (value, column) pairs is kept while the row is read,
64 columns at a time: a chunk is looked at value by value only when one of its values beats
the buffer's smallest (a vectorised count), which on a shuffled row soon almost never
happens. Equal values are ordered by column. Reference: `torch.topk`, which
`Candidates.best_first` uses for wider prefixes and off the CPU (it promises no order among
equal values). Insertion costs O(k), so this is for small k (`Candidates.best_first` uses it
up to `KERNEL_TOP_K`).
"""
from __future__ import annotations

import numba
import numpy as np

from sampler_service.kernels import CACHE, run_rows

_CHUNK = 64


@numba.njit(inline="always")
def _insert(values, columns, value, column, filled, width):
    """Inserts (value, column) into the best-first buffer holding `filled` pairs (a later
    column goes after an equal value)."""
    i = min(filled, width - 1)
    while i > 0 and values[i - 1] < value:
        values[i] = values[i - 1]
        columns[i] = columns[i - 1]
        i -= 1
    values[i] = value
    columns[i] = column
    return min(filled + 1, width)


@numba.njit(inline="always")
def _top_row(logits, width, values_out, columns_out, r):
    row = logits[r]
    vocab = row.shape[0]
    values = values_out[r]
    columns = columns_out[r]
    filled = 0
    for j in range(width):
        filled = _insert(values, columns, row[j], j, filled, width)
    floor = values[width - 1]
    for start in range(width, vocab, _CHUNK):
        chunk = row[start:start + _CHUNK]
        beats = np.int32(0)
        for j in range(chunk.shape[0]):  # vectorises: one compare and add per logit
            beats += np.int32(chunk[j] > floor)
        if beats > 0:
            for j in range(chunk.shape[0]):
                if chunk[j] > floor:
                    _insert(values, columns, chunk[j], start + j, width, width)
                    floor = values[width - 1]


@numba.njit(cache=CACHE, nogil=True)
def _rows(start, stop, logits, width, values, columns):
    for r in range(start, stop):
        _top_row(logits, width, values, columns, r)


def top_k_entries(logits: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [R, k] float32 best first, their columns [R, k] int64) of C-contiguous float32
    `logits` [R, V], 1 ≤ k ≤ V."""
    rows = logits.shape[0]
    values = np.empty((rows, k), dtype=np.float32)
    columns = np.empty((rows, k), dtype=np.int64)
    run_rows(_rows, rows, threads, logits, k, values, columns)
    return values, columns
