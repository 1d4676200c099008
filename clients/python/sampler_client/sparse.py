"""Sparse rows: each row's K best token ids and logits, plus statistics of the rest (the tail).

For a row l of V logits and the K ids sent, the tail T is the other V - K ids and
(`sampler.v1.TailStats`):

    max         = max_{i in T} l_i                        (<= every sent logit)
    log_sum_exp = log sum_{i in T} e^{l_i}
    mean        = sum_{i in T} q_i l_i,  q = softmax(l restricted to T)
    mean_square = sum_{i in T} q_i l_i^2

An empty tail (K = V, or a tail of -inf logits only) has max = log_sum_exp = -inf and the
moments 0. With them the service knows the row's exact log-normaliser, entropy and varentropy.

Computed vectorised over the rows (on a GPU all at once, on the host in cache-sized blocks of
rows) on the logits' own device (torch tensors) or with NumPy (NumPy input, so a client-only
install needs no torch), from the float32 values the service would
read for the dense row: top-K, then the tail masked to -inf, its max, and the three sums
sum e^d, sum e^d d, sum e^d d^2 of d = l - max (each <= 0, so nothing overflows), in float32;
the statistics are finished per row in float64. The sent logits are gathered from the
caller's tensor and travel in its wire dtype, so they equal the dense row's entries exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.tensors import WireTensor, wire_tensor

#: Below this shifted logit e^d is 0 in float32, so clamping there changes no sum while it
#: keeps -inf out of the products (-inf * 0 would be NaN).
_NEGLIGIBLE = -1e4
#: Bytes of float32 logits one host block of rows spans (see `_in_blocks`).
_HOST_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class TopKWithTail:
    """n rows sent sparse.

    token_ids : int32 [n, K], each row's K distinct best ids, best first.
    values : WireTensor [n, K], their logits, in the rows' wire dtype and on their device.
    max, log_sum_exp, mean, mean_square : float64 [n], the tail statistics.
    sendable : bool [n], False where the row holds NaN or +inf or no finite logit at all (such
        a row goes dense, so the service answers it with its own precise error).
    """

    token_ids: np.ndarray
    values: WireTensor
    max: np.ndarray
    log_sum_exp: np.ndarray
    mean: np.ndarray
    mean_square: np.ndarray
    sendable: np.ndarray

    def take(self, positions: Sequence[int]) -> "TopKWithTail":
        """The given rows (positions among these n), in that order."""
        index = list(positions)
        return TopKWithTail(self.token_ids[index], self.values.take_rows(index),
                            self.max[index], self.log_sum_exp[index], self.mean[index],
                            self.mean_square[index], self.sendable[index])

    def message(self, rows: Sequence[int], vocab_size: int, values: pb.Tensor) -> pb.SparseRows:
        """`StepRequest.sparse` for these rows, which are `rows` of the request; `values` is
        `self.values` placed by a transport."""
        return pb.SparseRows(
            rows=list(rows), vocab_size=vocab_size,
            token_ids=self.token_ids.astype("<i4").tobytes(), logits=values,
            tails=[pb.TailStats(max=m, log_sum_exp=lse, mean=mean, mean_square=square)
                   for m, lse, mean, square in zip(self.max.tolist(), self.log_sum_exp.tolist(),
                                                   self.mean.tolist(), self.mean_square.tolist())])


def top_k_with_tail(logits: WireTensor, k: int) -> TopKWithTail:
    """The K best entries of each row of `logits` [n, V] (1 <= k <= V) and their tails."""
    ids, values, summary = _in_blocks(logits.float32(), k, logits.source())
    tail_max, total, first, second, unsendable = summary.astype(np.float64)
    empty = ~(total > 0)  # a tail of -inf only (its max is -inf), or no tail at all
    with np.errstate(divide="ignore", invalid="ignore"):
        total = np.where(empty, 1.0, total)
        shift = np.where(empty, 0.0, tail_max)
        mean_shift = np.where(empty, 0.0, first / total)
        mean_square_shift = np.where(empty, 0.0, second / total)
        log_sum_exp = np.where(empty, -np.inf, shift + np.log(total))
    sendable = (unsendable == 0) & ~np.isnan(tail_max) & ~np.isposinf(tail_max)
    return TopKWithTail(ids.astype(np.int32), wire_tensor(values), tail_max, log_sum_exp,
                        shift + mean_shift,
                        shift * shift + 2.0 * shift * mean_shift + mean_square_shift, sendable)


def _in_blocks(rows: Any, k: int, source: Any):
    """The backend's (ids, values, summary) for all rows; on the host in blocks of rows whose
    float32 temporaries fit `_HOST_BLOCK_BYTES` (cache-sized buffers the allocator reuses:
    2x faster than whole 32 MB passes on 64 x 128256), on a GPU in one go."""
    on_numpy = isinstance(rows, np.ndarray)
    backend = _numpy_top_k_sums if on_numpy else _torch_top_k_sums
    count, vocab = rows.shape
    block = max(1, _HOST_BLOCK_BYTES // (4 * vocab)) if on_numpy or not rows.is_cuda else count
    if block >= count:
        return backend(rows, k, source)
    parts = [backend(rows[i:i + block], k, source[i:i + block]) for i in range(0, count, block)]
    if on_numpy:
        values = np.concatenate([p[1] for p in parts])
    else:
        import torch
        values = torch.cat([p[1] for p in parts])
    return (np.concatenate([p[0] for p in parts]), values,
            np.concatenate([p[2] for p in parts], axis=1))


def _numpy_top_k_sums(rows: np.ndarray, k: int, source: np.ndarray):
    """(ids [n, K] best first, their values from `source`, summary [5, n]: tail max, sum e^d,
    sum e^d d, sum e^d d^2, and 1 where a sent value is NaN or +inf) with NumPy."""
    vocab = rows.shape[1]
    best = np.argpartition(rows, vocab - k, axis=1)[:, vocab - k:]  # NaN counts as largest
    top = np.take_along_axis(rows, best, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    ids, top = np.take_along_axis(best, order, axis=1), np.take_along_axis(top, order, axis=1)
    tail = rows.copy()
    np.put_along_axis(tail, ids, -np.inf, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # only rows that hold NaN or +inf
        tail_max = tail.max(axis=1)
        tail -= np.where(np.isfinite(tail_max), tail_max, np.float32(0))[:, None]
        np.maximum(tail, np.float32(_NEGLIGIBLE), out=tail)
        weights = np.exp(tail)
        total = weights.sum(axis=1)
        weights *= tail
        first = weights.sum(axis=1)
        weights *= tail
        second = weights.sum(axis=1)
    unsendable = ((np.isnan(top) | np.isposinf(top)).any(axis=1)
                  | ~np.isfinite(top).any(axis=1))
    return ids, np.take_along_axis(source, ids, axis=1), \
        np.stack([tail_max, total, first, second, unsendable.astype(np.float32)])


def _torch_top_k_sums(rows: Any, k: int, source: Any):
    """`_numpy_top_k_sums` with torch on the rows' device; one transfer to the host for the
    ids and one for the summary; the values stay on the device."""
    import torch
    top, ids = torch.topk(rows, k, dim=1)  # NaN counts as largest
    tail = rows.scatter(1, ids, float("-inf"))
    tail_max = tail.amax(dim=1)
    tail.sub_(torch.where(torch.isfinite(tail_max), tail_max, 0.0)[:, None]).clamp_(min=_NEGLIGIBLE)
    weights = torch.exp(tail)
    total = weights.sum(dim=1)
    first = weights.mul_(tail).sum(dim=1)
    second = weights.mul_(tail).sum(dim=1)
    unsendable = ((torch.isnan(top) | torch.isposinf(top)).any(dim=1)
                  | ~torch.isfinite(top).any(dim=1))
    summary = torch.stack([tail_max, total, first, second, unsendable.to(torch.float32)])
    return ids.cpu().numpy(), source.gather(1, ids), summary.cpu().numpy()
