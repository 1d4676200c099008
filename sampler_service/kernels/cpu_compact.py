"""Threshold compaction of float32 logit rows on the CPU, compiled by numba: one pass per row.

`compact_at_least` turns a dense batch into the sparse form of
`sampler_service.policy.candidates.Candidates` when a threshold keeps few tokens: row r's
entries with l ≥ threshold[r], in token-id order, then filler entries (value −inf) whose ids
are the row's first tokens below the threshold, so every id of a row is distinct and every
token not listed is below the threshold. One pass, 64 columns at a time: a vectorised count
of the chunk's kept values, and a look at each value only in a chunk that keeps one; it
replaces the mask pass and every later full-vocabulary pass of the chain.
"""
from __future__ import annotations

import numba
import numpy as np

from sampler_service.kernels import CACHE, run_rows


_CHUNK = 64


@numba.njit(inline="always")
def _kept_row(logits, threshold, values, ids, counts, r):
    """Row r's entries ≥ threshold[r], in column order, into values[r] / ids[r]; counts[r]
    their number (W + 1 as soon as there are more than W)."""
    row = logits[r]
    cut = threshold[r]
    width = values.shape[1]
    kept = 0
    for start in range(0, row.shape[0], _CHUNK):
        chunk = row[start:start + _CHUNK]
        hits = np.int32(0)
        for j in range(chunk.shape[0]):  # vectorises: one compare and add per logit
            hits += np.int32(chunk[j] >= cut)
        if hits == 0:
            continue
        if kept + hits > width:  # too many: the caller masks this batch instead
            kept = width + 1
            break
        for j in range(chunk.shape[0]):
            if chunk[j] >= cut:
                values[r, kept] = chunk[j]
                ids[r, kept] = start + j
                kept += 1
    counts[r] = kept


@numba.njit(cache=CACHE, nogil=True)
def _kept_rows(start, stop, logits, threshold, values, ids, counts):
    for r in range(start, stop):
        _kept_row(logits, threshold, values, ids, counts, r)


@numba.njit(cache=CACHE, nogil=True)
def _fill(values, ids, counts):
    """After each row's kept entries, −inf fillers with the smallest ids it did not keep."""
    for r in range(values.shape[0]):
        kept = counts[r]
        candidate = 0
        next_kept = 0
        for m in range(kept, values.shape[1]):
            while next_kept < kept and ids[r, next_kept] == candidate:
                next_kept += 1
                candidate += 1
            values[r, m] = -np.inf
            ids[r, m] = candidate
            candidate += 1


def compact_at_least(logits: np.ndarray, threshold: np.ndarray, width: int, threads: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [R, W'] float32, ids [R, W'] int64, kept [R] int64) of C-contiguous float32
    `logits` [R, V] and `threshold` [R] float32 (see the module docstring), W' the most
    entries a row keeps (at least 1, at most `width` ≤ V). A row with more than `width` kept
    entries has kept[r] = width + 1 and the other outputs undefined: the caller checks."""
    rows = logits.shape[0]
    values = np.empty((rows, width), dtype=np.float32)
    ids = np.empty((rows, width), dtype=np.int64)
    counts = np.empty(rows, dtype=np.int64)
    run_rows(_kept_rows, rows, threads, logits, threshold, values, ids, counts)
    most = int(counts.max()) if rows else 0
    if most > width:
        return values, ids, counts
    # Contiguous copies of the kept columns: one compiled layout for `_fill` (a strided view
    # would compile another signature, ~1 s, in the middle of serving).
    values = np.ascontiguousarray(values[:, :max(most, 1)])
    ids = np.ascontiguousarray(ids[:, :max(most, 1)])
    _fill(values, ids, counts)
    return values, ids, counts
