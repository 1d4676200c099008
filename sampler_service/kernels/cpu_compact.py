"""Threshold compaction of float32 logit rows on the CPU, compiled by numba: one pass per row.

`compact_at_least` turns a dense batch into the sparse form of
`sampler_service.policy.candidates.Candidates` when a threshold keeps few tokens: row r's
entries with l ≥ threshold[r], in token-id order, then filler entries (value −inf) whose ids
are the row's first tokens below the threshold, so every id of a row is distinct and every
token not listed is below the threshold. One scalar pass with a predictable branch (~0.4 ns
per logit) replaces the mask pass and every later full-vocabulary pass of the chain.
"""
from __future__ import annotations

import numba
import numpy as np

from sampler_service.kernels import run_rows


@numba.njit(inline="always")
def _compact_row(logits, threshold, values, ids, fillers, counts, r):
    row = logits[r]
    cut = threshold[r]
    width = values.shape[1]
    kept = 0
    filled = 0
    for j in range(row.shape[0]):
        value = row[j]
        if value >= cut:
            if kept == width:  # too many: the caller masks this batch instead
                kept += 1
                break
            values[r, kept] = value
            ids[r, kept] = j
            kept += 1
        elif filled < width:
            fillers[r, filled] = j
            filled += 1
    counts[r] = kept
    for m in range(kept, min(filled + kept, width)):
        values[r, m] = -np.inf
        ids[r, m] = fillers[r, m - kept]


@numba.njit(cache=True, nogil=True, parallel=True)
def _rows(logits, threshold, values, ids, fillers, counts):
    for r in numba.prange(logits.shape[0]):
        _compact_row(logits, threshold, values, ids, fillers, counts, r)


def compact_at_least(logits: np.ndarray, threshold: np.ndarray, width: int, threads: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [R, W] float32, ids [R, W] int64, kept [R] int64) of C-contiguous float32
    `logits` [R, V] and `threshold` [R] float32 (see the module docstring), W = `width` ≤ V.
    A row with more than W kept entries stops at the (W + 1)-th with kept[r] = W + 1 and its
    outputs undefined: the caller checks."""
    rows = logits.shape[0]
    values = np.empty((rows, width), dtype=np.float32)
    ids = np.empty((rows, width), dtype=np.int64)
    fillers = np.empty((rows, width), dtype=np.int64)
    counts = np.empty(rows, dtype=np.int64)
    run_rows(_rows, rows, threads, logits, threshold, values, ids, fillers, counts)
    return values, ids, counts
