"""Each processor on tiny hand-computed rows (the formulas in docs/policies.md), then against
Hugging Face's processors on random rows.

Processors are driven directly: a `Candidates` over a float32 copy of the logits, a `RowBatch`
of real `SequenceState`s, and the [rows] parameter tensors the engine would build.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from sampler_service.engine import Engine
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import (FrequencyPenalty, MinP, MinTokens,
                                               PresencePenalty, RepetitionPenalty, RowBatch,
                                               Temperature, TopK, TopP)
from sampler_service.policy.processors.base import RowInputs
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState
from tests.unit.helpers import random_logits

CPU = torch.device("cpu")
INF = math.inf
_DTYPES = {"float": torch.float32, "int": torch.int64}


def make_state(prompt=(), output=(), seed=0, eos=(), **flat) -> SequenceState:
    return SequenceState(sequence_id="s", policy=resolve_flat(flat), prompt_ids=tuple(prompt),
                         seed=seed, eos_token_ids=frozenset(eos), output_ids=list(output))


def run(cls, logits, states=None, **args):
    """Applies processor `cls` to `logits` ([V] or [R, V]); `args` maps each parameter to one
    value per row. Returns (dense processed logits [R, V], the batch, the candidates)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    rows = logits.shape[0]
    states = states if states is not None else [make_state() for _ in range(rows)]
    kinds = {p.name: torch.float64 if p.float64 else _DTYPES.get(p.kind) for p in cls.params}
    tensors = {name: torch.tensor(list(values), dtype=kinds[name]) if kinds[name] else list(values)
               for name, values in args.items()}
    candidates = Candidates(logits.clone())
    batch = RowBatch(states, CPU)
    cls().apply(candidates, tensors, batch)
    return candidates.to_dense(), batch, candidates


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- temperature ------------------------------------------------------------------------------
def test_temperature_half_doubles_logits():
    logits = t([1.0, -2.0, 0.5, 3.0, -INF])
    out, batch, _ = run(Temperature, logits, temperature=[0.5])
    assert torch.equal(out[0], t([2.0, -4.0, 1.0, 6.0, -INF]))
    assert not bool(batch.greedy.any())


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_temperature_zero_marks_greedy_and_leaves_logits(temperature):
    logits = t([1.0, -2.0, 0.5, 3.0])
    out, batch, _ = run(Temperature, logits, temperature=[temperature])
    assert torch.equal(out[0], logits)
    assert batch.greedy.tolist() == [True]


def test_temperature_small_but_not_greedy_divides():
    out, batch, _ = run(Temperature, t([1.0, -1.0]), temperature=[1e-3])
    assert batch.greedy.tolist() == [False]
    assert torch.allclose(out[0], t([1000.0, -1000.0]))


def test_temperature_mixed_batch_off_rows_bit_identical():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    out, batch, _ = run(Temperature, logits, temperature=[1.0, 0.0, 0.5, 2.0])
    assert torch.equal(out[0], logits[0])
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[2], logits[2] / 0.5)
    assert torch.equal(out[3], logits[3] / 2.0)
    assert batch.greedy.tolist() == [False, True, False, False]


def test_temperature_one_everywhere_is_off():
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    out, batch, _ = run(Temperature, logits, temperature=[1.0, 1.0, 1.0])
    assert torch.equal(out, logits)
    assert not bool(batch.greedy.any())


# -- top-k ------------------------------------------------------------------------------------
def test_top_k_keeps_the_k_best_values_unchanged():
    logits = t([1.0, 4.0, 2.0, 3.0, 0.0, 5.0])
    out, _, _ = run(TopK, logits, k=[2])
    assert kept(out[0]) == {1, 5}
    assert torch.equal(out[0], t([-INF, 4.0, -INF, -INF, -INF, 5.0]))


def test_top_k_keeps_ties_at_the_kth_value():
    out, _, _ = run(TopK, t([1.0, 3.0, 3.0, 2.0, 3.0, 0.0]), k=[2])
    assert kept(out[0]) == {1, 2, 4}
    out, _, _ = run(TopK, t([5.0, 3.0, 3.0, 1.0]), k=[2])
    assert kept(out[0]) == {0, 1, 2}


def test_top_k_all_equal_keeps_everything():
    logits = torch.zeros(6)
    out, _, _ = run(TopK, logits, k=[1])
    assert torch.equal(out[0], logits)


@pytest.mark.parametrize("k", [0, 6, 7, 1000])
def test_top_k_off_values_leave_row_bit_identical(k):
    logits = t([1.0, 4.0, 2.0, 3.0, 0.0, 5.0])
    out, _, candidates = run(TopK, logits, k=[k])
    assert candidates.dense
    assert torch.equal(out[0], logits)


def test_top_k_with_minus_inf_entries():
    out, _, _ = run(TopK, t([-INF, 1.0, -INF, 3.0, 2.0]), k=[2])
    assert kept(out[0]) == {3, 4}
    # Fewer finite tokens than k: all of them stay.
    single = t([-INF, 2.0, -INF, -INF])
    out, _, _ = run(TopK, single, k=[2])
    assert torch.equal(out[0], single)


def test_top_k_mixed_batch_off_rows_bit_identical():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    out, _, candidates = run(TopK, logits, k=[2, 0, 3, 10])
    assert candidates.dense  # an off row keeps the batch dense
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[3], logits[3])
    assert kept(out[0]) == set(torch.topk(logits[0], 2).indices.tolist())
    assert kept(out[2]) == set(torch.topk(logits[2], 3).indices.tolist())


def test_top_k_all_rows_on_turns_sparse_with_same_result():
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    sparse, _, candidates = run(TopK, logits, k=[1, 3, 5])
    assert not candidates.dense
    dense, _, _ = run(TopK, torch.cat([logits, logits[:1]]), k=[1, 3, 5, 0])
    assert torch.equal(sparse, dense[:3])
    assert [len(kept(r)) for r in sparse] == [1, 3, 5]


# -- top-p ------------------------------------------------------------------------------------
# Probabilities 0.1, 0.5, 0.05, 0.2, 0.15: best first 1 (0.5), 3 (0.2), 4 (0.15), 0 (0.1), 2.
NUCLEUS = torch.log(t([0.1, 0.5, 0.05, 0.2, 0.15]))


@pytest.mark.parametrize("p, expected", [
    (0.01, {1}),          # the best token always stays
    (0.3, {1}),           # mass before token 3 is 0.5 >= 0.3
    (0.6, {1, 3}),        # before 4: 0.7
    (0.75, {1, 3, 4}),    # before 0: 0.85
    (0.9, {1, 3, 4, 0}),  # before 2: 0.95
    (0.99, {0, 1, 2, 3, 4}),
])
def test_top_p_hand_computed_nucleus(p, expected):
    out, _, _ = run(TopP, NUCLEUS, p=[p])
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], NUCLEUS[sorted(expected)])


def test_top_p_one_is_off():
    out, _, candidates = run(TopP, NUCLEUS, p=[1.0])
    assert candidates.dense
    assert torch.equal(out[0], NUCLEUS)


def test_top_p_keeps_ties_with_the_last_kept_token():
    # p ≈ 0.447, 0.164 x3, 0.060: 0.5 is reached by the second token; its ties stay.
    out, _, _ = run(TopP, t([2.0, 1.0, 1.0, 1.0, 0.0]), p=[0.5])
    assert kept(out[0]) == {0, 1, 2, 3}


def test_top_p_all_equal_logits_keep_everything():
    logits = torch.zeros(5)
    out, _, _ = run(TopP, logits, p=[0.3])
    assert torch.equal(out[0], logits)


def test_top_p_single_candidate():
    logits = t([-INF, 1.0, -INF])
    out, _, _ = run(TopP, logits, p=[0.5])
    assert torch.equal(out[0], logits)


def test_top_p_mixed_batch_off_rows_bit_identical():
    logits = torch.stack([NUCLEUS, NUCLEUS * 2, NUCLEUS])
    out, _, _ = run(TopP, logits, p=[1.0, 0.8, 1.0])
    assert torch.equal(out[0], logits[0])
    assert torch.equal(out[2], logits[2])
    # Row 1 is p² / Σ p²: 0.769, 0.123, 0.069, ...; the mass before the third is 0.892.
    assert kept(out[1]) == {1, 3}


# -- min-p ------------------------------------------------------------------------------------
# p_i / p_max = exp(l_i − 3): 1, 0.135, 0.0498, 0.607, 0.0183.
MINP = t([3.0, 1.0, 0.0, 2.5, -1.0])


@pytest.mark.parametrize("p, expected", [
    (0.01, {0, 1, 2, 3, 4}), (0.04, {0, 1, 2, 3}), (0.1, {0, 1, 3}), (0.5, {0, 3}),
    (0.7, {0}), (1.0, {0}),
])
def test_min_p_keeps_tokens_above_fraction_of_best(p, expected):
    out, _, _ = run(MinP, MINP, p=[p])
    assert kept(out[0]) == expected
    assert torch.equal(out[0][sorted(expected)], MINP[sorted(expected)])


def test_min_p_one_keeps_ties_with_best():
    out, _, _ = run(MinP, t([3.0, 3.0, 1.0]), p=[1.0])
    assert kept(out[0]) == {0, 1}


def test_min_p_zero_is_off_in_a_mixed_batch():
    logits = torch.stack([MINP, MINP, torch.zeros(5)])
    out, _, _ = run(MinP, logits, p=[0.0, 0.5, 0.9])
    assert torch.equal(out[0], logits[0])
    assert kept(out[1]) == {0, 3}
    assert torch.equal(out[2], logits[2])  # all equal: everything is the best


def test_min_p_with_minus_inf_entries():
    out, _, _ = run(MinP, t([-INF, 2.0, -INF, 1.5]), p=[0.5])
    assert kept(out[0]) == {1, 3}  # e^-0.5 = 0.607 >= 0.5


# -- repetition penalty -----------------------------------------------------------------------
PEN = t([2.0, -1.0, 0.5, -3.0, 4.0, 1.0, 0.0])


def test_repetition_penalty_sign_aware_once_per_distinct_token():
    # prompt ∪ output = {0, 1, 3, 6}; 1 occurs twice, 0 in prompt and output: once each.
    state = make_state(prompt=(0, 1, 1, 6), output=[3, 0, 0])
    out, _, _ = run(RepetitionPenalty, PEN, [state], penalty=[2.0])
    assert torch.equal(out[0], t([1.0, -2.0, 0.5, -6.0, 4.0, 1.0, 0.0]))


def test_repetition_penalty_below_one_boosts():
    state = make_state(prompt=(0, 1), output=[])
    out, _, _ = run(RepetitionPenalty, PEN, [state], penalty=[0.5])
    assert torch.equal(out[0], t([4.0, -0.5, 0.5, -3.0, 4.0, 1.0, 0.0]))


def test_repetition_penalty_off_rows_bit_identical():
    states = [make_state(prompt=(0, 1), output=[3]) for _ in range(3)]
    logits = torch.stack([PEN, PEN, PEN])
    out, _, _ = run(RepetitionPenalty, logits, states, penalty=[1.0, 1.5, 1.0])
    assert torch.equal(out[0], PEN)
    assert torch.equal(out[2], PEN)
    assert torch.allclose(out[1], t([2 / 1.5, -1.5, 0.5, -4.5, 4.0, 1.0, 0.0]))


def test_repetition_penalty_leaves_minus_inf():
    state = make_state(prompt=(0, 1), output=[])
    out, _, _ = run(RepetitionPenalty, t([-INF, 1.0, 2.0]), [state], penalty=[3.0])
    assert out[0, 0].item() == -INF
    assert out[0, 1].item() == pytest.approx(1 / 3)


# -- frequency / presence ---------------------------------------------------------------------
def test_frequency_penalty_counts_output_only():
    # Output counts: 3 x3, 1 x1. Prompt tokens 0 and 2 are not penalised.
    state = make_state(prompt=(0, 1, 2), output=[3, 3, 1, 3])
    out, _, _ = run(FrequencyPenalty, PEN, [state], penalty=[0.5])
    assert torch.equal(out[0], t([2.0, -1.5, 0.5, -4.5, 4.0, 1.0, 0.0]))


def test_frequency_penalty_negative_encourages():
    state = make_state(output=[4, 4])
    out, _, _ = run(FrequencyPenalty, PEN, [state], penalty=[-1.0])
    assert out[0, 4].item() == 6.0
    assert torch.equal(out[0, :4], PEN[:4])


def test_presence_penalty_once_per_output_token():
    state = make_state(prompt=(0, 1, 2), output=[3, 3, 1, 3])
    out, _, _ = run(PresencePenalty, PEN, [state], penalty=[0.5])
    assert torch.equal(out[0], t([2.0, -1.5, 0.5, -3.5, 4.0, 1.0, 0.0]))


@pytest.mark.parametrize("cls", [FrequencyPenalty, PresencePenalty])
def test_frequency_presence_off_rows_bit_identical(cls):
    states = [make_state(prompt=(0,), output=[1, 2, 2]) for _ in range(3)]
    logits = torch.stack([PEN, PEN, PEN])
    out, _, _ = run(cls, logits, states, penalty=[0.0, 1.0, 0.0])
    assert torch.equal(out[0], PEN) and torch.equal(out[2], PEN)
    assert not torch.equal(out[1], PEN)
    out, _, _ = run(cls, logits, states, penalty=[0.0, 0.0, 0.0])
    assert torch.equal(out, logits)


def test_penalties_with_empty_history_change_nothing():
    state = make_state()
    for cls, value in [(RepetitionPenalty, 2.0), (FrequencyPenalty, 1.0), (PresencePenalty, 1.0)]:
        out, _, _ = run(cls, PEN, [state], penalty=[value])
        assert torch.equal(out[0], PEN)


# -- min_tokens -------------------------------------------------------------------------------
def test_min_tokens_masks_eos_and_stop_ids_while_short():
    logits = torch.arange(8, dtype=torch.float32).expand(5, 8).clone()
    states = [make_state(output=[0] * n, eos=(5,), stop_token_ids=[2], min_tokens=3)
              for n in range(5)]
    out, _, _ = run(MinTokens, logits, states, min_tokens=[3] * 5)
    for n in range(3):
        assert kept(out[n]) == {0, 1, 3, 4, 6, 7}
        assert torch.equal(out[n][[0, 1, 3, 4, 6, 7]], logits[n][[0, 1, 3, 4, 6, 7]])
    assert torch.equal(out[3], logits[3])  # position 3 == min_tokens: allowed again
    assert torch.equal(out[4], logits[4])


def test_min_tokens_zero_is_off():
    logits = torch.arange(8, dtype=torch.float32).expand(2, 8).clone()
    states = [make_state(eos=(5,), stop_token_ids=[2]) for _ in range(2)]
    out, _, _ = run(MinTokens, logits, states, min_tokens=[0, 1])
    assert torch.equal(out[0], logits[0])
    assert kept(out[1]) == {0, 1, 3, 4, 6, 7}


# -- dense and sparse batches agree -------------------------------------------------------------
def _chain_policy(min_tokens: int = 3):
    spec = parse_policy("sparse-first", {
        "chain": [{"top_k": {"k": 5}}, {"repetition_penalty": {"penalty": 1.7}},
                  {"frequency_penalty": {"penalty": 0.4}}, {"presence_penalty": {"penalty": 0.3}},
                  {"min_tokens": {"min_tokens": min_tokens}}, {"temperature": {"temperature": 0.7}},
                  {"min_p": {"p": 0.05}}, {"top_p": {"p": 0.9}}],
        "select": "sample",
        "overridable": ["top_k", "top_p"]})
    return spec


def test_chain_gives_same_distribution_sparse_and_dense():
    """A chain opening with top-k runs sparse alone; with a top-k-off row beside it, the
    penalties and constraints run on dense rows (top-p turns the pair sparse later). They
    must land on the same tokens either way. (k = vocab is off for the row but stays in the
    plan: k = 0 would drop the stage, and the row would run in a batch of its own.)"""
    spec = _chain_policy()
    on = resolve(spec, PolicyVersion(1, "x"), {})
    off = resolve(spec, PolicyVersion(1, "x"), {"top_k": 12})
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(4)) * 2
    prompt, output = (0, 1, 2, 3), [int(i) for i in torch.topk(logits[0], 5).indices[:2]]
    eos = int(torch.topk(logits[0], 5).indices[2])
    states = [SequenceState("a", on, prompt, 1, frozenset({eos}), list(output)),
              SequenceState("b", off, prompt, 1, frozenset({eos}), list(output))]
    engine = Engine(CPU)
    candidates, _ = engine.process(states[:1], logits[:1].clone(), RowInputs(logits[:1]))
    assert not candidates.dense
    sparse = candidates.to_dense()[0]
    candidates, _ = engine.process([states[0], states[1]], logits.clone(), RowInputs(logits))
    assert torch.equal(sparse, candidates.to_dense()[0])
    assert eos not in kept(sparse)  # min_tokens masked it inside the sparse batch
    free = SequenceState("c", resolve(_chain_policy(0), PolicyVersion(1, "x"), {}), prompt, 1,
                         frozenset({eos}), list(output))
    candidates, _ = engine.process([free], logits[:1].clone(), RowInputs(logits[:1]))
    assert eos in kept(candidates.to_dense()[0])  # ... and only min_tokens did
    assert 0 < len(kept(sparse)) <= 5


# -- Hugging Face's processors on random rows -------------------------------------------------
SEEDS = [0, 1, 2]
HF_VOCAB = 1000


def assert_same(ours: torch.Tensor, theirs: torch.Tensor):
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    finite = torch.isfinite(theirs)
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def both_paths(cls, logits, name, value, off):
    """`cls` on every row (a batch that may turn sparse), and again with an extra row whose
    parameter is off (the batch stays dense and masks in place). Checks the off row."""
    all_on, _, _ = run(cls, logits, **{name: [value] * logits.shape[0]})
    padded = torch.cat([logits, logits[:1]])
    mixed, _, candidates = run(cls, padded, **{name: [value] * logits.shape[0] + [off]})
    assert candidates.dense
    assert torch.equal(mixed[-1], logits[0])
    return all_on, mixed[:-1]


def hf(processor, logits, input_ids=None):
    if input_ids is None:
        input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.int64)
    return processor(input_ids, logits.clone())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_hugging_face(seed, k, transformers):
    logits = random_logits(seed)
    theirs = hf(transformers.TopKLogitsWarper(k), logits)
    for ours in both_paths(TopK, logits, "k", k, 0):
        assert_same(ours, theirs)
        assert (torch.isfinite(ours).sum(dim=1) == k).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.9, 0.99])
def test_top_p_matches_hugging_face(seed, p, transformers):
    logits = random_logits(seed)
    theirs = hf(transformers.TopPLogitsWarper(p), logits)
    for ours in both_paths(TopP, logits, "p", p, 1.0):
        assert_same(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
def test_top_p_matches_hugging_face_beyond_first_prefix(seed, transformers):
    """A flat row over 5000 tokens: the first 1024-token prefix holds too little mass."""
    g = torch.Generator().manual_seed(seed)
    # Distinct values by construction: a permutation of an evenly spaced grid over [0, 2].
    logits = torch.stack([torch.randperm(5000, generator=g) for _ in range(3)]).float() / 2500
    ours, _, candidates = run(TopP, logits, p=[0.95, 1.0, 0.6])
    assert candidates.dense
    assert torch.equal(ours[1], logits[1])
    theirs = hf(transformers.TopPLogitsWarper(0.95), logits[:1])
    assert_same(ours[:1], theirs)
    assert int(torch.isfinite(theirs).sum()) > 1024
    assert_same(ours[2:], hf(transformers.TopPLogitsWarper(0.6), logits[2:]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.001, 0.05, 0.2, 0.6])
def test_min_p_matches_hugging_face(seed, p, transformers):
    logits = random_logits(seed)
    theirs = hf(transformers.MinPLogitsWarper(p), logits)
    for ours in both_paths(MinP, logits, "p", p, 0.0):
        assert_same(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_hugging_face(seed, temperature, transformers):
    logits = random_logits(seed)
    theirs = hf(transformers.TemperatureLogitsWarper(temperature), logits)
    for ours in both_paths(Temperature, logits, "temperature", temperature, 1.0):
        assert_same(ours, theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty_matches_hugging_face(seed, penalty, transformers):
    g = torch.Generator().manual_seed(100 + seed)
    logits = random_logits(seed)
    prompt = torch.randint(0, HF_VOCAB, (4, 30), generator=g)
    output = torch.randint(0, 50, (4, 20), generator=g)  # many repeats, some shared with prompt
    states = [make_state(prompt=tuple(prompt[r].tolist()), output=output[r].tolist())
              for r in range(4)]
    ours, _, _ = run(RepetitionPenalty, logits, states, penalty=[penalty] * 4)
    theirs = hf(transformers.RepetitionPenaltyLogitsProcessor(penalty), logits,
                torch.cat([prompt, output], dim=1))
    assert_same(ours, theirs)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("seed", SEEDS)
def test_flat_chain_matches_hugging_face_chain(seed, transformers):
    """The flat chain (vLLM v1 order) against HF's processors run in that same order."""
    g = torch.Generator().manual_seed(200 + seed)
    logits = random_logits(seed, rows=1)[0]
    prompt = torch.randint(0, HF_VOCAB, (40,), generator=g)
    output = torch.randint(0, HF_VOCAB, (10,), generator=g)
    params = dict(repetition_penalty=1.2, temperature=0.8, min_p=0.02, top_k=40, top_p=0.9)
    state = make_state(prompt=tuple(prompt.tolist()), output=output.tolist(), **params)
    ours = Engine(CPU).distribution(state, logits)
    input_ids = torch.cat([prompt, output]).unsqueeze(0)
    x = logits.unsqueeze(0).clone()
    for processor in (transformers.RepetitionPenaltyLogitsProcessor(1.2),
                      transformers.TemperatureLogitsWarper(0.8),
                      transformers.MinPLogitsWarper(0.02),
                      transformers.TopKLogitsWarper(40), transformers.TopPLogitsWarper(0.9)):
        x = processor(input_ids, x)
    theirs = torch.log_softmax(x, dim=1)[0]
    assert_same(ours, theirs)
    assert 1 < int(torch.isfinite(ours).sum()) <= 40


# -- top_k: vLLM's -1 -------------------------------------------------------------------------
def test_top_k_minus_one_is_vllms_off_and_is_stored_as_zero():
    """vLLM's "off" is -1 (Hugging Face's and llama.cpp's is 0): both are taken, flat and in a
    spec, and -1 resolves to 0, so the stage is dropped as off and the plan says k=0."""
    flat = resolve_flat({"top_k": -1, "top_p": 0.9})
    link = next(l for l in flat.links if l.stage.key == "top_k")
    assert link.values["k"] == 0 and link.is_off
    assert "top_k" not in [l.stage.key for l in flat.active_links]
    spec = parse_policy("p", {"chain": [{"top_k": {"k": -1}}], "select": "sample"})
    assert dict(spec.chain[0][1])["k"] == 0
    assert resolve_flat({"top_k": 0}).spec() == resolve_flat({"top_k": -1}).spec()


@pytest.mark.parametrize("k", [-2, -100, -(2 ** 31)])
def test_top_k_other_negatives_are_refused_naming_the_field(k):
    from sampler_service.errors import InvalidArgument
    with pytest.raises(InvalidArgument) as flat:
        resolve_flat({"top_k": k})
    assert flat.value.field == "params.top_k"
    assert "top_k" in flat.value.message and "-1 (= 0)" in flat.value.message
    with pytest.raises(InvalidArgument) as spec:
        parse_policy("p", {"chain": [{"top_k": {"k": k}}], "select": "sample"})
    assert spec.value.field == "spec.chain[0].top_k.k"


# -- top_p, rule hf: Hugging Face's TopPLogitsWarper bit for bit --------------------------------
def top_p_hf_rows(logits: torch.Tensor, p: float, min_keep: int = 1, **extra) -> torch.Tensor:
    """`TopP` with `rule: hf` on every row of `logits` (dense processed logits)."""
    rows = logits.shape[0]
    out, _, _ = run(TopP, logits, p=[p] * rows, min_keep=[min_keep] * rows,
                    rule=["hf"] * rows, **extra)
    return out


@st.composite
def hf_top_p_cases(draw):
    """(logits [1, V], p, min_keep): normal rows, rows with ties (rounded), rows with masked
    entries, and p on Hugging Face's boundary: 1 − p equal (in float32) to an ascending
    cumulative probability, or one float32 step either side of it."""
    vocab = draw(st.integers(2, 600))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.sampled_from([0.3, 2.0, 6.0, 15.0]))
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        logits = torch.round(logits * 2) / 2  # ties
    masked = draw(st.integers(0, vocab - 1))
    if masked and draw(st.booleans()):
        logits[0, torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:masked]] \
            = -INF
    min_keep = draw(st.integers(1, 4))
    if draw(st.booleans()):
        p = draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
    else:
        ascending = torch.sort(logits, descending=False)[0].softmax(dim=-1).cumsum(dim=-1)[0]
        c = ascending[draw(st.integers(0, vocab - 1))]
        c = [c, torch.nextafter(c, torch.tensor(2.0)), torch.nextafter(c, torch.tensor(-1.0))][
            draw(st.integers(0, 2))]
        p = 1.0 - float(c)
        assume(0.0 < p < 1.0)
    return logits, p, min_keep


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hf_top_p_cases())
def test_top_p_rule_hf_equals_transformers_top_p_warper(transformers, case):
    logits, p, min_keep = case
    theirs = transformers.TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(None, logits.clone())
    ours = top_p_hf_rows(logits, p, min_keep)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_top_p_rules_differ_on_hugging_faces_boundary(transformers):
    """Where 1 − p equals an ascending float32 cumsum, Hugging Face's float32 comparison and the
    exact rule's float64 sums part ways on many rows: `rule: hf` is the one that agrees."""
    differ = 0
    for seed in range(40):
        logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(seed)) * 2
        ascending = torch.sort(logits)[0].softmax(dim=-1).cumsum(dim=-1)[0]
        p = 1.0 - float(ascending[600 + seed])
        theirs = torch.isfinite(transformers.TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(torch.isfinite(top_p_hf_rows(logits, p)), theirs)
        exact, _, _ = run(TopP, logits, p=[p], rule=["exact"])
        differ += not torch.equal(torch.isfinite(exact), theirs)
    assert differ > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k, p", [(50, 0.9), (5, 0.5), (400, 0.99)])
def test_top_p_rule_hf_after_top_k_equals_transformers_chain(seed, k, p, transformers):
    """After a top-k the batch is sparse; the hf rule works on the whole rows (−inf where top-k
    removed a token), as Hugging Face's TopPLogitsWarper does after its TopKLogitsWarper."""
    logits = random_logits(seed, rows=3)
    candidates = Candidates(logits.clone())
    batch = RowBatch([make_state() for _ in range(3)], CPU)
    TopK().apply(candidates, {"k": torch.tensor([k] * 3)}, batch)
    assert not candidates.dense
    TopP().apply(candidates, {"p": torch.tensor([p] * 3, dtype=torch.float64),
                              "rule": ["hf"] * 3}, batch)
    theirs = transformers.TopPLogitsWarper(p)(None, transformers.TopKLogitsWarper(k)(
        None, logits.clone()))
    ours = candidates.to_dense()
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_top_p_mixed_rules_and_off_rows_equal_each_row_alone():
    logits = random_logits(4, rows=4)
    out, _, candidates = run(TopP, logits, p=[0.8, 0.8, 1.0, 0.3],
                             rule=["hf", "exact", "hf", "exact"])
    assert candidates.dense
    assert torch.equal(out[2], logits[2])  # p = 1: off under either rule
    for row, rule in ((0, "hf"), (1, "exact"), (3, "exact")):
        alone, _, _ = run(TopP, logits[row], p=[[0.8, 0.8, 1.0, 0.3][row]], rule=[rule])
        assert torch.equal(out[row], alone[0])


def test_top_p_hf_rule_as_a_flat_parameter_and_in_a_spec():
    from sampler_service.errors import InvalidArgument
    flat = resolve_flat({"top_p": 0.9, "top_p_rule": "hf"})
    link = next(l for l in flat.links if l.stage.key == "top_p")
    assert link.values["rule"] == "hf" and link.values["p"] == 0.9
    assert resolve_flat({"top_p": 0.9}).links[-1].values["rule"] == "exact"
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"top_p": 0.9, "top_p_rule": "vllm"})
    assert err.value.field == "params.top_p_rule" and "exact, hf" in err.value.message
    spec = parse_policy("p", {"chain": [{"top_p": {"p": 0.9, "rule": "hf"}}], "select": "sample"})
    assert dict(spec.chain[0][1])["rule"] == "hf"


def test_top_p_hf_rule_through_the_engine_uses_p_as_written(transformers):
    """The engine hands top_p's p to the stage in float64 (the value as written), so 1 − p is
    Hugging Face's Python float arithmetic; float32 p would move this boundary."""
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(5)) * 2
    ascending = torch.sort(logits)[0].softmax(dim=-1).cumsum(dim=-1)[0]
    moved = 0
    for index in range(500, 1000, 7):
        p = 1.0 - float(ascending[index])
        if not 0.0 < p < 1.0:
            continue
        state = make_state(top_p=p, top_p_rule="hf")
        ours = torch.isfinite(Engine(CPU).distribution(state, logits[0]))
        theirs = torch.isfinite(transformers.TopPLogitsWarper(p)(None, logits.clone())[0])
        assert torch.equal(ours, theirs), index
        rounded = float(torch.tensor(p, dtype=torch.float32))
        moved += not torch.equal(theirs, torch.isfinite(
            transformers.TopPLogitsWarper(rounded)(None, logits.clone())[0]))
    assert moved > 0


def test_min_tokens_still_masks_eos_under_ignore_eos():
    """vLLM's min_tokens masks `all_stop_token_ids`, which keep the model's EOS when
    ignore_eos is set: so does ours."""
    logits = torch.arange(8, dtype=torch.float32).expand(2, 8).clone()
    states = [make_state(eos=(5,), stop_token_ids=[2], ignore_eos=ignore)
              for ignore in (True, False)]
    assert states[0].stop_ids == {2} and states[0].min_tokens_ids == {2, 5}
    out, _, _ = run(MinTokens, logits, states, min_tokens=[1, 1])
    assert kept(out[0]) == kept(out[1]) == {0, 1, 3, 4, 6, 7}
