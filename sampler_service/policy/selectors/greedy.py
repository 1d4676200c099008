"""Greedy selection."""
from __future__ import annotations

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors.base import RowBatch, Selector


class Greedy(Selector):
    """Takes the most likely token: argmax of the processed logits, ties to the lowest id.

    Peer: Hugging Face `generate(do_sample=False)`, vLLM temperature 0. Selects; no state.
    """

    key = "greedy"

    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        return candidates.argmax()

    def distribution(self, candidates: Candidates, args: dict[str, torch.Tensor],
                     batch: RowBatch) -> Candidates:
        return candidates.one_hot(candidates.argmax())
