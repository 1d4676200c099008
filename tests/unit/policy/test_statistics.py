"""sampler_service.policy.statistics: the row subsets, joins and top entries of RawStatistics
that validation hands to the engine."""
from __future__ import annotations

import pytest


def test_span_select_joined_and_with_top_agree_with_computing_again():
    torch = pytest.importorskip("torch")
    from sampler_service.policy.statistics import RawStatistics, raw_statistics
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    whole = raw_statistics(logits)

    def same(a: RawStatistics, b: RawStatistics) -> None:
        for name in ("log_normalizer", "entropy", "varentropy", "best_id", "top_values",
                     "top_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name

    same(whole.span(2, 5), raw_statistics(logits[2:5]))
    assert whole.span(0, 6) is whole
    same(whole.select(torch.tensor([4, 0])), raw_statistics(logits[[4, 0]]))
    same(RawStatistics.joined([whole.span(0, 2), whole.span(4, 6)]),
         raw_statistics(logits[[0, 1, 4, 5]]))
    same(whole.with_top(logits, 7), raw_statistics(logits, 7))
    joined = RawStatistics.joined([whole, RawStatistics(whole.log_normalizer, whole.entropy,
                                                        whole.varentropy)])
    assert joined.best_id is None and joined.log_normalizer.shape == (12,)
