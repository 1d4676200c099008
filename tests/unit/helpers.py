"""Helpers shared by the unit tests."""
from __future__ import annotations

import torch


def random_logits(seed: int, rows: int = 4, vocab: int = 1000, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] normal logits without ties (so every peer orders them alike)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    for row in logits:
        assert len(torch.unique(row)) == vocab
    return logits
