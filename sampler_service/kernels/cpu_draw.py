"""The inverse-CDF draw of the `sample` selector on float32 CPU rows, compiled by numba.

Reference: `sampler_service.policy.selectors.sample.draw_inverse_cdf_reference` (torch), which
says what is drawn: with w_i = exp(l_i − max l) in token-id order and U the row's uniform, the
first column i with Σ_{j≤i} w_j > U · Σ_j w_j. Here the weights are the inline exp of
`cpu_statistics` and both sums run in float64, term by term in column order, compiled without
fast-math: masked columns add exact zeros, so a dense row and the same row truncated to its
surviving columns draw the same token whatever their widths. Three passes over the row: the
weights (vectorised), their total, and the running sum up to the crossing (on average half).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from sampler_service.kernels import run_rows
from sampler_service.kernels.cpu_statistics import exp_nonpositive


@numba.njit(inline="always")
def _draw_row(values, best, uniform, columns, log_probs, r):
    row = values[r]
    b = best[r]
    weights = np.empty(row.shape[0], dtype=np.float32)
    for j in range(row.shape[0]):  # element-wise: vectorises without fast-math
        weights[j] = exp_nonpositive(row[j] - b)
    total = 0.0
    for j in range(row.shape[0]):
        total += weights[j]
    target = uniform[r] * total
    running = 0.0
    column = -1
    for j in range(row.shape[0]):
        if weights[j] > 0.0:
            column = j  # the last weighted column, should rounding leave the target unreached
            running += weights[j]
            if running > target:
                break
    columns[r] = column
    log_probs[r] = row[column] - b - math.log(total)


@numba.njit(cache=True, nogil=True, parallel=True)
def _rows(values, best, uniform, columns, log_probs):
    for r in numba.prange(values.shape[0]):
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
