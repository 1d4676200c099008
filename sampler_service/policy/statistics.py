"""Raw statistics of whole rows of logits: the log-normaliser, entropy and varentropy that
every choice reports, each row's best token and its N best raw entries.

`raw_statistics` reads each float32 CPU row once (the fused numba kernel
`sampler_service.kernels.cpu_statistics.row_statistics`: max, first argmax, log-normaliser,
entropy and varentropy), and runs `raw_statistics_reference` (torch, a few cache-blocked
vectorised passes) elsewhere; the reference is what the kernel is tested against.
Used by the engine for every choice's statistics and by the adaptive processors (EDT,
entropix, ...) that read the raw distribution's uncertainty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from sampler_service.policy.candidates import NUMBA, first_argmax


#: `RawStatistics.problem` codes (the fused kernel's: `cpu_statistics.FINE`, ...).
FINE, NAN_OR_INF, NO_FINITE = 0, 1, 2


@dataclass(frozen=True)
class RawStatistics:
    """Per-row statistics of the raw distribution p = softmax(l), [R] float32 each, and
    (when computed from the whole rows) each row's first argmax [R] int64 and its N best
    entries, best first: `top_values` [R, N] float32 and `top_ids` [R, N] int64."""

    log_normalizer: torch.Tensor  # log Σ exp l
    entropy: torch.Tensor         # H = −Σ p log p
    varentropy: torch.Tensor      # V = Σ p (log p + H)²
    best_id: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    #: [R] int8 from the fused kernel (None elsewhere): FINE, NAN_OR_INF (a NaN or +inf in
    #: the row) or NO_FINITE (every value −inf); the statistics of such a row are NaN. What
    #: validation reads when it has them.
    problem: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "RawStatistics":
        """The statistics of a subset of rows (`rows`: int64 indices)."""
        return RawStatistics(**{f.name: None if getattr(self, f.name) is None
                                else getattr(self, f.name).index_select(0, rows)
                                for f in fields(self)})

    def span(self, start: int, stop: int) -> "RawStatistics":
        """The statistics of rows start … stop − 1 (views, no copy; these when all rows)."""
        if start == 0 and stop == self.entropy.shape[0]:
            return self
        return RawStatistics(**{f.name: None if getattr(self, f.name) is None
                                else getattr(self, f.name)[start:stop] for f in fields(self)})

    @staticmethod
    def joined(parts: "list[RawStatistics]") -> "RawStatistics":
        """The statistics of the parts' rows one after another (a field kept only when every
        part has it)."""
        if len(parts) == 1:
            return parts[0]
        values = {f.name: [getattr(p, f.name) for p in parts] for f in fields(RawStatistics)}
        return RawStatistics(**{name: None if any(v is None for v in column)
                                else torch.cat(column) for name, column in values.items()})

    def with_top(self, logits: torch.Tensor, top_n: int) -> "RawStatistics":
        """These statistics of `logits` [R, V] with each row's `top_n` best entries, as
        `raw_statistics(logits, top_n)` gives them."""
        wanted = min(top_n, logits.shape[1])
        if self.top_values is not None and self.top_values.shape[1] >= wanted:
            return self
        top_values, top_ids = _top(logits, top_n)
        return replace(self, top_values=top_values, top_ids=top_ids)


#: Rows per block of `raw_statistics_reference`: about 2 MB of float32 per temporary, so the
#: temporaries stay in cache (4x faster than whole-batch passes on a 2-core CPU).
STATISTICS_BLOCK_ELEMENTS = 1 << 19


def _block_statistics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    best = logits.amax(dim=1, keepdim=True)
    shifted = logits - best
    weights = torch.exp(shifted)
    total = weights.sum(dim=1)
    shifted.nan_to_num_(neginf=0.0)  # masked tokens have w = 0; keep w · z finite
    weighted = weights.mul_(shifted)
    first = weighted.sum(dim=1) / total
    second = weighted.mul_(shifted).sum(dim=1) / total
    log_total = torch.log(total)
    return log_total + best.squeeze(1), log_total - first, (second - first * first).clamp(min=0.0)


def raw_statistics_reference(logits: torch.Tensor, top_n: int = 0) -> RawStatistics:
    """With z = l − max l, w = exp z and s = Σ w: log p = z − log s, so H = log s − Σ w z / s
    and V = Σ w z² / s − (Σ w z / s)². Sums are torch's pairwise float32 sums (error ~1e-6
    nats on 128k-token rows); rows are processed in cache-sized blocks. The N best come from
    `torch.topk` (ties in no promised order)."""
    block = max(1, STATISTICS_BLOCK_ELEMENTS // logits.shape[1])
    parts = [_block_statistics(logits[i:i + block]) for i in range(0, logits.shape[0], block)]
    normalizer, entropy, varentropy = (torch.cat(column) for column in zip(*parts))
    top_values, top_ids = _top(logits, top_n)
    return RawStatistics(log_normalizer=normalizer, entropy=entropy, varentropy=varentropy,
                         best_id=first_argmax(logits), top_values=top_values, top_ids=top_ids)


def _top(logits: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) [R, N] of each row's N best logits, best first (`torch.topk`)."""
    if top_n == 0:
        empty = logits.new_empty((logits.shape[0], 0))
        return empty, empty.long()
    top = torch.topk(logits, min(top_n, logits.shape[1]), dim=1)
    return top.values, top.indices


def _fused(logits: torch.Tensor, top_n: int) -> RawStatistics:
    """One read of each row by the kernel (`cpu_statistics.row_statistics`: max, first argmax
    and moments at once, the rows in parts on up to torch's thread count); the N best from
    `torch.topk` when asked."""
    from sampler_service.kernels.cpu_statistics import row_statistics
    best_id, normalizer, entropy, varentropy, problem = row_statistics(
        logits.contiguous().numpy(), torch.get_num_threads())
    top_values, top_ids = _top(logits, top_n)
    return RawStatistics(
        log_normalizer=torch.from_numpy(normalizer), entropy=torch.from_numpy(entropy),
        varentropy=torch.from_numpy(varentropy), best_id=torch.from_numpy(best_id),
        top_values=top_values, top_ids=top_ids, problem=torch.from_numpy(problem))


def fused_available(logits: torch.Tensor) -> bool:
    """Whether `raw_statistics` takes the fused kernel for `logits`: float32 on the CPU, and
    numba installed."""
    return (NUMBA and logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.shape[1] > 0)


def raw_statistics(logits: torch.Tensor, top_n: int = 0) -> RawStatistics:
    """`RawStatistics` of `logits` [R, V] (each row with a finite value), with each row's
    `top_n` best raw entries: the fused kernel where `fused_available`, else the reference.
    Both agree within 1e-6 nats (tests/unit/kernels/test_cpu_statistics.py)."""
    if fused_available(logits):
        return _fused(logits, top_n)
    return raw_statistics_reference(logits, top_n)


def top_two_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest and second largest logit, [R] each (−inf as the second of a
    one-token vocabulary): what SED's top-2 ratio and CoT decoding's margin are made of."""
    best = torch.topk(logits, min(2, logits.shape[1]), dim=1).values
    second = best[:, 1] if best.shape[1] > 1 else torch.full_like(best[:, 0], -math.inf)
    return best[:, 0], second
