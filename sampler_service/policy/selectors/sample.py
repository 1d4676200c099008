"""Seeded sampling from the processed distribution."""
from __future__ import annotations

import torch

from sampler_service.policy.noise import gumbel_noise
from sampler_service.policy.processors.base import RowBatch, Selector
from sampler_service.policy.selectors.greedy import argmax_lowest_id, one_hot_log_distribution

#: Rows with at most this many surviving tokens draw noise only for their survivors.
SPARSE_SURVIVORS = 4096


class Sample(Selector):
    """Draws a token from softmax(l) with the Gumbel-max trick: argmax_i (l_i + G_i).

    G_i = −log(−log U_i), with U_i a counter-based hash of (seed, position, token id), so the
    draw depends only on the row itself: the same seed gives the same token whatever the batch
    and after a restart. Noise is drawn only for surviving tokens when a truncation left few
    (≤ 4096), otherwise over the whole vocabulary. Rows the temperature processor marked greedy
    take the argmax. Peer: vLLM's `random` sampling (exponential race, equivalent in law).
    Selects; keeps no state besides the seed.
    """

    key = "sample"

    def select(self, logits: torch.Tensor, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        tokens = argmax_lowest_id(logits)
        stochastic = ~batch.greedy
        if not bool(stochastic.any()):
            return tokens
        survivors = torch.isfinite(logits).sum(dim=1)
        for rows in ((stochastic & (survivors <= SPARSE_SURVIVORS)).nonzero().squeeze(1),
                     (stochastic & (survivors > SPARSE_SURVIVORS)).nonzero().squeeze(1)):
            if rows.numel():
                tokens[rows] = self._draw(logits.index_select(0, rows), rows, survivors, batch)
        return tokens

    @staticmethod
    def _draw(logits: torch.Tensor, rows: torch.Tensor, survivors: torch.Tensor,
              batch: RowBatch) -> torch.Tensor:
        width = int(survivors.index_select(0, rows).max())
        if width < logits.shape[1]:
            values, ids = torch.topk(logits, width)
        else:
            values = logits
            ids = torch.arange(logits.shape[1], device=logits.device).expand_as(logits)
        noise = gumbel_noise(batch.seeds.index_select(0, rows),
                             batch.positions.index_select(0, rows), ids)
        winner = torch.argmax(values.to(torch.float64) + noise, dim=1, keepdim=True)
        return ids.gather(1, winner).squeeze(1)

    def distribution(self, logits: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        greedy = batch.greedy.unsqueeze(1)
        if not bool(greedy.any()):
            return log_probs
        return torch.where(greedy, one_hot_log_distribution(logits, argmax_lowest_id(logits)),
                           log_probs)
