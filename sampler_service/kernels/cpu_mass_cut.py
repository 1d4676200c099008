"""Mass cuts of top-p and typical-p on float32 CPU rows, compiled by numba: three passes per
row, no sort.

Both keep the tokens taken in ascending order of a key while the mass before them is below p
(the first token always stays): top-p's key is the distance below the best logit m − l
(best first), typical-p's the distance of the surprise from the entropy, |−log p − H| =
|l − m − c| with c = Σ w·z / Σ w (z = l − m, w = exp z). Per row:
  1. w_j = exp(l_j − m) (vectorised, as `cpu_statistics`; 0 for masked tokens) and s = Σ w;
  2. tokens binned by key (1/32 nat per bin, the last bin open-ended), the bins' masses summed
     in float64; the cut bin is the last whose preceding mass is below p·s;
  3. only the cut bin's tokens are gathered, ordered by key (ties by column) and walked to the
     last token whose preceding mass is below p·s.
Tokens without weight (masked, or more than 87 nats below the best) are never kept by the walk
(they cannot help reach the mass); the first token always stays.
References: `TopP` and `TypicalP` in `sampler_service.policy.processors.truncation` (a
best-first prefix, else `mass_cut_column`'s histogram, float32 sums). Float64 sums here make
the kernel the closer of the two to exact arithmetic on very flat rows.
"""
from __future__ import annotations

import numba
import numpy as np

from sampler_service.kernels import CACHE, run_rows
from sampler_service.kernels.cpu_statistics import FASTMATH, exp_nonpositive

BINS_PER_NAT = 32
NATS = 48
_BINS = BINS_PER_NAT * NATS


@numba.njit(fastmath=FASTMATH, nogil=True, cache=CACHE)
def _weights(row, best, weights):
    """weights[j] = exp(row[j] − best) (0 where masked); returns Σ weights (float64). Compiled
    on its own: its fast-math flags (so that the sum vectorises) stay its own."""
    total = 0.0
    for start in range(0, row.shape[0], 512):
        block = row[start:start + 512]  # indexed from 0: the loop vectorises
        out = weights[start:start + 512]
        part = np.float32(0.0)
        for j in range(block.shape[0]):
            w = exp_nonpositive(block[j] - best)
            out[j] = w
            part += w
        total += part
    return total


@numba.njit(inline="always")
def _bin(key):
    return int(min(key * np.float32(BINS_PER_NAT), np.float32(_BINS - 1)))


@numba.njit(inline="always")
def _key(value, best, center):
    """|(l − m) − c| in float32, in that order (no fast-math: m + c first would round at the
    scale of m): the key tokens are taken in (ascending) order."""
    return abs((value - best) - center)


@numba.njit(inline="always")
def _cut_row(logits, best, center, fraction, columns_out, keys_out, r):
    row = logits[r]
    b = best[r]
    c = center[r]
    weights = np.empty(row.shape[0], dtype=np.float32)
    target = fraction[r] * _weights(row, b, weights)
    bin_mass = np.zeros(_BINS)
    bin_count = np.zeros(_BINS, dtype=np.int64)
    for j in range(row.shape[0]):
        if weights[j] > 0.0:  # a token without weight is never needed to reach the mass
            k = _bin(_key(row[j], b, c))
            bin_mass[k] += weights[j]
            bin_count[k] += 1
    # The cut bin: the last weighted bin whose preceding mass is below the target, or the
    # first weighted bin (the first token always stays, even for a target of 0; rounding can
    # leave a target above every bin's preceding mass).
    cut = -1
    before = 0.0
    preceding = 0.0
    for k in range(_BINS):
        if bin_count[k] > 0:
            if cut < 0 or before < target:
                cut = k
                preceding = before
            before += bin_mass[k]
    keys = np.empty(bin_count[cut], dtype=np.float32)
    columns = np.empty(bin_count[cut], dtype=np.int64)
    n = 0
    for j in range(row.shape[0]):
        if weights[j] > 0.0:
            key = _key(row[j], b, c)
            if _bin(key) == cut:
                keys[n] = key
                columns[n] = j
                n += 1
    order = np.argsort(keys, kind="mergesort")
    last = order[0]
    preceding += weights[columns[last]]
    for i in range(1, n):
        if preceding >= target:
            break
        last = order[i]
        preceding += weights[columns[last]]
    columns_out[r] = columns[last]
    keys_out[r] = keys[last]


@numba.njit(cache=CACHE, nogil=True)
def _rows(start, stop, logits, best, center, fraction, columns, keys):
    for r in range(start, stop):
        _cut_row(logits, best, center, fraction, columns, keys, r)


def mass_cuts(logits: np.ndarray, best: np.ndarray, center: np.ndarray, fraction: np.ndarray,
              threads: int) -> tuple[np.ndarray, np.ndarray]:
    """(column [R] int64, key [R] float32) of each row's last kept token when tokens are taken
    in ascending key |l − best − center| while the mass before them is below `fraction` [R]
    float64 (0 keeps the first alone): `logits` [R, V] C-contiguous float32, `best` [R] their
    maxima, `center` [R] float32 (0 for top-p)."""
    columns = np.empty(logits.shape[0], dtype=np.int64)
    keys = np.empty(logits.shape[0], dtype=np.float32)
    run_rows(_rows, logits.shape[0], threads, logits, best, center, fraction,
             columns, keys)
    return columns, keys


@numba.njit(inline="always")
def _beyond_row(logits, best, center, cut, out, r):
    row = logits[r]
    for j in range(row.shape[0]):
        out[r, j] = _key(row[j], best[r], center[r]) > cut[r]


@numba.njit(cache=CACHE, nogil=True)
def _beyond_rows(start, stop, logits, best, center, cut, out):
    for r in range(start, stop):
        _beyond_row(logits, best, center, cut, out, r)


def keys_beyond(logits: np.ndarray, best: np.ndarray, center: np.ndarray, cut: np.ndarray,
                threads: int) -> np.ndarray:
    """[R, V] bool: where the key |l − best − center| (computed as `mass_cuts` does) is above
    cut[r] (float32; +inf: nowhere)."""
    out = np.empty(logits.shape, dtype=np.bool_)
    run_rows(_beyond_rows, logits.shape[0], threads, logits, best, center,
             cut, out)
    return out
