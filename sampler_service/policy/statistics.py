"""Entropy and varentropy of whole rows of logits, in a few cache-friendly passes.

Used by the engine for every choice's statistics and by the adaptive processors (EDT,
entropix, ...) that read the raw distribution's uncertainty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RawStatistics:
    """Per-row statistics of the raw distribution p = softmax(l), [R] float32 each."""

    log_normalizer: torch.Tensor  # log Σ exp l
    entropy: torch.Tensor         # H = −Σ p log p
    varentropy: torch.Tensor      # V = Σ p (log p + H)²


#: Rows per block of `raw_statistics`: about 2 MB of float32 per temporary, so the
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


def raw_statistics(logits: torch.Tensor) -> RawStatistics:
    """With z = l − max l, w = exp z and s = Σ w: log p = z − log s, so H = log s − Σ w z / s
    and V = Σ w z² / s − (Σ w z / s)². Sums are torch's pairwise sums (error ~1e-6 nats on
    128k-token rows); rows are processed in cache-sized blocks."""
    block = max(1, STATISTICS_BLOCK_ELEMENTS // logits.shape[1])
    parts = [_block_statistics(logits[i:i + block]) for i in range(0, logits.shape[0], block)]
    normalizer, entropy, varentropy = (torch.cat(column) for column in zip(*parts))
    return RawStatistics(log_normalizer=normalizer, entropy=entropy, varentropy=varentropy)


def top_two_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest and second largest logit, [R] each (−inf as the second of a
    one-token vocabulary): what SED's top-2 ratio and CoT decoding's margin are made of."""
    best = torch.topk(logits, min(2, logits.shape[1]), dim=1).values
    second = best[:, 1] if best.shape[1] > 1 else torch.full_like(best[:, 0], -math.inf)
    return best[:, 0], second
