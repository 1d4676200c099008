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


# Sequence settings whose chains keep no stage memory (every position runs in one engine
# call), and one whose n-gram index is stage memory (verified position by position).
AT_ONCE = [
    {"params": {"temperature": 0.0}},
    {"params": {"temperature": 1.0, "top_k": 5, "repetition_penalty": 1.3,
                "frequency_penalty": 0.5}},
    {"params": {"temperature": 0.8, "min_p": 0.1, "max_tokens": 3, "stop_token_ids": [2]}},
]
IN_TURN = [{"policy_spec": {"chain": [{"no_repeat_ngram": {"size": 2}}],
                            "select": {"sample": {}}}, "params": {}}]


@pytest.mark.parametrize("settings", AT_ONCE + IN_TURN)
def test_all_positions_at_once_equal_position_by_position(settings):
    """`verify` (one engine call when exact) equals `_verify_in_turn` (the reference) on
    random drafts, draft probabilities, finishing drafts and two verifications in a row."""
    torch = pytest.importorskip("torch")
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from sampler_service import speculative as spec
    from sampler_service.engine import Engine
    from sampler_service.policy.registry import PolicyRegistry
    from sampler_service.service import SamplerCore, SequenceRequest
    from sampler_service.state import SequenceStore
    vocab = 8

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(seed=st.integers(0, 2 ** 31),
                      ks=st.lists(st.integers(0, 4), min_size=1, max_size=3))
    def check(seed, ks):
        g = torch.Generator().manual_seed(seed)
        core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(),
                           Engine(torch.device("cpu")))
        names = [f"s{i}" for i in range(len(ks))]
        core.create_sequences([SequenceRequest(
            name, policy_spec=settings.get("policy_spec"),
            params={**settings["params"], "seed": seed + i}, prompt_ids=(1, 2, 1),
            eos_token_ids=(0,)) for i, name in enumerate(names)])
        for _ in range(2):
            rows = []
            for name, k in zip(names, ks):
                state = core.store.get(name)
                if state.finished:
                    continue
                drafts = torch.randint(vocab, (k,), generator=g).tolist()
                logits = torch.randn(k + 1, vocab, generator=g) * 2
                logits[torch.arange(k), drafts] += 3 * torch.rand(k, generator=g)
                probs = (torch.softmax(torch.randn(k, vocab, generator=g), 1)
                         if k and torch.rand(1, generator=g) < 0.5 else None)
                rows.append(spec.Drafted(state, logits, tuple(drafts), probs))
            if not rows:
                return
            got = spec.verify(core.engine, rows)
            assert got == spec._verify_in_turn(core.engine, rows, False)
            if settings in AT_ONCE:
                assert spec._verify_at_once(core.engine, rows, False) == got
            for row, outcomes in zip(rows, got):
                assert 1 <= len(outcomes) <= len(row.drafts) + 1
                row.state.record_tokens(outcomes, vocab)

    check()
