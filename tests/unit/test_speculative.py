"""The acceptance rule against its reference, and the law of the first emitted token."""
from __future__ import annotations

import pytest


def test_residual_draw_matches_reference():
    torch = pytest.importorskip("torch")
    from sampler_service import speculative as spec
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(200, 6, generator=g), 1).double()
    q = torch.softmax(torch.randn(200, 6, generator=g), 1).double()
    u = torch.rand(200, generator=g, dtype=torch.float64)
    drawn = spec.residual_draw(p, q, u).tolist()
    assert drawn == [spec.residual_draw_reference(p[i].tolist(), q[i].tolist(), float(u[i]))
                     for i in range(200)]


# chi-square critical values at p = 0.001 by degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {5: 20.515}


@pytest.mark.parametrize("params, with_probs", [
    ({"temperature": 1.0}, True),
    ({"temperature": 1.0, "repetition_penalty": 1.5, "top_k": 5}, False)])
def test_first_token_follows_the_processed_distribution(params, with_probs):
    """20,000 seeded sequences, one verification each (k = 2): the first emitted token's
    frequencies match the policy's processed distribution p (chi-square at p = 0.001)."""
    torch = pytest.importorskip("torch")
    from sampler_service.engine import Engine
    from sampler_service.policy.registry import PolicyRegistry
    from sampler_service.service import SamplerCore, SequenceRequest, StepRow
    from sampler_service.state import SequenceStore
    from sampler_service.step_logits import StepLogits
    n, vocab = 20_000, 6
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(max_sequences=n + 1)
                       if "max_sequences" in SequenceStore.__init__.__code__.co_varnames
                       else SequenceStore(), Engine(torch.device("cpu")))
    core.create_sequences([SequenceRequest(f"s{i}", params={**params, "seed": i},
                                           prompt_ids=(2, 2)) for i in range(n)])
    row0 = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5])
    logits = torch.stack([row0, torch.zeros(vocab), torch.zeros(vocab)])
    p = torch.exp(core.engine.distribution(core.store.get("s0"), row0)).double()
    q = torch.tensor([[0.05, 0.1, 0.1, 0.05, 0.2, 0.5], [1 / 6] * 6])
    # the drafts must be drawn from q (a point-mass q: any fixed draft)
    x0 = (torch.multinomial(q[0], n, replacement=True, generator=torch.Generator().manual_seed(1))
          if with_probs else torch.full((n,), 5)).tolist()
    rows = [StepRow(f"s{i}", 0, None, (x0[i], 1), q if with_probs else None) for i in range(n)]
    answers = core.step(rows, StepLogits.of_dense(logits.repeat(n, 1)))
    first = torch.tensor([a.record.accepted_token_ids[0] for a in answers])
    counts = torch.bincount(first, minlength=vocab).double()
    support = p > 0
    expected = p * n
    assert counts[~support].sum() == 0
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    df = int(support.sum()) - 1
    crit = CHI2_999.get(df, {4: 18.467, 3: 16.266, 2: 13.816, 1: 10.828}.get(df))
    assert chi2 < crit, (counts.tolist(), expected.tolist())
