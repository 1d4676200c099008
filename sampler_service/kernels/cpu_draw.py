"""The inverse-CDF draw of the `sample` selector on float32 CPU rows, compiled by numba.

Reference: `sampler_service.policy.selectors.sample.draw_inverse_cdf_reference` (torch), which
says what is drawn: with w_i = exp(l_i − max l) in token-id order and U the row's uniform, the
first column i with Σ_{j≤i} w_j > U · Σ_j w_j. Here the weights are the inline exp of
`cpu_statistics`, and every sum is defined on the sequence of weighted terms (w > 0) in column
order, blocked by `BLOCK` terms: a block's total is summed in four float32 lanes (term i to
lane i mod 4), the totals in float64 in order, and the crossing is the first term of the
crossing block whose running sum (the preceding blocks' totals, then the block's terms one by
one) exceeds U·Σ, else the block's last term. Columns without weight take no part, so a dense
row and the same row truncated to its surviving columns draw the same token whatever their
widths; no fast-math is needed, so the order is the one written. Passes: the weighted terms
(vectorised exp), the block totals (vectorised lanes), and one block.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from sampler_service.kernels import CACHE, run_rows
from sampler_service.kernels.cpu_statistics import FASTMATH, exp_nonpositive


#: Weighted terms per block of the cumulative sum (see the module docstring).
BLOCK = 256


@numba.njit(inline="always")
def _block_total(weights, start, stop):
    """Σ weights[start:stop] in four float32 lanes (term i to lane i mod 4), then the lanes:
    a fixed order that needs no fast-math to vectorise."""
    lane0 = lane1 = lane2 = lane3 = np.float32(0.0)
    i = start
    while i + 4 <= stop:
        lane0 += weights[i]
        lane1 += weights[i + 1]
        lane2 += weights[i + 2]
        lane3 += weights[i + 3]
        i += 4
    if i < stop:
        lane0 += weights[i]
    if i + 1 < stop:
        lane1 += weights[i + 1]
    if i + 2 < stop:
        lane2 += weights[i + 2]
    return (lane0 + lane1) + (lane2 + lane3)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=CACHE)
def _weights(row, best, weights):
    """weights[j] = exp(row[j] − best) (0 where masked); returns how many are 0. Compiled on
    its own: its fast-math flags (contraction into FMAs) stay its own, and every element is
    computed by the same instructions whatever the row's width."""
    for j in range(row.shape[0]):
        weights[j] = exp_nonpositive(row[j] - best)
    zeros = np.int32(0)
    for j in range(row.shape[0]):
        zeros += np.int32(weights[j] == np.float32(0.0))
    return zeros


@numba.njit(inline="always")
def _draw_row(values, best, uniform, columns, log_probs, r):
    row = values[r]
    b = best[r]
    vocab = row.shape[0]
    weights = np.empty(vocab, dtype=np.float32)
    unweighted = _weights(row, b, weights)
    where = np.empty(0, dtype=np.int64)
    n = vocab
    if unweighted > 0:  # the weighted terms only, in column order
        n = vocab - unweighted
        where = np.empty(n, dtype=np.int64)
        terms = np.empty(n, dtype=np.float32)
        i = 0
        for j in range(vocab):
            if weights[j] > 0.0:
                terms[i] = weights[j]
                where[i] = j
                i += 1
        weights = terms
    blocks = (n + BLOCK - 1) // BLOCK
    totals = np.empty(blocks)
    total = 0.0
    for k in range(blocks):
        totals[k] = _block_total(weights, k * BLOCK, min((k + 1) * BLOCK, n))
        total += totals[k]
    target = uniform[r] * total
    before = 0.0
    k = 0
    while k < blocks - 1 and before + totals[k] <= target:
        before += totals[k]
        k += 1
    stop = min((k + 1) * BLOCK, n)
    term = stop - 1  # the block's last term, should rounding leave the target unreached
    running = before
    for i in range(k * BLOCK, stop):
        running += weights[i]
        if running > target:
            term = i
            break
    column = where[term] if unweighted > 0 else term
    columns[r] = column
    log_probs[r] = row[column] - b - math.log(total)


@numba.njit(cache=CACHE, nogil=True)
def _rows(start, stop, values, best, uniform, columns, log_probs):
    for r in range(start, stop):
        _draw_row(values, best, uniform, columns, log_probs, r)


def draw_columns(values: np.ndarray, best: np.ndarray, uniform: np.ndarray,
                 threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(column [R] int64, its log-probability [R] float64) drawn from each row of `values`
    [R, C] (C-contiguous float32, token-id order, a finite value per row) with `best` [R]
    float32 the rows' maxima and `uniform` [R] float64 in (0, 1)."""
    columns = np.empty(values.shape[0], dtype=np.int64)
    log_probs = np.empty(values.shape[0])
    run_rows(_rows, values.shape[0], threads, values, best, uniform, columns, log_probs)
    return columns, log_probs
