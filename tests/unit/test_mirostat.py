"""The `mirostat` selector (v1 and v2, llama.cpp's semantics): hand-computed truncations, the
mu update, mu carried across steps the way the service carries it, statistics of the draws,
batch-vs-single and dense-vs-sparse equivalence, and the adaptive property."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import RowBatch, TopK
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.selectors import SELECTORS
from sampler_service.policy.selectors.mirostat import MEMORY_KEY, Mirostat
from sampler_service.policy.selectors.sample import Sample
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
INF = math.inf
LN2 = math.log(2.0)
DRAWS = 20000


def policy(chain=(), **select):
    spec = parse_policy("miro", {"chain": list(chain), "select": {"mirostat": select}})
    return resolve(spec, PolicyVersion(1, "x"), {})


def state(pol, seed=0, mu=None, name="s", output=()) -> SequenceState:
    s = SequenceState(name, pol, (), seed, frozenset(), list(output))
    if mu is not None:
        s.processor_state[MEMORY_KEY] = mu
    return s


def accept(states, outcomes):
    """What `SamplerCore._accept` does with an outcome (service.py)."""
    for s, o in zip(states, outcomes):
        s.processor_state.update(o.memory)
        s.accept(o.token_id, o.entropy, o.varentropy)


def dist(s: SequenceState, logits) -> torch.Tensor:
    """q [V]: the distribution the selector draws from for `s` (Preview's path)."""
    return torch.exp(Engine(CPU).distribution(s, torch.as_tensor(logits, dtype=torch.float32)))


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row > 0).flatten().tolist())


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def llama_v1_kept(logits: list[float], mu: float, m: int) -> set[int]:
    """Scalar re-statement of llama.cpp's `llama_sampler_mirostat_apply` truncation (float64),
    over the finite candidates, ties to the lowest id."""
    order = sorted((i for i, l in enumerate(logits) if l > -INF), key=lambda i: (-logits[i], i))
    top = max(logits[i] for i in order)
    weights = [math.exp(logits[i] - top) for i in order]
    p = [w / sum(weights) for w in weights]
    num = den = 0.0
    for i in range(min(m - 1, len(p) - 1)):
        t_i = math.log((i + 2) / (i + 1))
        num += t_i * math.log(p[i] / p[i + 1])
        den += t_i * t_i
    if den == 0:
        return {order[0]}
    s_hat = num / den
    eps = s_hat - 1
    k = (eps * 2 ** mu / (1 - len(logits) ** -eps)) ** (1 / s_hat)
    return set(order[:min(max(int(k), 1), len(order))])


# -- the spec ---------------------------------------------------------------------------------
def test_registered_with_defaults():
    assert SELECTORS["mirostat"] is Mirostat
    values = policy().selector.values
    assert dict(values) == {"version": 2, "tau": 5.0, "eta": 0.1, "m": 100}


@pytest.mark.parametrize("given, field", [({"version": 3}, "version"), ({"version": 0}, "version"),
                                          ({"tau": "5"}, "tau"), ({"eta": None}, "eta"),
                                          ({"m": 1}, "m"), ({"mu": 3.0}, "mu")])
def test_bad_parameters_name_the_field(given, field):
    with pytest.raises(InvalidArgument) as error:
        policy(**given)
    assert error.value.field == f"spec.select.mirostat.{field}"


# -- v2 by hand -------------------------------------------------------------------------------
#: p = 1/2, 1/4, 1/8, 1/16, 1/16 on ids 2, 0, 4, 1, 3: surprises 1, 2, 3, 4, 4 bits.
V2_LOGITS = torch.log(t([0.25, 0.0625, 0.5, 0.0625, 0.125]))


@pytest.mark.parametrize("mu, expected", [
    (3.5, {2: 4 / 7, 0: 2 / 7, 4: 1 / 7}),
    (1.5, {2: 1.0}),
    (0.5, {2: 1.0}),   # nothing has surprise <= mu: the best token stays
    (4.5, {2: 0.5, 0: 0.25, 4: 0.125, 1: 0.0625, 3: 0.0625}),
])
def test_v2_keeps_tokens_with_surprise_at_most_mu(mu, expected):
    q = dist(state(policy(version=2), mu=mu), V2_LOGITS)
    assert kept(q) == set(expected)
    for token, prob in expected.items():
        assert float(q[token]) == pytest.approx(prob, rel=1e-6)


def test_v2_mu_starts_at_twice_tau():
    # tau 1.75: mu = 3.5 keeps three tokens; tau 2.25: mu = 4.5 keeps all five.
    assert kept(dist(state(policy(version=2, tau=1.75)), V2_LOGITS)) == {0, 2, 4}
    assert kept(dist(state(policy(version=2, tau=2.25)), V2_LOGITS)) == {0, 1, 2, 3, 4}


# -- v1 by hand -------------------------------------------------------------------------------
#: Zipf with exponent 2 over 8 tokens (p_i ∝ 1/i², ids shuffled): the slope estimate is s = 2,
#: eps = 1, and k = (2^mu / (1 − 8^−1))^(1/2) = sqrt(2^mu · 8/7).
ZIPF_IDS = [5, 2, 7, 0, 3, 6, 1, 4]  # best first
ZIPF_LOGITS = torch.empty(8)
for rank, token in enumerate(ZIPF_IDS):
    ZIPF_LOGITS[token] = -2.0 * math.log(rank + 1)


@pytest.mark.parametrize("mu, k", [(2.0, 2), (4.0, 4), (6.0, 8), (10.0, 8), (-3.0, 1)])
def test_v1_zipf_top_k_from_mu(mu, k):
    assert min(max(math.floor(math.sqrt(2 ** mu * 8 / 7)), 1), 8) == k
    q = dist(state(policy(version=1), mu=mu), ZIPF_LOGITS)
    assert kept(q) == set(ZIPF_IDS[:k])
    p = torch.softmax(ZIPF_LOGITS, dim=0)[ZIPF_IDS[:k]]
    assert torch.allclose(q[ZIPF_IDS[:k]], p / p.sum(), rtol=1e-6)


def test_v1_uses_only_the_m_best_tokens_for_the_slope():
    """The three best follow exponent 2, then twelve tied tokens: m = 3 sees s = 2, so at
    mu = 6, k = (2^6 / (1 − 1/15))^(1/2) = 8.28; m = 100 sees a flatter slope and keeps 11.
    Ties at the k-th value go to the lowest ids."""
    logits = torch.tensor([0.0, -2 * math.log(2), -2 * math.log(3)] + [-2 * math.log(4)] * 12)
    assert kept(dist(state(policy(version=1, m=3), mu=6.0), logits)) == set(range(8))
    wide = kept(dist(state(policy(version=1, m=100), mu=6.0), logits))
    assert wide == llama_v1_kept(logits.tolist(), 6.0, 100) == set(range(11))


@pytest.mark.parametrize("chain, tail", [([], []), ([{"top_k": {"k": 8}}], [-5.0, -6.0])])
def test_v1_ties_at_the_kth_value_go_to_the_lowest_ids(chain, tail):
    """The best token, then seven tied: k = 3 keeps the best and the two lowest ids of the tie.
    With a top_k first the batch is sparse (two more tokens in the vocabulary, cut by top_k)."""
    logits = t([-1.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0] + tail)
    vocab = len(logits)
    # b_0 = 1 and b_i = 0 after it: s = ln 2 / Σ t_i²; choose mu so that k = 3.5.
    s = math.log(2) / sum(math.log((i + 2) / (i + 1)) ** 2 for i in range(7))
    eps = s - 1
    mu = math.log2(3.5 ** s * (1 - vocab ** -eps) / eps)
    assert int((eps * 2 ** mu / (1 - vocab ** -eps)) ** (1 / s)) == 3
    assert kept(dist(state(policy(chain, version=1), mu=mu), logits)) == {1, 0, 2}


@pytest.mark.parametrize("seed", range(6))
def test_v1_matches_the_scalar_llama_cpp_statement_on_random_rows(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(60, generator=g) * 2.5
    logits[torch.randperm(60, generator=g)[:7]] = -INF
    for mu in (1.0, 3.0, 5.5, 8.0):
        for m in (2, 5, 100):
            q = dist(state(policy(version=1, m=m), mu=mu), logits)
            assert kept(q) == llama_v1_kept(logits.tolist(), mu, m), (mu, m)


# -- edge cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_single_candidate_is_always_chosen_and_its_surprise_is_zero(version):
    logits = t([-INF, -INF, 1.5, -INF])
    states = [state(policy(version=version, tau=3.0, eta=0.5), seed=i) for i in range(50)]
    outcomes = Engine(CPU).step(states, logits.expand(50, -1).clone())
    assert {o.token_id for o in outcomes} == {2}
    assert [o.memory[MEMORY_KEY] for o in outcomes] == [6.0 + 0.5 * 3.0] * 50  # S = 0


def test_all_equal_logits():
    """v2: every surprise is log2(8) = 3 bits, kept when mu ≥ 3, else the lowest id alone.
    v1: the slope is 0, k = (2^mu / 7)^∞ saturates to every candidate (llama.cpp: undefined)."""
    logits = torch.zeros(8)
    assert kept(dist(state(policy(version=2), mu=3.5), logits)) == set(range(8))
    assert kept(dist(state(policy(version=2), mu=2.5), logits)) == {0}
    assert kept(dist(state(policy(version=1), mu=10.0), logits)) == set(range(8))
    assert kept(dist(state(policy(version=1), mu=2.0), logits)) == {0}  # (4/7)^∞ = 0 -> k = 1


def test_no_truncation_draws_the_same_token_as_sample():
    """A mu that keeps everything: the draw is the `sample` selector's, token for token."""
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(3))
    logits[:, 5] = -INF
    states = [state(policy(version=2), seed=100 + i, mu=1e6, output=[1] * (i % 5))
              for i in range(64)]
    batch = RowBatch(states, CPU)
    args = Engine(CPU)._stage_args(Mirostat(), [s.policy.selector for s in states])
    ours = Mirostat().select(Candidates(logits.clone()), args, batch)
    theirs = Sample().select(Candidates(logits.clone()), {}, RowBatch(states, CPU))
    assert torch.equal(ours, theirs)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(4)) * 1.5

    def run(seed, version):
        s = state(policy(version=version, tau=3.0), seed=seed)
        for _ in range(20):
            accept([s], Engine(CPU).step([s], logits.clone()))
        return s.output_ids, s.processor_state[MEMORY_KEY]

    for version in (1, 2):
        assert run(7, version) == run(7, version)
        assert run(7, version)[0] != run(8, version)[0]


# -- the mu update ----------------------------------------------------------------------------
def test_mu_update_after_one_step_equals_the_formula():
    """v2, tau 1.75 (mu = 3.5): the draw is from q = 4/7, 2/7, 1/7 on ids 2, 0, 4."""
    q = {2: 4 / 7, 0: 2 / 7, 4: 1 / 7}
    states = [state(policy(version=2, tau=1.75, eta=0.3), seed=i, name=f"s{i}") for i in range(40)]
    outcomes = Engine(CPU).step(states, V2_LOGITS.expand(40, -1).clone(), processed_logprobs=True)
    assert {o.token_id for o in outcomes} == set(q)  # 40 draws reach all three
    for o in outcomes:
        surprise = -math.log2(q[o.token_id])
        assert o.memory[MEMORY_KEY] == pytest.approx(3.5 - 0.3 * (surprise - 1.75), rel=1e-6)
        assert o.processed_logprob == pytest.approx(math.log(q[o.token_id]), rel=1e-5)


def test_engine_changes_no_state_and_a_retry_gets_the_same_answer():
    s = state(policy(version=1, tau=2.0), seed=9, mu=4.0)
    logits = ZIPF_LOGITS.unsqueeze(0)
    first = Engine(CPU).step([s], logits.clone())[0]
    again = Engine(CPU).step([s], logits.clone())[0]
    assert s.processor_state == {MEMORY_KEY: 4.0} and s.output_ids == []
    assert (first.token_id, first.memory) == (again.token_id, again.memory)
    assert first.memory[MEMORY_KEY] != 4.0


@pytest.mark.parametrize("version", [1, 2])
def test_mu_is_carried_across_steps_through_the_sequence_state(version):
    tau, eta = 2.5, 0.2
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(7)) * 2
    s = state(policy(version=version, tau=tau, eta=eta), seed=5)
    engine, mu, distinct = Engine(CPU), 2 * tau, set()
    for _ in range(40):
        q = dist(s, logits[0])
        if version == 2:  # the cut is at the mu the state holds now
            surprise = -torch.log2(torch.softmax(logits[0], dim=0))
            assert kept(q) == set(torch.nonzero(surprise <= mu).flatten().tolist())
        else:
            assert kept(q) == llama_v1_kept(logits[0].tolist(), mu, 100)
        distinct.add(len(kept(q)))
        outcome = engine.step([s], logits.clone(), processed_logprobs=True)[0]
        expected = mu - eta * (-outcome.processed_logprob / LN2 - tau)
        assert outcome.memory[MEMORY_KEY] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        accept([s], [outcome])
        mu = s.processor_state[MEMORY_KEY]
    assert len(s.output_ids) == 40 and len(distinct) > 1  # the truncation did adapt


def test_greedy_rows_take_the_argmax_and_see_zero_surprise():
    chain = [{"temperature": {"temperature": 0.0}}]
    logits = t([0.1, 2.0, 2.0, -1.0])  # tie: the lowest id
    states = [state(policy(chain, version=v, tau=2.0, eta=0.5), seed=i, name=f"s{i}")
              for i, v in enumerate((1, 2, 1, 2))]
    outcomes = Engine(CPU).step(states, logits.expand(4, -1).clone(), processed_logprobs=True)
    assert [o.token_id for o in outcomes] == [1] * 4
    assert [o.memory[MEMORY_KEY] for o in outcomes] == [5.0] * 4  # 4 − 0.5·(0 − 2)
    assert [o.processed_logprob for o in outcomes] == [0.0] * 4
    assert kept(dist(states[0], logits)) == {1}


# -- statistics -------------------------------------------------------------------------------
def frequencies(tokens, vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


@pytest.mark.parametrize("version, mu", [(1, 5.0), (2, 4.0)])
def test_draws_follow_the_truncated_distribution(version, mu):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(11)) * 1.5
    pol = policy(version=version)
    states = [state(pol, seed=i, mu=mu, name=f"s{i}") for i in range(DRAWS)]
    q = dist(states[0], logits).double()
    assert 2 < len(kept(q)) < 30
    outcomes = Engine(CPU).step(states, logits.expand(DRAWS, -1).contiguous())
    freq = frequencies([o.token_id for o in outcomes], 40)
    assert float(torch.dot(freq, q) / (freq.norm() * q.norm())) > 0.99
    assert float((freq - q).abs().max()) < 0.02
    assert bool((freq[q == 0] == 0).all())  # never a truncated token


# -- equivalences -----------------------------------------------------------------------------
def mixed_states():
    temp0 = [{"temperature": {"temperature": 0.0}}]
    temp = [{"temperature": {"temperature": 0.9}}]
    specs = [(temp, dict(version=1), None), (temp, dict(version=2), None),
             (temp, dict(version=1, tau=2.0, m=10), 3.1), (temp, dict(version=2, tau=3.0), 1.2),
             (temp0, dict(version=2), None), (temp0, dict(version=1, m=4), 7.0),
             (temp, dict(version=1, tau=8.0, eta=0.0), 20.0),
             (temp, dict(version=2, tau=0.5), None)]
    return [state(policy(chain, **select), seed=40 + i, mu=mu, name=f"s{i}", output=[3] * i)
            for i, (chain, select, mu) in enumerate(specs)]


def test_batch_and_single_rows_choose_alike():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(21)) * 3
    for step in range(3):
        batched = mixed_states()
        together = Engine(CPU).step(batched, logits.clone(), processed_logprobs=True)
        for i, s in enumerate(mixed_states()):
            alone = Engine(CPU).step([s], logits[i:i + 1].clone(), processed_logprobs=True)[0]
            assert alone.token_id == together[i].token_id
            assert alone.memory == together[i].memory
            assert alone.processed_logprob == together[i].processed_logprob
        logits = logits.roll(step + 1, dims=1)


@pytest.mark.parametrize("version", [1, 2])
def test_dense_and_sparse_batches_choose_alike(version):
    """top_k 12 on every row turns the batch sparse; with a row whose k is off beside it the
    same row stays dense."""
    logits = torch.randn(2, 200, generator=torch.Generator().manual_seed(5)) * 2
    on, off = (policy([{"top_k": {"k": k}}], version=version, tau=2.0) for k in (12, 0))
    for seed in range(30):
        sparse = Engine(CPU).step([state(on, seed=seed, mu=3.0)], logits[:1].clone(),
                                  processed_logprobs=True)[0]
        dense = Engine(CPU).step([state(on, seed=seed, mu=3.0), state(off, seed=1, name="t")],
                                 logits.clone(), processed_logprobs=True)[0]
        assert sparse.token_id == dense.token_id
        assert sparse.memory[MEMORY_KEY] == pytest.approx(dense.memory[MEMORY_KEY], abs=1e-6)
        assert sparse.processed_logprob == pytest.approx(dense.processed_logprob, abs=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_selector_on_sparse_and_dense_candidates_directly(version):
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(8)) * 2
    states = [state(policy(version=version, tau=1.5), seed=i, mu=2.0 + i / 4, name=f"s{i}")
              for i in range(16)]
    k = torch.full((16,), 20, dtype=torch.int64)
    sparse = Candidates(logits.clone())
    TopK().apply(sparse, {"k": k}, RowBatch(states, CPU))
    assert not sparse.dense
    dense = Candidates(sparse.to_dense().clone())
    selector, results = Mirostat(), []
    for candidates in (sparse, dense):
        batch = RowBatch(states, CPU)
        args = Engine(CPU)._stage_args(selector, [s.policy.selector for s in states])
        tokens = selector.select(candidates, args, batch)
        results.append((tokens, torch.tensor(batch.pending[MEMORY_KEY]),
                        selector.distribution(candidates, args, batch).to_dense()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert torch.equal(torch.isfinite(results[0][2]), torch.isfinite(results[1][2]))
    assert torch.allclose(results[0][2].exp(), results[1][2].exp(), atol=1e-6)
    sparse_dist = selector.distribution(sparse, args, RowBatch(states, CPU))
    assert not sparse_dist.dense  # best first, as a sparse batch must be
    assert torch.equal(sparse_dist.values, sparse_dist.values.sort(dim=1, descending=True)[0])
    assert 1 < int(torch.isfinite(results[0][2]).sum(dim=1).max()) < 20  # it did truncate


# -- the adaptive property --------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_average_surprise_approaches_tau(version, tau):
    """32 sequences × 250 steps on one fixed distribution (entropy ≈ 6 bits): μ starts at 2τ,
    off target, and the mean observed surprise over the last 150 steps settles at τ. (Summing
    the updates, mean S − τ = (μ_first − μ_last) / (η · steps): it goes to 0 while μ stays
    bounded, which is what the feedback loop does.)"""
    logits = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)) * 1.5
    p = torch.softmax(logits[0], dim=0)
    assert float(-(p * torch.log2(p)).sum()) > tau + 1.5
    states = [state(policy(version=version, tau=tau, eta=0.1), seed=i, name=f"s{i}")
              for i in range(32)]
    engine, surprises = Engine(CPU), []
    for _ in range(250):
        outcomes = engine.step(states, logits.expand(32, -1).clone(), processed_logprobs=True)
        surprises.append([-o.processed_logprob / LN2 for o in outcomes])
        accept(states, outcomes)
    surprises = torch.tensor(surprises)
    assert abs(float(surprises[:5].mean()) - tau) > 0.5  # μ = 2τ is off target at first
    assert float(surprises[100:].mean()) == pytest.approx(tau, abs=0.1)
    mus = torch.tensor([s.processor_state[MEMORY_KEY] for s in states])
    assert float((mus - 2 * tau).abs().min()) > 0.1  # μ moved away from its start


# -- llama.cpp's ranges -----------------------------------------------------------------------
def test_negative_tau_and_eta_are_taken_as_llama_cpp_takes_them():
    """llama.cpp checks neither: τ = -1 starts μ at -2, under every token's surprise, so v2
    keeps the best token alone (llama.cpp's `cur_p->size = 1`); a negative η moves μ by
    −η · (S − τ), away from the target."""
    pol = policy(version=2, tau=-1.0, eta=-0.5)
    assert dict(pol.selector.values) == {"version": 2, "tau": -1.0, "eta": -0.5, "m": 100}
    assert kept(dist(state(pol), V2_LOGITS)) == {2}
    outcome, = Engine(CPU).step([state(pol)], V2_LOGITS.unsqueeze(0).clone())
    assert outcome.token_id == 2
    assert outcome.memory[MEMORY_KEY] == pytest.approx(-2.0 + 0.5 * (0.0 + 1.0))
    v1 = policy(version=1, tau=-3.0)  # μ = -6: k = sqrt(2^-6 · 8/7) < 1 keeps one token
    assert kept(dist(state(v1), ZIPF_LOGITS)) == {ZIPF_IDS[0]}
