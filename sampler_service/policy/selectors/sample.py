"""Seeded sampling from the processed distribution."""
from __future__ import annotations

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.noise import uniform_noise
from sampler_service.policy.processors.base import RowBatch, Selector

#: The token-id coordinate of the one uniform a row draws per step.
ROW_UNIFORM_TOKEN = -1


class Sample(Selector):
    """Draws a token from softmax(l) by inverting its CDF with one uniform per row.

    Tokens are taken in token-id order; with w_i = exp(l_i − max l) and U a counter-based hash
    of (seed, position), the token is the first i with Σ_{j≤i} w_j > U · Σ_j w_j. The draw
    depends only on the row itself (not its batch mates, not the process), and a truncated
    batch gives the same token as a dense one: masked tokens add exact zeros to the sums.
    Rows the temperature processor marked greedy take the argmax. Peer: vLLM's random
    sampling (same law; vLLM draws exponential noise from torch generators). Selects; keeps no
    state besides the seed.
    """

    key = "sample"

    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        greedy = batch.greedy
        if bool(greedy.all()):
            return candidates.argmax()
        values, ids = candidates.values, candidates.ids
        if ids is not None:  # token-id order, as in the dense batch
            ids, order = torch.sort(ids, dim=1)
            values = values.gather(1, order)
        weights = values.clone().sub_(values.amax(dim=1, keepdim=True)).exp_()
        cumulative = weights.cumsum(dim=1)
        total = cumulative[:, -1:]
        u = uniform_noise(batch.seeds, batch.positions,
                          torch.full_like(total, ROW_UNIFORM_TOKEN, dtype=torch.int64))
        target = torch.minimum((u * total).to(cumulative.dtype),
                               torch.nextafter(total, torch.zeros_like(total)))
        column = torch.searchsorted(cumulative, target, right=True)
        drawn = (column if ids is None else ids.gather(1, column)).squeeze(1)
        return torch.where(greedy, candidates.argmax(), drawn) if bool(greedy.any()) else drawn

    def distribution(self, candidates: Candidates, batch: RowBatch) -> Candidates:
        dist = candidates.log_softmax()
        if bool(batch.greedy.any()):
            point = candidates.one_hot(candidates.argmax())
            dist.values = torch.where(batch.greedy.unsqueeze(1), point.values, dist.values)
        return dist
