"""Greedy selection."""
from __future__ import annotations

import math

import torch

from sampler_service.policy.processors.base import RowBatch, Selector


def argmax_lowest_id(logits: torch.Tensor) -> torch.Tensor:
    """Argmax per row; ties go to the lowest token id (torch returns the first maximum)."""
    return torch.argmax(logits, dim=1)


def one_hot_log_distribution(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p with all mass on `tokens`: 0 there, −inf elsewhere."""
    out = torch.full_like(logits, -math.inf)
    return out.scatter_(1, tokens.unsqueeze(1), 0.0)


class Greedy(Selector):
    """Takes the most likely token: argmax of the processed logits, ties to the lowest id.

    Peer: Hugging Face `generate(do_sample=False)`, vLLM temperature 0. Selects; no state.
    """

    key = "greedy"

    def select(self, logits: torch.Tensor, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        return argmax_lowest_id(logits)

    def distribution(self, logits: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        return one_hot_log_distribution(logits, argmax_lowest_id(logits))
