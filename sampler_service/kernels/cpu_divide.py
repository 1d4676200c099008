"""Temperature's division of float32 CPU rows, compiled by numba: one pass per row.

out[r, j] = min(values[r, j] / divisor[r], f32max), the float32 quotient rounded as IEEE
division rounds it (compiled without fast-math: no reciprocal multiplication), saturated at
float32's largest value instead of +inf. torch's `values / divisor` followed by
`clamp_(max=f32max)` (the reference, `Candidates.divide` off this path) reads the batch twice
and writes it twice; this reads it once and writes it once, into new rows or in place
(64 x 128256 on two threads: 1.3 against 1.9 ms into new rows, 0.8 against 1.3 ms in place).
"""
from __future__ import annotations

import numba
import numpy as np

from sampler_service.kernels import CACHE, run_rows

_LARGEST = np.float32(np.finfo(np.float32).max)


@numba.njit(inline="always")
def _quotient(value, divisor):
    q = value / divisor
    return _LARGEST if q > _LARGEST else q  # NaN stays NaN, as with torch's clamp


@numba.njit(cache=CACHE, nogil=True)
def _rows(start, stop, values, divisor, out):
    for r in range(start, stop):
        row = values[r]
        quotients = out[r]
        d = divisor[r]
        for j in range(row.shape[0]):
            quotients[j] = _quotient(row[j], d)


@numba.njit(cache=CACHE, nogil=True)
def _rows_in_place(start, stop, values, divisor):
    """`_rows` with out = values: compiled apart, as one array the loop vectorises (two that
    may overlap would leave it scalar, 3x slower)."""
    for r in range(start, stop):
        row = values[r]
        d = divisor[r]
        for j in range(row.shape[0]):
            row[j] = _quotient(row[j], d)


def divide_rows(values: np.ndarray, divisor: np.ndarray, out: np.ndarray | None,
                threads: int) -> None:
    """out[r] = min(values[r] / divisor[r], f32max) (the module docstring) for C-contiguous
    float32 `values` and `out` [R, C] (None: into `values` itself) and float32 `divisor`
    [R] > 0; up to `threads` threads."""
    if out is None:
        run_rows(_rows_in_place, values.shape[0], threads, values, divisor)
    else:
        run_rows(_rows, values.shape[0], threads, values, divisor, out)
