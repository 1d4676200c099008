"""sampler_service.kernels.cpu_top_k (each row's k best in one pass), directly and through
`Candidates.best_first`, against `torch.topk`."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampler_service.kernels import PARALLEL_MIN_ROWS
from sampler_service.policy import candidates as candidates_module
from sampler_service.policy.candidates import Candidates


def rows_with(seed: int, rows: int, vocab: int, levels: int, masked: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randint(0, levels, (rows, vocab), generator=generator).float() if levels
              else torch.randn(rows, vocab, generator=generator) * 3)
    logits[torch.rand(rows, vocab, generator=generator) < masked] = -math.inf
    logits[:, 0] = torch.randn(rows, generator=generator)  # a finite value in every row
    return logits


def test_k_best_equal_torch_topk_on_random_rows():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    from sampler_service.kernels.cpu_top_k import top_k_entries

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(seed=st.integers(0, 2**31), rows=st.sampled_from([1, 3, PARALLEL_MIN_ROWS + 3]),
                      vocab=st.integers(1, 2000), k=st.integers(1, 300),
                      levels=st.sampled_from([0, 0, 5, 50]), masked=st.sampled_from([0.0, 0.5, 0.99]))
    def check(seed, rows, vocab, k, levels, masked):
        logits = rows_with(seed, rows, vocab, levels, masked)
        k = min(k, vocab)
        values, columns = top_k_entries(logits.numpy(), k, 2)
        expected = torch.topk(logits, k, dim=1).values
        assert np.array_equal(values, expected.numpy())  # the same multiset, best first
        assert np.array_equal(np.take_along_axis(logits.numpy(), columns, axis=1), values)
        for row in columns:  # distinct columns, equal values ordered by column
            assert len(set(row.tolist())) == k
        same = values[:, 1:] == values[:, :-1]
        assert np.all(columns[:, 1:][same] > columns[:, :-1][same])

    check()


def test_ties_at_the_kth_value_keep_the_lowest_columns():
    from sampler_service.kernels.cpu_top_k import top_k_entries
    logits = np.array([[1.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0]], dtype=np.float32)
    values, columns = top_k_entries(logits, 4, 1)
    assert values.tolist() == [[5.0, 5.0, 3.0, 3.0]] and columns.tolist() == [[1, 3, 2, 4]]


def test_best_first_takes_the_kernel_up_to_its_width_and_topk_beyond(monkeypatch):
    from sampler_service.kernels import cpu_top_k
    calls = []
    real = cpu_top_k.top_k_entries
    monkeypatch.setattr(cpu_top_k, "top_k_entries", lambda *a: calls.append(a[1]) or real(*a))
    logits = rows_with(3, 4, 5000, 0, 0.1)
    for width in (1, 41, candidates_module.KERNEL_TOP_K, candidates_module.KERNEL_TOP_K + 1):
        values, ids = Candidates(logits).best_first(width)
        assert torch.equal(values, torch.topk(logits, width, dim=1).values)
        assert torch.equal(logits.gather(1, ids), values)
    assert calls == [1, 41, candidates_module.KERNEL_TOP_K]
    Candidates(logits.double()).best_first(5)  # not float32: torch
    assert len(calls) == 3


def test_a_rows_k_best_do_not_depend_on_its_batch():
    from sampler_service.kernels.cpu_top_k import top_k_entries
    logits = rows_with(8, PARALLEL_MIN_ROWS + 4, 3000, 0, 0.0).numpy()
    values, columns = top_k_entries(logits, 50, 2)
    alone = top_k_entries(logits[5:6], 50, 2)
    assert np.array_equal(alone[0][0], values[5]) and np.array_equal(alone[1][0], columns[5])
