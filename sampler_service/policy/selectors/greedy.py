"""Greedy selection."""
from __future__ import annotations

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors.base import RowBatch, Selector
from sampler_service.policy.sparse import TailBound


class Greedy(Selector):
    """Takes the most likely token: argmax of the processed logits, ties to the lowest id.

    Peer: Hugging Face `generate(do_sample=False)`, vLLM temperature 0. Selects; no state.
    Sparse rows: exact when the best candidate is above the tail's max bound (a tie is refused:
    it could go to a lower tail id), or the tail is excluded.
    """

    key = "greedy"
    reads_only_argmax = True

    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        known = batch.raw_argmax()
        return candidates.argmax() if known is None else known

    def distribution(self, candidates: Candidates, args: dict[str, torch.Tensor],
                     batch: RowBatch) -> Candidates:
        return candidates.one_hot(candidates.argmax())

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The argmax is the whole row's when no tail token can reach it; its processed
        distribution is then the same point mass."""
        tail.refuse_unless_best_above(candidates.max_values(), torch.ones_like(batch.greedy),
                                      self.key)
        return True
