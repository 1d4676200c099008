"""The `sample` selector draws from softmax of the processed logits; the noise it uses is a
deterministic uniform in (0, 1); greedy takes the argmax with ties to the lowest id."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.noise import seed_to_int64, uniform_noise
from sampler_service.policy.processors import RowBatch, Temperature, TopK
from sampler_service.policy.selectors.greedy import Greedy
from sampler_service.policy.selectors.sample import Sample
from sampler_service.policy.spec import resolve_flat
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
INF = math.inf
DRAWS = 20000


def fake_rows(positions, seeds) -> RowBatch:
    """A RowBatch over stand-ins: the selectors read only each row's position and seed."""
    return RowBatch([SimpleNamespace(position=p, seed=s) for p, s in zip(positions, seeds)], CPU)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def assert_matches(freq: torch.Tensor, probs: torch.Tensor):
    probs = probs.double()
    cosine = float(torch.dot(freq, probs) / (freq.norm() * probs.norm()))
    assert cosine > 0.99
    assert float((freq - probs).abs().max()) < 0.02  # > 5 standard errors at 20000 draws
    assert bool((freq[probs == 0] == 0).all())  # nothing outside the kept set


LOGITS = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0, 1.0, -INF, 0.7])


def test_sample_over_positions_matches_softmax_dense():
    batch = fake_rows(range(DRAWS), [7] * DRAWS)
    tokens = Sample().select(Candidates(LOGITS.expand(DRAWS, -1).clone()), {}, batch)
    assert_matches(frequencies(tokens, 8), torch.softmax(LOGITS, dim=0))


def test_sample_over_positions_after_temperature_and_top_k_sparse():
    """Temperature 0.5 and top-k 4 on every row: the batch turns sparse before the draw."""
    batch = fake_rows(range(DRAWS), [123] * DRAWS)
    candidates = Candidates(LOGITS.expand(DRAWS, -1).clone())
    Temperature().apply(candidates, {"temperature": torch.full((DRAWS,), 0.5)}, batch)
    TopK().apply(candidates, {"k": torch.full((DRAWS,), 4, dtype=torch.int64)}, batch)
    assert not candidates.dense
    tokens = Sample().select(candidates, {}, batch)
    expected = torch.full((8,), -INF)
    for i in (1, 3, 5, 7):  # the four best: 2.0, 1.5, 1.0, 0.7
        expected[i] = LOGITS[i] / 0.5
    assert_matches(frequencies(tokens, 8), torch.softmax(expected, dim=0))
    assert set(tokens.unique().tolist()) == {1, 3, 5, 7}


def test_sample_over_seeds_through_engine_matches_processed_distribution():
    """20000 sequences at position 0 with seeds 0..N-1, through the flat chain."""
    policy = resolve_flat({"temperature": 0.7, "top_p": 0.8, "min_p": 0.05,
                           "repetition_penalty": 1.3})
    states = [SequenceState(f"s{i}", policy, (1, 3), i, frozenset()) for i in range(DRAWS)]
    engine = Engine(CPU)
    logprobs = engine.distribution(states[0], LOGITS.clone())
    kept = set(torch.nonzero(torch.isfinite(logprobs)).flatten().tolist())
    assert 1 < len(kept) < 7  # top-p truncated, but not to one token
    outcomes = engine.step(states, LOGITS.expand(DRAWS, -1).contiguous())
    tokens = torch.tensor([o.token_id for o in outcomes])
    assert_matches(frequencies(tokens, 8), torch.exp(logprobs))
    assert set(tokens.unique().tolist()) == kept


def test_sample_same_seed_and_position_same_token():
    candidates = Candidates(torch.zeros(6, 50))
    batch = fake_rows([3, 3, 4, 3, 3, 3], [9, 9, 9, 10, 2 ** 64 - 1, -1 & (2 ** 64 - 1)])
    tokens = Sample().select(candidates, {}, batch).tolist()
    assert tokens[0] == tokens[1]
    assert tokens[4] == tokens[5]  # the same uint64 seed


def test_sample_single_candidate_always_drawn():
    logits = torch.full((1000, 6), -INF)
    logits[:, 4] = 3.0
    tokens = Sample().select(Candidates(logits), {}, fake_rows(range(1000), [5] * 1000))
    assert bool((tokens == 4).all())


def test_sample_never_draws_masked_tokens_on_peaked_rows():
    """One tiny kept probability beside masked ones: masked columns add exact zeros."""
    logits = torch.tensor([-INF, 0.0, -INF, -20.0, -INF])
    tokens = Sample().select(Candidates(logits.expand(DRAWS, -1).clone()), {},
                             fake_rows(range(DRAWS), [1] * DRAWS))
    assert set(tokens.unique().tolist()) <= {1, 3}


def test_sample_respects_greedy_rows():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5]] * 4)
    batch = fake_rows(range(4), [0] * 4)
    batch.greedy = torch.tensor([True, False, True, False])
    tokens = Sample().select(Candidates(logits.clone()), {}, batch)
    assert tokens[0].item() == 1 and tokens[2].item() == 1
    dist = Sample().distribution(Candidates(logits.clone()), {}, batch)
    assert torch.equal(dist.values[0], torch.tensor([-INF, 0.0, -INF, -INF]))
    assert torch.allclose(dist.values[1], torch.log_softmax(logits[1], dim=0))


# -- noise ------------------------------------------------------------------------------------
def test_uniform_noise_in_open_unit_interval_and_deterministic():
    seeds = torch.tensor([0, 1, -1, 2 ** 62, -(2 ** 63)], dtype=torch.int64).repeat_interleave(2000)
    positions = torch.arange(seeds.numel(), dtype=torch.int64) % 1000
    ids = torch.arange(-1, 19, dtype=torch.int64).expand(seeds.numel(), -1)
    u = uniform_noise(seeds, positions, ids)
    assert u.dtype == torch.float64 and u.shape == ids.shape
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert torch.equal(u, uniform_noise(seeds.clone(), positions.clone(), ids.clone()))
    # Roughly uniform: 200000 values in 10 bins, each within 0.003 of 0.1 (4.5 std errors).
    hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.003
    assert abs(float(u.mean()) - 0.5) < 0.005


def test_uniform_noise_depends_on_each_counter():
    one = torch.tensor([5], dtype=torch.int64)
    base = uniform_noise(one, one, torch.tensor([[3]]))
    assert not torch.equal(base, uniform_noise(one + 1, one, torch.tensor([[3]])))
    assert not torch.equal(base, uniform_noise(one, one + 1, torch.tensor([[3]])))
    assert not torch.equal(base, uniform_noise(one, one, torch.tensor([[4]])))
    # A row's uniforms do not depend on the other rows.
    batch = uniform_noise(torch.tensor([9, 5]), torch.tensor([1, 5]), torch.tensor([[0], [3]]))
    assert torch.equal(batch[1], base[0])


def test_uniform_noise_many_seeds_stay_inside():
    seeds = torch.arange(-50000, 50000, dtype=torch.int64)
    u = uniform_noise(seeds, torch.zeros_like(seeds), torch.full((seeds.numel(), 1), -1))
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0


#: A valid uint64 request seed whose row uniform at position 0 hashes to all-ones bits (found by
#: inverting SplitMix64's finaliser), i.e. the largest value the grid can give.
TOP_SEED = 9348864509296190742


def test_uniform_noise_top_of_grid_stays_below_one():
    u = uniform_noise(torch.tensor([seed_to_int64(TOP_SEED)]), torch.tensor([0]),
                      torch.tensor([[-1]]))
    assert float(u) < 1.0


def test_sample_survives_a_uniform_of_one():
    """Whatever the uniform, the draw stays on a kept token (the clamp below the total)."""
    logits = torch.tensor([[0.0, 1.0, -INF, 2.0, -INF, -INF]])
    batch = fake_rows([0], [TOP_SEED])
    assert Sample().select(Candidates(logits.clone()), {}, batch).tolist() == [3]


def test_seed_to_int64_reinterprets_bits():
    assert seed_to_int64(0) == 0
    assert seed_to_int64(2 ** 63 - 1) == 2 ** 63 - 1
    assert seed_to_int64(2 ** 63) == -(2 ** 63)
    assert seed_to_int64(2 ** 64 - 1) == -1


# -- greedy -----------------------------------------------------------------------------------
def test_greedy_ties_go_to_lowest_id_dense_and_sparse():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0] * 5, [-INF, 2.0, -INF, 2.0, 1.0]])
    batch = fake_rows(range(3), [0] * 3)
    assert Greedy().select(Candidates(logits.clone()), {}, batch).tolist() == [1, 0, 1]
    values, ids = Candidates(logits.clone()).best_first(5)  # every token, listed best first
    sparse = Candidates(values, ids, 5)
    assert not sparse.dense
    assert Greedy().select(sparse, {}, batch).tolist() == [1, 0, 1]
    # The sparse batch lists ties in whatever order topk gave: shuffle it to be sure.
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(sparse.ids.shape[1], generator=g).flip(0)
                         for _ in range(3)])
    shuffled = Candidates(sparse.values.gather(1, order), sparse.ids.gather(1, order), 5)
    assert Greedy().select(shuffled, {}, batch).tolist() == [1, 0, 1]


def test_greedy_distribution_is_a_point_mass():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    dist = Greedy().distribution(Candidates(logits), {}, fake_rows([0], [0]))
    assert torch.equal(dist.to_dense()[0], torch.tensor([-INF, 0.0, -INF, -INF]))
    assert dist.ids.tolist() == [[1]]  # one listed entry: no dense pass
    batch = fake_rows([0], [0])
    batch.greedy = torch.tensor([True])  # temperature 0 under `sample`: the same point mass
    assert Sample().distribution(Candidates(logits), {}, batch).ids.tolist() == [[1]]


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_temperature_zero_samples_argmax_through_engine(temperature):
    policy = resolve_flat({"temperature": temperature, "top_k": 3})
    states = [SequenceState(f"s{i}", policy, (), i, frozenset()) for i in range(50)]
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0]).expand(50, -1).contiguous()
    assert {o.token_id for o in Engine(CPU).step(states, logits)} == {1}


def test_uniform_noise_numpy_form_has_the_torch_forms_bits():
    """The CPU's NumPy uint64 form against the torch int64 form (the one CUDA runs)."""
    from sampler_service.policy.noise import uniform_noise, uniform_noise_torch
    generator = torch.Generator().manual_seed(11)
    seeds = torch.randint(-2**63, 2**63 - 1, (40,), dtype=torch.int64, generator=generator)
    seeds[:3] = torch.tensor([0, -1, -2**63])
    positions = torch.randint(0, 2**40, (40,), generator=generator)
    token_ids = torch.randint(-1, 300000, (40, 17), generator=generator)
    assert torch.equal(uniform_noise(seeds, positions, token_ids),
                       uniform_noise_torch(seeds, positions, token_ids))
