"""Fused moments of float32 logit rows on the CPU, compiled by numba: one pass per row.

Given each row's maximum m, with z = max(l − m, −87) and w = exp z, the kernel returns
s = Σ w, s₁ = Σ w·z and s₂ = Σ w·z² per row, from which the log-normaliser m + log s, the
entropy H = log s − s₁/s and the varentropy V = s₂/s − (s₁/s)² follow
(`sampler_service.policy.statistics`). Tokens with z ≤ −87 (masked ones, −inf, included) weigh
exactly 0: e^−87 ≈ 1.6e-38 is below float32's normal range, and a point mass keeps H = 0.

exp is evaluated inline so that the loop vectorises (numba's `math.exp` is a scalar libm call
without Intel's SVML): exp z = 2^n · 2^f with t = z·log₂e, n = round(t), f = t − n ∈ [−½, ½],
2^f by its degree-6 Taylor polynomial (relative error < 1e-7) and 2^n written into a float's
exponent bits. Sums run in float32 over blocks of `BLOCK` columns and in float64 across
blocks, so their relative error stays near 1e-7 on 128k-token rows.

Compiled code is cached on disk (see `sampler_service.kernels.CACHE`), so only the first start
of an install compiles.
"""
from __future__ import annotations

import numba
import numpy as np

from sampler_service.kernels import CACHE, run_rows

#: Float-math flags: reassociation (so that sums vectorise) and contraction into FMAs, never
#: "no infinities" or "no NaNs" (masked logits are −inf).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_LOG2E = np.float32(1.4426950408889634)
_FLOOR = np.float32(-87.0)
#: Columns summed in float32 before the float64 total.
BLOCK = 512


@numba.njit(inline="always", fastmath=FASTMATH)
def exp_nonpositive(z):
    """exp z for a float32 z ≤ 0 (see the module docstring); 0 where z ≤ −87, −inf included."""
    z = max(z, _FLOOR)
    t = z * _LOG2E
    n = np.floor(t + np.float32(0.5))
    f = t - n
    p = np.float32(1.5353362e-4)
    p = p * f + np.float32(1.3398874e-3)
    p = p * f + np.float32(9.6180542e-3)
    p = p * f + np.float32(5.5503449e-2)
    p = p * f + np.float32(2.4022648e-1)
    p = p * f + np.float32(6.9314718e-1)
    p = p * f + np.float32(1.0)
    w = p * np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return w if z > _FLOOR else np.float32(0.0)


@numba.njit(inline="always", fastmath=FASTMATH)
def _block_moments(row, best, start, stop):
    total = np.float32(0.0)
    first = np.float32(0.0)
    second = np.float32(0.0)
    for j in range(start, stop):
        z = max(row[j] - best, _FLOOR)
        w = exp_nonpositive(z)
        wz = w * z
        total += w
        first += wz
        second += wz * z
    return total, first, second


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_moments(logits, best, out, r):
    row = logits[r]
    vocab = row.shape[0]
    total = 0.0
    first = 0.0
    second = 0.0
    for start in range(0, vocab, BLOCK):
        s, s1, s2 = _block_moments(row, best[r], start, min(start + BLOCK, vocab))
        total += s
        first += s1
        second += s2
    out[r, 0] = total
    out[r, 1] = first
    out[r, 2] = second


@numba.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def _rows(start, stop, logits, best, out):
    for r in range(start, stop):
        _row_moments(logits, best, out, r)


def row_moments(logits: np.ndarray, best: np.ndarray, threads: int) -> np.ndarray:
    """[R, 3] float64 (Σ w, Σ w·z, Σ w·z²) of C-contiguous float32 `logits` [R, V] with
    z = max(l − best[r], −87) and w = exp z, `best` [R] float32 each row's maximum; up to
    `threads` threads."""
    out = np.empty((logits.shape[0], 3))
    run_rows(_rows, logits.shape[0], threads, logits, best, out)
    return out


@numba.njit(inline="always", fastmath=FASTMATH)
def _finite_sums(row, start, stop, mean):
    """(Σ over finite entries of l − mean, of (l − mean)², their count) of row[start:stop]."""
    first = np.float32(0.0)
    second = np.float32(0.0)
    count = np.int32(0)
    for j in range(start, stop):
        finite = row[j] > np.float32(-np.inf)
        d = row[j] - mean if finite else np.float32(0.0)
        first += d
        second += d * d
        count += np.int32(finite)
    return first, second, count


@numba.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def _std_rows(start, stop, logits, out):
    for r in range(start, stop):
        row = logits[r]
        vocab = row.shape[0]
        total = 0.0
        count = 0
        for at in range(0, vocab, BLOCK):
            s, _, c = _finite_sums(row, at, min(at + BLOCK, vocab), np.float32(0.0))
            total += s
            count += c
        mean = np.float32(total / max(count, 1))
        first = 0.0
        second = 0.0
        for at in range(0, vocab, BLOCK):
            s1, s2, _ = _finite_sums(row, at, min(at + BLOCK, vocab), mean)
            first += s1
            second += s2
        n = max(count, 1)
        out[r] = np.sqrt(max(second / n - (first / n) ** 2, 0.0))


def row_std(logits: np.ndarray, threads: int) -> np.ndarray:
    """[R] float64 population standard deviation of each row's finite entries (0 for a row
    without any) of C-contiguous float32 `logits` [R, V]: two passes, the mean then the
    squares about it (float32 within blocks, float64 across; the mean's own rounding is
    taken back out). Reference: `truncation.finite_std` (torch)."""
    out = np.empty(logits.shape[0])
    run_rows(_std_rows, logits.shape[0], threads, logits, out)
    return out
