"""sampler_service.kernels.cpu_divide (temperature's one-pass division) against torch's
division and clamp, bit for bit, and `Candidates.divide` on both of its paths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampler_service.kernels import PARALLEL_MIN_ROWS
from sampler_service.policy.candidates import Candidates

LARGEST = float(torch.finfo(torch.float32).max)


def reference(values: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    return (values / divisor.unsqueeze(1)).clamp_(max=LARGEST)


def test_divide_rows_is_torch_division_and_clamp_bit_for_bit():
    pytest.importorskip("numba")
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    from sampler_service.kernels.cpu_divide import divide_rows

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(seed=st.integers(0, 2 ** 31),
                      rows=st.sampled_from([1, 3, PARALLEL_MIN_ROWS + 2]),
                      vocab=st.integers(1, 2000),
                      scale=st.sampled_from([1e-30, 1.0, 30.0, 1e30, 3e38]),
                      masked=st.sampled_from([0.0, 0.3, 1.0]),
                      divisor=st.sampled_from([1e-5, 0.1, 0.7, 1.0, 1.3, 3.0, 1e4]),
                      threads=st.sampled_from([1, 2, 4]), in_place=st.booleans())
    def check(seed, rows, vocab, scale, masked, divisor, threads, in_place):
        generator = torch.Generator().manual_seed(seed)
        values = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
                  * scale).clamp(-LARGEST, LARGEST).float()
        values[torch.rand(rows, vocab, generator=generator) < masked] = -math.inf
        divisors = (divisor * torch.exp(torch.randn(rows, generator=generator) * 0.1)).float()
        expected = reference(values, divisors)
        out = values.clone() if in_place else torch.empty_like(values)
        divide_rows(out.numpy() if in_place else values.numpy(), divisors.numpy(),
                    None if in_place else out.numpy(), threads)
        assert torch.equal(out, expected)

    check()


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_candidates_divide_takes_the_kernel_and_keeps_shared_values(shared, contiguous):
    pytest.importorskip("numba")
    generator = torch.Generator().manual_seed(1)
    raw = torch.randn(PARALLEL_MIN_ROWS + 1, 3001, generator=generator) * 40
    raw[0, 5] = LARGEST / 2  # divided by T < 1: saturates instead of +inf
    raw[1, :7] = -math.inf
    values = raw if contiguous else raw.t().contiguous().t()
    before = values.clone()
    divisor = torch.linspace(0.3, 2.0, values.shape[0])
    candidates = Candidates(values, shared=shared)
    candidates.divide(divisor)
    assert torch.equal(candidates.values, reference(before, divisor))
    assert candidates.values[0, 5] == LARGEST
    if shared:  # never written; owned contiguous values are divided in place
        assert torch.equal(values, before)
    elif contiguous:
        assert candidates.values is values
    assert candidates.writable() is candidates.values  # owned now
    sparse = Candidates(before[:, :50].clone(), torch.arange(50).expand(values.shape[0], -1), 3001)
    sparse.divide(divisor)
    assert torch.equal(sparse.values, reference(before[:, :50], divisor))
    assert np.isfinite(candidates.values[0].numpy()).all()
