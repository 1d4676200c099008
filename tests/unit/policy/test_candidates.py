"""Candidates' fast paths against their references."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampler_service.policy.candidates import first_argmax


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 300), levels=st.integers(1, 5),
       seed=st.integers(0, 2 ** 31))
def test_first_argmax_is_torch_argmax_with_ties(rows, vocab, levels, seed):
    """Few distinct values make many ties: both pick the first maximum; -inf rows included."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (rows, vocab), generator=generator).float()
    values[torch.rand(rows, vocab, generator=generator) < 0.3] = float("-inf")
    assert torch.equal(first_argmax(values), torch.argmax(values, dim=1))
    assert torch.equal(first_argmax(values[:, ::2]), torch.argmax(values[:, ::2], dim=1))
