"""The truncation family (docs/policies.md, Truncation): `min_keep` on every truncation, typical-p,
epsilon and eta cut-offs, top-nσ, XTC and top-H.

Each processor on tiny hand-computed rows, against Hugging Face's processor (or a line-by-line
transcription of llama.cpp's sampler where HF has none) on random rows, on a dense and a
sparse batch, alone and in a batch with rows whose parameter is off.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import PROCESSORS, RowBatch
from sampler_service.policy.processors.truncation import (EpsilonCutoff, EtaCutoff, MinP,
                                                          TopH, TopK, TopNSigma, TopP,
                                                          TypicalP, Xtc)
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState
from tests.unit.helpers import random_logits

CPU = torch.device("cpu")
INF = math.inf
FLAT = resolve_flat({})
_DTYPES = {"float": torch.float32, "int": torch.int64}


def make_state(seed: int = 0, output=()) -> SequenceState:
    return SequenceState("s", FLAT, (), seed, frozenset(), list(output))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def log(values) -> torch.Tensor:
    return torch.log(t(values))


def tensors(cls, rows: int, given: dict) -> dict[str, torch.Tensor]:
    """Every parameter of `cls` as a [rows] tensor, as the engine builds them: a given scalar
    is repeated, a given list is one value per row, the rest take their defaults."""
    out = {}
    for p in cls.params:
        value = given.get(p.name, p.default)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * rows
        if p.kind not in _DTYPES:  # a choice: one value per row, as a list
            out[p.name] = values
            continue
        out[p.name] = torch.tensor(values, dtype=torch.float64 if p.float64 else _DTYPES[p.kind])
    return out


def apply(cls, candidates: Candidates, batch: RowBatch | None = None, **given) -> Candidates:
    batch = batch or RowBatch([make_state() for _ in range(candidates.rows)], CPU)
    cls().apply(candidates, tensors(cls, candidates.rows, given), batch)
    return candidates


def run(cls, logits, batch: RowBatch | None = None, **given) -> torch.Tensor:
    """`cls` on a dense batch of `logits` ([V] or [R, V]); the processed logits, dense."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    logits = logits.unsqueeze(0) if logits.dim() == 1 else logits
    return apply(cls, Candidates(logits.clone()), batch, **given).to_dense()


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def hf(processor, logits: torch.Tensor) -> torch.Tensor:
    return processor(torch.zeros(logits.shape[0], 1, dtype=torch.int64), logits.clone())


def assert_same(ours: torch.Tensor, theirs: torch.Tensor):
    """Same kept set, and the kept tokens' values unchanged alike."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


# -- min_keep on the existing truncations -------------------------------------------------------
ROW = t([1.0, 4.0, 2.0, 3.0, 0.0, 5.0])  # best first: 5, 1, 3, 2, 0, 4


@pytest.mark.parametrize("k, min_keep, expected", [
    (2, 1, {1, 5}), (2, 3, {1, 3, 5}), (4, 3, {1, 2, 3, 5}), (1, 6, set(range(6))),
])
def test_top_k_keeps_max_of_k_and_min_keep(k, min_keep, expected):
    out = run(TopK, ROW, k=k, min_keep=min_keep)
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], ROW[sorted(expected)])


def test_top_k_min_keep_alone_does_not_turn_it_on():
    candidates = apply(TopK, Candidates(ROW.unsqueeze(0).clone()), k=0, min_keep=3)
    assert candidates.dense and torch.equal(candidates.values[0], ROW)


def test_top_p_min_keep_keeps_more_than_the_nucleus():
    nucleus = log([0.1, 0.5, 0.05, 0.2, 0.15])  # best first: 1, 3, 4, 0, 2
    assert kept(run(TopP, nucleus, p=0.3)[0]) == {1}
    assert kept(run(TopP, nucleus, p=0.3, min_keep=3)[0]) == {1, 3, 4}
    assert kept(run(TopP, nucleus, p=0.6, min_keep=1)[0]) == {1, 3}
    assert kept(run(TopP, nucleus, p=0.9, min_keep=2)[0]) == {0, 1, 3, 4}  # the nucleus wins
    assert kept(run(TopP, nucleus, p=0.3, min_keep=9)[0]) == set(range(5))


def test_min_p_min_keep():
    row = t([3.0, 1.0, 0.0, 2.5, -1.0])  # p / p_max: 1, 0.135, 0.050, 0.607, 0.018
    assert kept(run(MinP, row, p=0.7)[0]) == {0}
    assert kept(run(MinP, row, p=0.7, min_keep=3)[0]) == {0, 1, 3}
    assert kept(run(MinP, row, p=0.1, min_keep=2)[0]) == {0, 1, 3}
    # p = 0 stays off whatever min_keep says.
    assert torch.equal(run(MinP, row, p=0.0, min_keep=3)[0], row)


def test_min_keep_counts_finite_tokens_only():
    row = t([-INF, 2.0, -INF, 1.0, 0.5])
    for cls, given in [(TopK, {"k": 1}), (TopP, {"p": 0.1}), (MinP, {"p": 0.9}),
                       (EpsilonCutoff, {"epsilon": 0.9}), (TopNSigma, {"n": 0.01}),
                       (TopH, {"top_h": 0.01}), (TypicalP, {"p": 0.01})]:
        out = run(cls, row, min_keep=10, **given)
        assert torch.equal(out[0], row), cls.key  # all three finite tokens stay
        assert len(kept(run(cls, row, min_keep=2, **given)[0])) == 2, cls.key


def test_min_keep_keeps_ties_with_the_min_keep_th_best():
    row = t([5.0, 3.0, 3.0, 3.0, 1.0])
    assert kept(run(MinP, row, p=1.0, min_keep=2)[0]) == {0, 1, 2, 3}
    assert kept(run(EpsilonCutoff, row, epsilon=0.99, min_keep=2)[0]) == {0, 1, 2, 3}


@pytest.mark.parametrize("cls, given", [
    (TopK, {"k": 3}), (TopP, {"p": 0.5}), (MinP, {"p": 0.2}), (TypicalP, {"p": 0.5}),
    (EpsilonCutoff, {"epsilon": 0.05}), (EtaCutoff, {"epsilon": 0.05}), (TopNSigma, {"n": 1.0}),
    (TopH, {"top_h": 0.5}), (Xtc, {"probability": 1.0, "threshold": 0.05}),
])
def test_min_keep_one_is_the_default_behaviour(cls, given):
    logits = random_logits(5, rows=3, vocab=60)
    without = Candidates(logits.clone())
    cls().apply(without, {k: v for k, v in tensors(cls, 3, given).items() if k != "min_keep"},
                RowBatch([make_state() for _ in range(3)], CPU))
    assert torch.equal(run(cls, logits, min_keep=1, **given), without.to_dense())
    assert not torch.equal(without.to_dense(), logits)  # the parameter did something


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_keep", [2, 10, 300])
def test_min_keep_matches_hugging_face_for_top_k_top_p_min_p(seed, min_keep, transformers):
    logits = random_logits(seed)
    cases = [(TopK, {"k": 5}, transformers.TopKLogitsWarper(5, min_tokens_to_keep=min_keep)),
             (TopP, {"p": 0.3}, transformers.TopPLogitsWarper(0.3, min_tokens_to_keep=min_keep)),
             (MinP, {"p": 0.3}, transformers.MinPLogitsWarper(0.3, min_tokens_to_keep=min_keep))]
    for cls, given, theirs in cases:
        ours = run(cls, logits, min_keep=min_keep, **given)
        assert_same(ours, hf(theirs, logits))
        assert (torch.isfinite(ours).sum(dim=1) >= min_keep).all()


# -- typical-p ----------------------------------------------------------------------------------
# p = 1/2, 1/4, 1/8, 1/8: H = 1.75 ln 2; |−log p − H| = 0.75, 0.25, 1.25, 1.25 (× ln 2), so the
# typicality order is 1, 0, {2, 3} with cumulative mass 0.25, 0.75, 1.
TYPICAL = log([0.5, 0.25, 0.125, 0.125])


@pytest.mark.parametrize("p, min_keep, expected", [
    (0.2, 1, {1}),           # the most likely token is not the most typical one
    (0.25, 1, {1}),
    (0.5, 1, {0, 1}),
    (0.8, 1, {0, 1, 2, 3}),  # 2 and 3 are tied in typicality: both stay
    (0.2, 2, {0, 1}),        # min_keep counts in typicality order
    (0.2, 3, {0, 1, 2, 3}),
])
def test_typical_hand_computed(p, min_keep, expected, transformers):
    out = run(TypicalP, TYPICAL, p=p, min_keep=min_keep)
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], TYPICAL[sorted(expected)])
    if expected != {0, 1, 2, 3}:  # HF breaks the 2/3 tie by its sort; otherwise the same
        theirs = hf(transformers.TypicalLogitsWarper(p, min_tokens_to_keep=min_keep),
                    TYPICAL.unsqueeze(0))
        assert kept(theirs[0]) == expected


def test_typical_edge_cases(transformers):
    equal = torch.zeros(5)
    assert torch.equal(run(TypicalP, equal, p=0.3)[0], equal)  # every token equally typical
    single = t([-INF, 1.0, -INF])
    assert torch.equal(run(TypicalP, single, p=0.3)[0], single)
    masked = t([-INF, 0.0, 2.0, -INF, 1.0])
    out = run(TypicalP, masked, p=0.5)[0]
    assert kept(out) <= {1, 2, 4} and len(kept(out)) >= 1
    assert kept(out) == kept(hf(transformers.TypicalLogitsWarper(0.5), masked.unsqueeze(0))[0])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95])
@pytest.mark.parametrize("min_keep", [1, 20])
def test_typical_matches_hugging_face(seed, p, min_keep, transformers):
    logits = random_logits(seed)
    theirs = hf(transformers.TypicalLogitsWarper(p, min_tokens_to_keep=min_keep), logits)
    assert_same(run(TypicalP, logits, p=p, min_keep=min_keep), theirs)


@pytest.mark.parametrize("seed", [0, 1])
def test_typical_matches_hugging_face_beyond_first_prefix(seed, transformers):
    """Flat rows over 6000 tokens: the 1024 most typical tokens hold too little mass."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([torch.randperm(6000, generator=g) for _ in range(2)]).float() / 3000
    ours = run(TypicalP, logits, p=[0.9, 0.6])
    for row, p in enumerate([0.9, 0.6]):
        theirs = hf(transformers.TypicalLogitsWarper(p), logits[row:row + 1])
        assert_same(ours[row:row + 1], theirs)
        assert int(torch.isfinite(theirs).sum()) > 1024


# -- epsilon and eta ----------------------------------------------------------------------------
EPS_ROW = log([0.5, 0.25, 0.125, 0.0625, 0.0625])


@pytest.mark.parametrize("epsilon, min_keep, expected", [
    (0.1, 1, {0, 1, 2}), (0.2, 1, {0, 1}), (0.06, 1, {0, 1, 2, 3, 4}),
    (0.6, 1, {0}),           # nothing reaches ε: the best token stays
    (0.6, 2, {0, 1}), (0.1, 4, {0, 1, 2, 3, 4}),  # ties with the 4th best stay
])
def test_epsilon_hand_computed(epsilon, min_keep, expected):
    out = run(EpsilonCutoff, EPS_ROW, epsilon=epsilon, min_keep=min_keep)
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], EPS_ROW[sorted(expected)])


# p = 0.4, 0.3, 0.2, 0.1: H = 1.2799, e^−H = 0.2781.
ETA_ROW = log([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("epsilon, expected", [
    (0.25, {0, 1, 2}),  # η = √0.25 · 0.2781 = 0.139 < ε: epsilon alone would keep {0, 1}
    (0.15, {0, 1, 2}),  # η = min(0.15, 0.108) = 0.108
    (0.05, {0, 1, 2, 3}),
    (0.9, {0, 1}),      # η = min(0.9, 0.264)
])
def test_eta_hand_computed(epsilon, expected, transformers):
    out = run(EtaCutoff, ETA_ROW, epsilon=epsilon)
    assert kept(out[0]) == expected
    assert kept(hf(transformers.EtaLogitsWarper(epsilon), ETA_ROW.unsqueeze(0))[0]) == expected


def test_eta_uniform_keeps_everything_and_min_keep():
    uniform = torch.zeros(4)
    assert torch.equal(run(EtaCutoff, uniform, epsilon=0.5)[0], uniform)
    row = t([4.0, 0.0, -1.0, -2.0])
    assert kept(run(EtaCutoff, row, epsilon=0.5)[0]) == {0}
    assert kept(run(EtaCutoff, row, epsilon=0.5, min_keep=3)[0]) == {0, 1, 2}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("epsilon", [1e-4, 3e-4, 2e-3, 0.02, 0.3])
@pytest.mark.parametrize("min_keep", [1, 7])
def test_epsilon_and_eta_match_hugging_face(seed, epsilon, min_keep, transformers):
    logits = random_logits(seed)
    for cls, warper in [(EpsilonCutoff, transformers.EpsilonLogitsWarper),
                        (EtaCutoff, transformers.EtaLogitsWarper)]:
        theirs = hf(warper(epsilon, min_tokens_to_keep=min_keep), logits)
        assert_same(run(cls, logits, epsilon=epsilon, min_keep=min_keep), theirs)


# -- top-nσ -------------------------------------------------------------------------------------
SIGMA_ROW = t([3.0, 2.0, 1.0, 0.0, -INF])  # finite mean 1.5, σ = √1.25 = 1.118


@pytest.mark.parametrize("n, min_keep, expected", [
    (1.0, 1, {0, 1}), (2.0, 1, {0, 1, 2}), (3.0, 1, {0, 1, 2, 3}), (0.5, 1, {0}),
    (0.5, 3, {0, 1, 2}),
])
def test_top_n_sigma_hand_computed(n, min_keep, expected):
    out = run(TopNSigma, SIGMA_ROW, n=n, min_keep=min_keep)
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], SIGMA_ROW[sorted(expected)])


@pytest.mark.parametrize("n", [0.0, -1.0])
def test_top_n_sigma_off_values(n):
    candidates = apply(TopNSigma, Candidates(SIGMA_ROW.unsqueeze(0).clone()), n=n)
    assert torch.equal(candidates.values[0], SIGMA_ROW)


def test_top_n_sigma_all_equal_and_single():
    equal = torch.full((6,), 2.5)
    assert torch.equal(run(TopNSigma, equal, n=0.1)[0], equal)  # σ = 0: all stay
    single = t([-INF, -INF, 7.0])
    assert torch.equal(run(TopNSigma, single, n=0.1)[0], single)


def llama_top_n_sigma(row: list[float], n: float) -> set[int]:
    """llama.cpp `llama_sampler_top_n_sigma_apply`, transcribed."""
    finite = [x for x in row if x != -INF]
    top, mean = max(finite), sum(finite) / len(finite)
    std = math.sqrt(sum((x - mean) ** 2 for x in finite) / len(finite))
    return {i for i, x in enumerate(row) if not x < top - n * std and x != -INF}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [0.3, 1.0, 2.0, 3.5])
def test_top_n_sigma_matches_llama_cpp(seed, n):
    logits = random_logits(seed)
    logits[:, :100] = -INF  # masked tokens do not count in σ
    out = run(TopNSigma, logits, n=n)
    for row in range(logits.shape[0]):
        assert kept(out[row]) == llama_top_n_sigma(logits[row].tolist(), n)
    assert (torch.isfinite(out).sum(dim=1) < 900).all()


def test_top_n_sigma_after_top_k_uses_the_survivors():
    """σ is over the tokens still finite: after a top-k it is the σ of the k best."""
    logits = random_logits(7, rows=2)
    sparse = apply(TopK, Candidates(logits.clone()), k=40)
    assert not sparse.dense
    out = apply(TopNSigma, sparse, n=1.0).to_dense()
    for row in range(2):
        best = torch.topk(logits[row], 40).values
        cut = best[0] - best.std(correction=0)
        assert kept(out[row]) == set(torch.nonzero(logits[row] >= cut).flatten().tolist())


# -- XTC ----------------------------------------------------------------------------------------
XTC_ROW = log([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("threshold, min_keep, expected", [
    (0.25, 1, {1, 2, 3}),     # two above: the more likely goes
    (0.15, 1, {2, 3}),        # three above: all but the least likely go
    (0.15, 2, {2, 3}),
    (0.15, 3, {0, 1, 2, 3}),  # would leave 2 < min_keep: the row is left whole
    (0.35, 1, {0, 1, 2, 3}),  # one above: nothing happens
    (0.05, 1, {3}),
    (0.0, 1, {3}),
])
def test_xtc_hand_computed(threshold, min_keep, expected):
    out = run(Xtc, XTC_ROW, probability=1.0, threshold=threshold, min_keep=min_keep)
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], XTC_ROW[sorted(expected)])


@pytest.mark.parametrize("probability, threshold", [(0.0, 0.1), (1.0, 0.51), (1.0, 1.0)])
def test_xtc_off_values_leave_row_bit_identical(probability, threshold):
    candidates = apply(Xtc, Candidates(XTC_ROW.unsqueeze(0).clone()), probability=probability,
                       threshold=threshold)
    assert torch.equal(candidates.values[0], XTC_ROW)


def test_xtc_ties_with_the_least_likely_top_choice_stay():
    row = t([1.0, 1.0, 0.0, 2.0])  # p = 0.197, 0.197, 0.072, 0.534
    assert kept(run(Xtc, row, probability=1.0, threshold=0.15)[0]) == {0, 1, 2}
    assert kept(run(Xtc, row, probability=1.0, threshold=0.2)[0]) == {0, 1, 2, 3}  # one above
    tied = t([1.0, 1.0, 0.0])  # the two top choices are tied: nothing to remove
    assert torch.equal(run(Xtc, tied, probability=1.0, threshold=0.3)[0], tied)


def test_xtc_single_candidate_and_masked_entries():
    single = t([-INF, 3.0, -INF])
    assert torch.equal(run(Xtc, single, probability=1.0, threshold=0.0)[0], single)
    row = t([-INF, 1.0, 2.0, -INF, 0.0])  # p = 0.245, 0.665, 0.090
    assert kept(run(Xtc, row, probability=1.0, threshold=0.2)[0]) == {1, 4}
    assert kept(run(Xtc, row, probability=1.0, threshold=0.2, min_keep=3)[0]) == {1, 2, 4}


def llama_xtc(row: list[float], threshold: float, min_keep: int) -> set[int]:
    """llama.cpp `llama_sample_xtc_apply` once the chance says yes, transcribed."""
    order = sorted((i for i, x in enumerate(row) if x != -INF), key=lambda i: -row[i])
    top = max(row[i] for i in order)
    weights = [math.exp(row[i] - top) for i in order]
    probs = [w / sum(weights) for w in weights]
    last = 0
    for i, p in enumerate(probs):
        if p < threshold:
            break
        last = i
    if len(order) - last >= min_keep and last > 0:
        order = order[last:]
    return set(order)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold, scale", [(0.1, 3.0), (0.05, 2.5), (0.01, 2.0), (0.2, 4.0)])
def test_xtc_matches_llama_cpp(seed, threshold, scale):
    logits = random_logits(seed, rows=6, vocab=300, scale=scale)
    out = run(Xtc, logits, probability=1.0, threshold=threshold)
    changed = 0
    for row in range(logits.shape[0]):
        expected = llama_xtc(logits[row].tolist(), threshold, 1)
        assert kept(out[row]) == expected
        changed += len(expected) < logits.shape[1]
    assert changed > 0


def _batch(seeds, positions) -> RowBatch:
    """A batch of bare rows at given (seed, position): what XTC's draw depends on."""
    return RowBatch([SimpleNamespace(seed=s, position=p, processor_state={})
                     for s, p in zip(seeds, positions)], CPU)


def _cut(out: torch.Tensor) -> list[bool]:
    return (~torch.isfinite(out[:, 0])).tolist()  # token 0 is the best of XTC_ROW


@pytest.mark.parametrize("probability", [0.1, 0.5, 0.85])
def test_xtc_cuts_with_the_given_probability(probability):
    rows = 4000
    logits = XTC_ROW.expand(rows, 4).clone()
    out = run(Xtc, logits, _batch([11] * rows, range(rows)), probability=probability,
              threshold=0.25)
    share = sum(_cut(out)) / rows
    assert abs(share - probability) < 4 * math.sqrt(probability * (1 - probability) / rows)
    # Rows that were cut are cut the same way.
    assert all(kept(out[r]) == {1, 2, 3} for r in range(rows) if _cut(out[r:r + 1])[0])


def test_xtc_decision_is_deterministic_and_batch_independent():
    positions, seeds = list(range(200)), [3] * 200
    logits = XTC_ROW.expand(200, 4).clone()
    together = _cut(run(Xtc, logits, _batch(seeds, positions), probability=0.5, threshold=0.25))
    alone = [_cut(run(Xtc, XTC_ROW, _batch([3], [p]), probability=0.5, threshold=0.25))[0]
             for p in positions]
    assert together == alone
    again = _cut(run(Xtc, logits, _batch(seeds, positions), probability=0.5, threshold=0.25))
    assert together == again
    other_seed = _cut(run(Xtc, logits, _batch([4] * 200, positions), probability=0.5,
                          threshold=0.25))
    assert other_seed != together  # 200 fair coins agreeing would be a 2^-200 event


def test_xtc_seed_parameter_overrides_the_sequence_seed():
    positions = list(range(300))
    logits = XTC_ROW.expand(300, 4).clone()
    own = _cut(run(Xtc, logits, _batch([9] * 300, positions), probability=0.5, threshold=0.25))
    mixed_seeds = [1000 + i for i in range(300)]
    fixed = _cut(run(Xtc, logits, _batch(mixed_seeds, positions), probability=0.5,
                     threshold=0.25, seed=9))
    assert fixed == own
    unset = _cut(run(Xtc, logits, _batch(mixed_seeds, positions), probability=0.5,
                     threshold=0.25, seed=-1))
    assert unset != own


def test_xtc_noise_differs_from_the_sample_selectors():
    """XTC's coordinate is not the selector's −1: its decision is not the selector's uniform."""
    from sampler_service.policy.noise import uniform_noise
    from sampler_service.policy.processors.truncation import XTC_NOISE_TOKEN
    from sampler_service.policy.selectors.sample import ROW_UNIFORM_TOKEN
    assert XTC_NOISE_TOKEN < 0 and XTC_NOISE_TOKEN != ROW_UNIFORM_TOKEN
    seeds, positions = torch.zeros(50, dtype=torch.int64), torch.arange(50)
    mine = uniform_noise(seeds, positions, torch.full((50, 1), XTC_NOISE_TOKEN))
    theirs = uniform_noise(seeds, positions, torch.full((50, 1), ROW_UNIFORM_TOKEN))
    assert not torch.equal(mine, theirs)


# -- top-H --------------------------------------------------------------------------------------
# p = 1/2, 1/4, 1/8, 1/8: −p log p = 0.347, 0.347, 0.260, 0.260, H = 1.213; cumulative 0.347,
# 0.693, 0.953, 1.213.
TOP_H_ROW = log([0.5, 0.25, 0.125, 0.125])


@pytest.mark.parametrize("top_h, min_keep, expected", [
    (0.01, 1, {0}), (0.5, 1, {0}), (0.6, 1, {0, 1}),
    (0.8, 1, {0, 1, 2, 3}),  # 2 and 3 are tied: both stay (HF keeps one, by its sort)
    (0.5, 2, {0, 1}),
])
def test_top_h_hand_computed(top_h, min_keep, expected, transformers):
    out = run(TopH, TOP_H_ROW, top_h=top_h, min_keep=min_keep)
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], TOP_H_ROW[sorted(expected)])
    if min_keep == 1 and top_h != 0.8:
        assert kept(hf(transformers.TopHLogitsWarper(top_h), TOP_H_ROW.unsqueeze(0))[0]) == expected


def test_top_h_keeps_only_among_the_hundred_best():
    flat = torch.arange(1000, dtype=torch.float32) / 1e4  # nearly uniform, no ties
    out = run(TopH, flat, top_h=1.0)
    assert max(kept(out[0])) == 999 and 50 < len(kept(out[0])) <= 100
    assert len(kept(run(TopH, flat, top_h=1.0, min_keep=150)[0])) == 150


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_h", [0.05, 0.3, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_top_h_matches_hugging_face(seed, top_h, scale, transformers):
    logits = random_logits(seed, scale=scale)
    assert_same(run(TopH, logits, top_h=top_h), hf(transformers.TopHLogitsWarper(top_h), logits))


# -- every processor: batches, off rows, dense and sparse --------------------------------------
#: (processor, parameters that turn it on, parameters that leave a row off).
FAMILY = [
    (TopK, {"k": 7, "min_keep": 9}, {"k": 0, "min_keep": 9}),
    (TopP, {"p": 0.6, "min_keep": 3}, {"p": 1.0, "min_keep": 3}),
    (MinP, {"p": 0.1, "min_keep": 2}, {"p": 0.0, "min_keep": 2}),
    (TypicalP, {"p": 0.5, "min_keep": 2}, {"p": 1.0, "min_keep": 2}),
    (EpsilonCutoff, {"epsilon": 0.02, "min_keep": 2}, {"epsilon": 0.0, "min_keep": 2}),
    (EtaCutoff, {"epsilon": 0.02, "min_keep": 2}, {"epsilon": 0.0, "min_keep": 2}),
    (TopNSigma, {"n": 1.0, "min_keep": 2}, {"n": 0.0, "min_keep": 2}),
    (TopNSigma, {"n": 1.0}, {"n": -1.0}),
    (Xtc, {"probability": 1.0, "threshold": 0.03}, {"probability": 0.0, "threshold": 0.03}),
    (Xtc, {"probability": 1.0, "threshold": 0.03}, {"probability": 1.0, "threshold": 0.6}),
    (TopH, {"top_h": 0.6, "min_keep": 2}, {"top_h": 0.0, "min_keep": 2}),
]
FAMILY_IDS = [f"{cls.key}-{i}" for i, (cls, _, _) in enumerate(FAMILY)]


def _mixed(on: dict, off: dict, pattern: list[bool]) -> dict:
    return {name: [(on if row else off)[name] for row in pattern] for name in on}


@pytest.mark.parametrize("cls, on, off", FAMILY, ids=FAMILY_IDS)
def test_batch_equals_single_rows_and_off_rows_are_bit_identical(cls, on, off):
    logits = random_logits(11, rows=5, vocab=200, scale=2.5)
    pattern = [True, False, True, True, False]
    batch = run(cls, logits, **_mixed(on, off, pattern))
    for row, is_on in enumerate(pattern):
        alone = run(cls, logits[row], **(on if is_on else off))[0]
        assert torch.equal(batch[row], alone)
        if not is_on:
            assert torch.equal(batch[row], logits[row])
        else:
            assert not torch.equal(batch[row], logits[row])


@pytest.mark.parametrize("cls, on, off", FAMILY, ids=FAMILY_IDS)
def test_all_rows_off_returns_untouched(cls, on, off):
    logits = random_logits(12, rows=3, vocab=50)
    candidates = Candidates(logits.clone())
    values = candidates.values
    apply(cls, candidates, **off)
    assert candidates.dense and candidates.values is values
    assert torch.equal(values, logits)


@pytest.mark.parametrize("cls, on, off", FAMILY, ids=FAMILY_IDS)
def test_dense_and_sparse_batches_agree(cls, on, off):
    """The same rows after a top-k that turns the batch sparse, and dense with −inf entries;
    a sparse batch whose order a penalty disturbed too."""
    logits = random_logits(13, rows=4, vocab=300, scale=2.0)
    batch = RowBatch([make_state() for _ in range(4)], CPU)
    sparse = apply(TopK, Candidates(logits.clone()), batch, k=60)
    assert not sparse.dense
    # Scramble the order as a penalty would: raise two middling tokens of every row.
    rows = torch.arange(4).repeat_interleave(2)
    tokens = sparse.ids[:, 30:32].reshape(-1).clone()
    present, columns = sparse.locate(rows, tokens)
    sparse.update(rows[present], columns, sparse.values[rows[present], columns] + 3.0)
    dense = Candidates(sparse.to_dense().clone())
    pattern = [True, True, False, True]
    given = _mixed(on, off, pattern)
    apply(cls, sparse, batch, **given)
    apply(cls, dense, batch, **given)
    assert dense.dense
    assert torch.equal(sparse.to_dense(), dense.to_dense())
    assert not torch.equal(dense.to_dense()[0], logits[0])
    # All rows on: the dense batch may turn sparse; the result is the same.
    sparse_all = apply(TopK, Candidates(logits.clone()), batch, k=60)
    dense_all = Candidates(sparse_all.to_dense().clone())
    apply(cls, sparse_all, batch, **on)
    apply(cls, dense_all, batch, **on)
    assert torch.equal(sparse_all.to_dense(), dense_all.to_dense())


@pytest.mark.parametrize("cls", [TopK, TopH])
def test_prefix_truncations_turn_a_dense_batch_sparse(cls):
    logits = random_logits(14, rows=3, vocab=400)
    given = {"k": 5} if cls is TopK else {"top_h": 0.5}
    candidates = apply(cls, Candidates(logits.clone()), **given)
    assert not candidates.dense
    padded = {name: [value] * 3 + [0] for name, value in given.items()}
    dense = run(cls, torch.cat([logits, logits[:1]]), **padded)
    assert torch.equal(candidates.to_dense(), dense[:3])


# -- specs, validation and the engine -----------------------------------------------------------
def test_every_truncation_takes_min_keep():
    for key in ["top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                "top_n_sigma", "xtc", "top_h"]:
        names = {p.name for p in PROCESSORS[key].params}
        assert "min_keep" in names, key
        assert PROCESSORS[key].role == "filter"
        assert PROCESSORS[key].__doc__ and "Off" in PROCESSORS[key].__doc__


@pytest.mark.parametrize("entry, field", [
    ({"top_k": {"k": 3, "min_keep": 0}}, "spec.chain[0].top_k.min_keep"),
    ({"typical_p": {"p": 0.0}}, "spec.chain[0].typical_p.p"),
    ({"typical_p": {"p": 1.5}}, "spec.chain[0].typical_p.p"),
    ({"epsilon_cutoff": {"epsilon": -0.1}}, "spec.chain[0].epsilon_cutoff.epsilon"),
    ({"eta_cutoff": {"epsilon": 2}}, "spec.chain[0].eta_cutoff.epsilon"),
    ({"xtc": {"probability": "always"}}, "spec.chain[0].xtc.probability"),
    ({"xtc": {"min_keep": -1}}, "spec.chain[0].xtc.min_keep"),
    ({"xtc": {"seed": -2}}, "spec.chain[0].xtc.seed"),
    ({"xtc": {"seed": 1.5}}, "spec.chain[0].xtc.seed"),
    ({"top_h": {"top_h": 1.1}}, "spec.chain[0].top_h.top_h"),
    ({"top_n_sigma": {"sigma": 1}}, "spec.chain[0].top_n_sigma.sigma"),
    ({"min_p": {"p": 0.1, "min_keep": 2.5}}, "spec.chain[0].min_p.min_keep"),
])
def test_invalid_parameters_name_the_field(entry, field):
    with pytest.raises(InvalidArgument) as err:
        parse_policy("x", {"chain": [entry], "select": "sample"})
    assert err.value.field == field


def test_engine_chain_matches_hugging_face_chain(transformers):
    spec = parse_policy("family", {
        "chain": [{"temperature": {"temperature": 0.7}}, {"top_k": {"k": 200}},
                  {"typical_p": {"p": 0.95}}, {"epsilon_cutoff": {"epsilon": 3e-4}},
                  {"eta_cutoff": {"epsilon": 1e-3, "min_keep": 2}}],
        "select": "sample"})
    policy = resolve(spec, PolicyVersion(1, "x"), {})
    logits = random_logits(21, rows=1, vocab=2000)[0]
    ours = Engine(CPU).distribution(SequenceState("a", policy, (), 1, frozenset()), logits)
    x = logits.unsqueeze(0).clone()
    for warper in (transformers.TemperatureLogitsWarper(0.7), transformers.TopKLogitsWarper(200),
                   transformers.TypicalLogitsWarper(0.95), transformers.EpsilonLogitsWarper(3e-4),
                   transformers.EtaLogitsWarper(1e-3, min_tokens_to_keep=2)):
        x = hf(warper, x)
    theirs = torch.log_softmax(x, dim=1)[0]
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)], atol=1e-6)
    assert 1 < int(torch.isfinite(ours).sum()) < 200


def test_engine_runs_xtc_top_n_sigma_and_top_h_in_a_policy():
    spec = parse_policy("creative", {
        "chain": [{"top_n_sigma": {"n": 2.0}}, {"xtc": {"probability": 1.0, "threshold": 0.05}},
                  {"top_h": {"top_h": 0.9, "min_keep": 3}}],
        "select": "sample"})
    policy = resolve(spec, PolicyVersion(1, "x"), {})
    logits = random_logits(22, rows=1, vocab=500, scale=4.0)[0]
    state = SequenceState("a", policy, (), 5, frozenset())
    dist = Engine(CPU).distribution(state, logits)
    expected = run(TopNSigma, logits, n=2.0)
    expected = run(Xtc, expected, probability=1.0, threshold=0.05)
    expected = run(TopH, expected, top_h=0.9, min_keep=3)
    assert kept(dist) == kept(expected[0])
    assert int(torch.argmax(logits)) not in kept(dist)  # XTC removed the best token
    outcome = Engine(CPU).step([state], logits.unsqueeze(0).clone())[0]
    assert outcome.token_id in kept(dist)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_top_p_on_rows_too_flat_for_the_prefix_matches_hf_and_is_batch_independent(p, transformers):
    """Flat rows need the histogram path (`nucleus_threshold`); a peaked row beside them keeps
    the prefix path. Each row's result equals Hugging Face's and its own result alone."""
    generator = torch.Generator().manual_seed(7)
    flat = torch.randn(3, 20000, generator=generator) * 0.5
    peaked = torch.randn(1, 20000, generator=generator) * 6
    logits = torch.cat([flat, peaked])
    batch = Candidates(logits.clone())
    TopP().apply(batch, {"p": torch.full((4,), p)}, None)
    expected = transformers.TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(torch.isfinite(batch.to_dense()), torch.isfinite(expected))
    assert int(torch.isfinite(batch.to_dense()[0]).sum()) > 1024  # the histogram path ran
    for row in range(4):
        alone = Candidates(logits[row:row + 1].clone())
        TopP().apply(alone, {"p": torch.full((1,), p)}, None)
        assert torch.equal(alone.to_dense()[0], batch.to_dense()[row])


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_typical_p_on_rows_too_flat_for_the_prefix_matches_hf_and_is_batch_independent(
        p, transformers):
    """More than 1024 typical tokens are needed: the histogram path (`mass_cut_column`)."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.cat([torch.randn(3, 20000, generator=generator) * 0.5,
                        torch.randn(1, 20000, generator=generator) * 6])
    batch = Candidates(logits.clone())
    TypicalP().apply(batch, {"p": torch.full((4,), p)}, None)
    expected = transformers.TypicalLogitsWarper(p)(None, logits.clone())
    assert torch.equal(torch.isfinite(batch.to_dense()), torch.isfinite(expected))
    assert int(torch.isfinite(batch.to_dense()[0]).sum()) > 1024
    for row in range(4):
        alone = Candidates(logits[row:row + 1].clone())
        TypicalP().apply(alone, {"p": torch.full((1,), p)}, None)
        assert torch.equal(alone.to_dense()[0], batch.to_dense()[row])


# -- XTC: llama.cpp's ranges ---------------------------------------------------------------------
def test_xtc_min_keep_zero_is_llama_cpps_default_and_stored_as_one():
    spec = parse_policy("x", {"chain": [{"xtc": {"probability": 1.0, "min_keep": 0}}],
                              "select": "sample"})
    assert dict(spec.chain[0][1])["min_keep"] == 1
    for threshold in (0.05, 0.15, 0.25):
        assert kept(run(Xtc, XTC_ROW, probability=1.0, threshold=threshold, min_keep=0)[0]) \
            == llama_xtc(XTC_ROW.tolist(), threshold, 0) \
            == kept(run(Xtc, XTC_ROW, probability=1.0, threshold=threshold, min_keep=1)[0])


@pytest.mark.parametrize("probability, threshold, like", [
    (1.7, 0.15, (1.0, 0.15)),   # a probability ≥ 1 cuts at every step
    (-0.3, 0.15, None),         # ≤ 0: off
    (1.0, -0.2, (1.0, 0.0)),    # a threshold ≤ 0 makes every finite token a top choice
    (1.0, 0.7, None),           # > 0.5: off
])
def test_xtc_takes_any_probability_and_threshold_as_llama_cpp_does(probability, threshold, like):
    parse_policy("x", {"chain": [{"xtc": {"probability": probability, "threshold": threshold}}],
                       "select": "sample"})
    out = run(Xtc, XTC_ROW, probability=probability, threshold=threshold)[0]
    if like is None:
        assert torch.equal(out, XTC_ROW)
    else:
        assert torch.equal(out, run(Xtc, XTC_ROW, probability=like[0], threshold=like[1])[0])
        assert kept(out) == llama_xtc(XTC_ROW.tolist(), threshold, 1)
