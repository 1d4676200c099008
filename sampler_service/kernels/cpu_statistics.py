"""Raw statistics of float32 logit rows on the CPU, compiled by numba.

`row_statistics`: one read of each row gives its first argmax, log-normaliser, entropy and
varentropy. The row is walked in blocks of `BLOCK` columns; each block is read twice while it
sits in the L1 cache: once for its maximum (an integer max over order-preserving keys, which
vectorises where a float max reduction does not), then for its moments about the running
maximum m, z = max(l − m, −87) and w = exp z:
    s = Σ w,   s₁ = Σ w·z,   s₂ = Σ w·z²,
from which the log-normaliser m + log s, the entropy H = log s − s₁/s and the varentropy
V = s₂/s − (s₁/s)² follow. When a block raises the maximum from m to m' (δ = m − m' < 0),
every earlier z becomes z + δ and w becomes w·e^δ, so the sums so far become
    s ← e^δ s,   s₁ ← e^δ (s₁ + δ s),   s₂ ← e^δ (s₂ + 2δ s₁ + δ² s)
(no cancellation: s₁ ≤ 0 and δ < 0 make every term of the same sign). The argmax is the
lowest column holding the maximum: a block's first such column, taken only when the block
raises the maximum strictly.

`row_moments`: the same three sums about a given maximum per row (one pass; typical-p's
centre), and `row_std`: the standard deviation of each row's finite entries (top-nσ).

Tokens with z ≤ −87 (masked ones, −inf, included) weigh exactly 0: e^−87 ≈ 1.6e-38 is below
float32's normal range, and a point mass keeps H = 0.

exp is evaluated inline so that the loop vectorises (numba's `math.exp` is a scalar libm call
without Intel's SVML): exp z = 2^n · 2^f with t = z·log₂e, n = round(t), f = t − n ∈ [−½, ½],
2^f by its degree-6 Taylor polynomial (relative error < 1e-7) and 2^n written into a float's
exponent bits. Sums run in float32 over blocks of `BLOCK` columns and in float64 across
blocks, so their relative error stays near 1e-7 on 128k-token rows. Loops run over a block's
own slice from column 0, so that numba's index wrap-around check folds away and LLVM
vectorises them (indexing a whole row from a block's start column kept them scalar: 2x
slower).

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
def _block_moments(block, best):
    """(Σ w, Σ w·z, Σ w·z²) in float32 over `block` (a row's slice), z = max(l − best, −87)."""
    total = np.float32(0.0)
    first = np.float32(0.0)
    second = np.float32(0.0)
    for j in range(block.shape[0]):
        z = max(block[j] - best, _FLOOR)
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
        s, s1, s2 = _block_moments(row[start:start + BLOCK], best[r])
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


_MAGNITUDE = np.int32(0x7FFFFFFF)
_LOWEST_KEY = np.int32(-2 ** 31)


@numba.njit(inline="always")
def _order_key(bits):
    """The int32 key of a float32's bits `bits` that orders as the floats do (no NaN): ±its
    magnitude bits by its sign, so −0 and +0 share the key 0 as they compare equal."""
    sign = bits >> np.int32(31)  # 0 or −1
    return ((bits & _MAGNITUDE) ^ sign) - sign


#: Magnitude bits above +inf's are a NaN's (of either sign); +inf's order key.
_INF_BITS = np.int32(0x7F800000)
#: `row_statistics`' problem codes: every value fine; a NaN or +inf; no finite value.
FINE, NAN_OR_INF, NO_FINITE = 0, 1, 2


@numba.njit(inline="always")
def _block_max_key(keys):
    """(the largest float32 of a block as its `_order_key`, the largest magnitude bits of its
    values: above `_INF_BITS` when it holds a NaN), from the block's bits `keys`."""
    best = _LOWEST_KEY
    magnitude = np.int32(0)
    for j in range(keys.shape[0]):
        best = max(best, _order_key(keys[j]))
        magnitude = max(magnitude, keys[j] & _MAGNITUDE)
    return best, magnitude


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_statistics(row, bits):
    """(first argmax, log-normaliser, entropy, varentropy, problem) of one row, in one walk
    over its blocks (the module docstring); NaN statistics for a row without a finite value.
    `problem`: FINE, NAN_OR_INF (a NaN of either sign, or +inf) or NO_FINITE (all −inf)."""
    vocab = row.shape[0]
    best_key = _LOWEST_KEY
    worst = np.int32(0)
    best = np.float32(-np.inf)
    best_id = 0
    total = 0.0
    first = 0.0
    second = 0.0
    for start in range(0, vocab, BLOCK):
        block = row[start:start + BLOCK]
        keys = bits[start:start + BLOCK]
        key, magnitude = _block_max_key(keys)
        worst = max(worst, magnitude)
        if key > best_key:  # a new maximum: its first column is the argmax, sums move to it
            best_key = key
            for j in range(keys.shape[0]):
                if _order_key(keys[j]) == key:
                    best_id = start + j
                    break
            raised = row[best_id]
            if best > np.float32(-np.inf):
                shift = np.float64(best) - np.float64(raised)
                scale = np.exp(shift)
                second = scale * (second + 2.0 * shift * first + shift * shift * total)
                first = scale * (first + shift * total)
                total = scale * total
            best = raised
        if best > np.float32(-np.inf):
            s, s1, s2 = _block_moments(block, best)
            total += s
            first += s1
            second += s2
    if worst > _INF_BITS or best_key >= _INF_BITS:
        return best_id, np.nan, np.nan, np.nan, NAN_OR_INF
    if not best > np.float32(-np.inf):
        return best_id, np.nan, np.nan, np.nan, NO_FINITE
    log_total = np.log(total)
    mean = first / total
    return (best_id, best + log_total, log_total - mean, max(second / total - mean * mean, 0.0),
            FINE)


@numba.njit(fastmath=FASTMATH, cache=CACHE, nogil=True)
def _statistics_rows(start, stop, logits, best_id, normalizer, entropy, varentropy, problem):
    bits = logits.view(np.int32)
    for r in range(start, stop):
        (best_id[r], normalizer[r], entropy[r], varentropy[r],
         problem[r]) = _row_statistics(logits[r], bits[r])


def row_statistics(logits: np.ndarray, threads: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first argmax [R] int64, log-normaliser, entropy, varentropy [R] float32 each, problem
    [R] int8) of C-contiguous float32 `logits` [R, V], one read of each row (the module
    docstring), up to `threads` threads. `problem` is FINE, NAN_OR_INF (a NaN or +inf in the
    row) or NO_FINITE (every value −inf); the statistics of such a row are NaN. Reference:
    `sampler_service.policy.statistics.raw_statistics_reference` (torch)."""
    rows = logits.shape[0]
    best_id = np.empty(rows, dtype=np.int64)
    normalizer, entropy, varentropy = (np.empty(rows, dtype=np.float32) for _ in range(3))
    problem = np.empty(rows, dtype=np.int8)
    run_rows(_statistics_rows, rows, threads, logits, best_id, normalizer, entropy, varentropy,
             problem)
    return best_id, normalizer, entropy, varentropy, problem


@numba.njit(inline="always", fastmath=FASTMATH)
def _finite_sums(block, mean):
    """(Σ over finite entries of l − mean, of (l − mean)², their count) of `block`."""
    first = np.float32(0.0)
    second = np.float32(0.0)
    count = np.int32(0)
    for j in range(block.shape[0]):
        finite = block[j] > np.float32(-np.inf)
        d = block[j] - mean if finite else np.float32(0.0)
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
            s, _, c = _finite_sums(row[at:at + BLOCK], np.float32(0.0))
            total += s
            count += c
        mean = np.float32(total / max(count, 1))
        first = 0.0
        second = 0.0
        for at in range(0, vocab, BLOCK):
            s1, s2, _ = _finite_sums(row[at:at + BLOCK], mean)
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
