"""The adaptive family (issue 5): llama.cpp's dynamic temperature (`temp_ext`), EDT,
Hot-or-Cold / AdapT, KL-guided temperature and SED's chaotic points.

Each stage on tiny hand-computed distributions (and `temp_ext` against a line-by-line
transcription of llama.cpp's `llama_sampler_temp_ext_apply`), on dense and sparse batches,
alone and in batches with rows whose parameters are off, with its explanation per row, and
through `Engine.step` from a policy spec.
"""
from __future__ import annotations

import math

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import PROCESSORS, RowBatch
from sampler_service.policy.processors.adaptive import (Edt, HotOrCold, KlTemperature, Sed,
                                                        TempExt)
from sampler_service.policy.statistics import RawStatistics
from sampler_service.policy.processors.base import RowInputs
from sampler_service.policy.processors.truncation import TopK
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState
from tests.unit.helpers import random_logits

CPU = torch.device("cpu")
INF = math.inf
LN2, LN3 = math.log(2.0), math.log(3.0)
FLAT = resolve_flat({})
_DTYPES = {"float": torch.float32, "int": torch.int64}


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def log(values) -> torch.Tensor:
    return torch.log(t(values))


def rows_of(logits) -> torch.Tensor:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    return logits.unsqueeze(0) if logits.dim() == 1 else logits


def make_batch(raw: torch.Tensor, reference: torch.Tensor | None = None,
               states=None) -> RowBatch:
    states = states or [SequenceState("s", FLAT, (), 0, frozenset()) for _ in range(raw.shape[0])]
    return RowBatch(states, CPU, RowInputs(raw.clone(), reference=reference))


def args_for(cls, rows: int, given: dict) -> dict:
    """Every parameter of `cls` across `rows`, as the engine builds them: scalars as [rows]
    tensors, other kinds as one value per row; a given list is one value per row."""
    out = {}
    for p in cls.params:
        value = given.get(p.name, p.default)
        per_row = isinstance(value, list) and (p.kind != "int_list" or (
            bool(value) and isinstance(value[0], (list, tuple))))
        values = value if per_row else [value] * rows
        if p.kind == "int_list":
            values = [tuple(v) for v in values]
        out[p.name] = torch.tensor(values, dtype=_DTYPES[p.kind]) if p.kind in _DTYPES else values
    return out


def apply(cls, candidates: Candidates, batch: RowBatch, **given) -> Candidates:
    """One stage, as the engine runs it (which clears `pristine` after a stage)."""
    cls().apply(candidates, args_for(cls, candidates.rows, given), batch)
    batch.pristine = False
    return candidates


def run(cls, logits, batch: RowBatch | None = None, **given) -> tuple[torch.Tensor, RowBatch]:
    """`cls` on a dense batch of `logits` (also the raw inputs unless `batch` says otherwise);
    the processed logits (dense) and the batch (greedy flags, explanations)."""
    logits = rows_of(logits)
    batch = batch or make_batch(logits)
    return apply(cls, Candidates(logits.clone()), batch, **given).to_dense(), batch


def explained(batch: RowBatch, row: int = 0) -> dict:
    return batch.explanation_for(row)


# -- temp_ext (llama.cpp dynamic temperature) ------------------------------------------------
def llama_temp_ext(logits: list[float], temp: float, delta: float, exponent: float) -> float | None:
    """Line-by-line transcription of llama.cpp's `llama_sampler_temp_ext_apply` over the finite
    candidates (float64): the temperature it divides by, None when it returns early."""
    if delta <= 0:
        return temp
    min_temp, max_temp = max(0.0, temp - delta), temp + delta
    cur = [l for l in logits if l > -INF]
    if len(cur) <= 1:
        return None
    max_entropy = -math.log(1.0 / len(cur))
    top = max(cur)
    weights = [math.exp(l - top) for l in cur]
    probs = [w / sum(weights) for w in weights]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return min_temp + (max_temp - min_temp) * (entropy / max_entropy) ** exponent


# p = 1/2, 1/4, 1/4: H = 1.5 ln 2 over N = 3 candidates (a fourth masked).
HALF_QUARTERS = log([0.5, 0.25, 0.25, 0.0])


@pytest.mark.parametrize("temperature, delta, exponent, expected", [
    (1.0, 0.5, 1.0, 0.5 + 1.0 * (1.5 * LN2 / LN3)),          # T ∈ [0.5, 1.5]
    (1.0, 0.5, 2.0, 0.5 + 1.0 * (1.5 * LN2 / LN3) ** 2),
    (0.3, 0.5, 1.0, 0.0 + 0.8 * (1.5 * LN2 / LN3)),          # T_min clamps at 0
])
def test_temp_ext_hand_computed(temperature, delta, exponent, expected):
    out, batch = run(TempExt, HALF_QUARTERS, temperature=temperature, delta=delta,
                     exponent=exponent)
    assert torch.allclose(out[0, :3], HALF_QUARTERS[:3] / expected, rtol=1e-6)
    assert out[0, 3] == -INF
    said = explained(batch)["temp_ext"]
    assert said["candidates"] == 3  # the masked token is not a candidate
    assert said["normalized_entropy"] == pytest.approx(1.5 * LN2 / LN3, rel=1e-6)
    assert said["temperature"] == pytest.approx(expected, rel=1e-6)
    assert not batch.greedy.any()


def test_temp_ext_uniform_candidates_get_the_top_of_the_range():
    out, batch = run(TempExt, torch.zeros(8), temperature=0.8, delta=0.3)
    assert explained(batch)["temp_ext"]["normalized_entropy"] == pytest.approx(1.0, rel=1e-6)
    assert explained(batch)["temp_ext"]["temperature"] == pytest.approx(1.1, rel=1e-6)


def test_temp_ext_delta_zero_is_plain_temperature():
    out, batch = run(TempExt, HALF_QUARTERS, temperature=0.5)
    assert torch.equal(out, rows_of(HALF_QUARTERS) / 0.5)
    assert explained(batch) == {"temp_ext": {"temperature": 0.5}}


def test_temp_ext_single_candidate_is_left_alone():
    row = t([-INF, 2.0, -INF])
    out, batch = run(TempExt, row, temperature=0.5, delta=0.4)
    assert torch.equal(out[0], row)
    assert explained(batch) == {"temp_ext": {"candidates": 1}}  # no temperature was applied
    assert not batch.greedy.any()


@pytest.mark.parametrize("given", [
    {"temperature": 0.0},                                  # plain temperature 0
    {"temperature": 0.2, "delta": 0.5, "exponent": 1.0},   # T_min = 0 and H ≈ 0
])
def test_temp_ext_near_zero_temperature_marks_greedy(given):
    row = t([0.0, -30.0, -30.0])
    out, batch = run(TempExt, row, **given)
    assert torch.equal(out[0], row)  # logits left as they are
    assert batch.greedy.tolist() == [True]
    assert explained(batch)["temp_ext"]["temperature"] < 1e-5


def test_temp_ext_mixes_dynamic_plain_and_off_rows():
    logits = random_logits(8, rows=3, vocab=50)
    out, batch = run(TempExt, logits, temperature=[0.9, 0.6, 1.0], delta=[0.4, 0.0, 0.0])
    dynamic, _ = run(TempExt, logits[0], temperature=0.9, delta=0.4)
    assert torch.equal(out[0], dynamic[0])
    assert torch.equal(out[1], logits[1] / 0.6)
    assert torch.equal(out[2], logits[2])
    assert set(explained(batch, 0)["temp_ext"]) == {"temperature", "candidates",
                                                    "normalized_entropy"}
    assert explained(batch, 1) == {"temp_ext": {"temperature": pytest.approx(0.6)}}
    assert explained(batch, 2) == {}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature, delta, exponent", [(0.8, 0.5, 1.0), (1.2, 0.4, 0.5),
                                                         (0.3, 0.7, 2.0)])
def test_temp_ext_matches_llama_cpp(seed, temperature, delta, exponent):
    logits = random_logits(seed, rows=3, vocab=200, scale=2.0)
    logits[1, 50:] = -INF  # after a truncation: 50 candidates
    out, batch = run(TempExt, logits, temperature=temperature, delta=delta, exponent=exponent)
    for row in range(3):
        theirs = llama_temp_ext(logits[row].tolist(), temperature, delta, exponent)
        assert explained(batch, row)["temp_ext"]["temperature"] == pytest.approx(theirs, rel=1e-5)
        assert torch.allclose(out[row], logits[row] / theirs, rtol=1e-5)


# -- EDT --------------------------------------------------------------------------------------
def test_edt_hand_computed():
    # Uniform over 4 (a fifth masked): H = ln 4. θ = ln 4 makes θ / H = 1, so T = 0.8 · T0.
    row = t([1.0, 1.0, 1.0, 1.0, -INF])
    out, batch = run(Edt, row, t0=0.9, theta=math.log(4.0), base=0.8)
    assert explained(batch)["edt"]["entropy"] == pytest.approx(math.log(4.0), rel=1e-6)
    assert explained(batch)["edt"]["temperature"] == pytest.approx(0.72, rel=1e-6)
    assert torch.allclose(out[0, :4], row[:4] / 0.72, rtol=1e-6)
    # p = 1/2, 1/4, 1/4: T = 0.8^(1 / (1.5 ln 2)) with the defaults (T0 = 1, θ = 1, N = 0.8).
    out, batch = run(Edt, HALF_QUARTERS)
    expected = 0.8 ** (1.0 / (1.5 * LN2))
    assert explained(batch)["edt"]["temperature"] == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(out[0, :3], HALF_QUARTERS[:3] / expected, rtol=1e-6)


def test_edt_temperature_falls_with_entropy():
    confident, unsure = log([0.9, 0.05, 0.05]), log([0.4, 0.3, 0.3])
    _, batch = run(Edt, torch.stack([confident, unsure]), t0=1.0, theta=0.5)
    low = explained(batch, 0)["edt"]["temperature"]
    high = explained(batch, 1)["edt"]["temperature"]
    assert 0 < low < high < 1.0


def test_edt_zero_entropy_is_greedy_and_theta_zero_is_plain_temperature():
    single = t([-INF, 3.0, -INF, -INF])
    out, batch = run(Edt, single, t0=0.8, theta=1.0)
    assert torch.equal(out[0], single) and batch.greedy.tolist() == [True]
    assert explained(batch)["edt"] == {"temperature": 0.0, "entropy": 0.0}
    out, batch = run(Edt, HALF_QUARTERS, t0=0.5, theta=0.0)
    assert torch.equal(out, rows_of(HALF_QUARTERS) / 0.5)
    assert explained(batch)["edt"]["temperature"] == 0.5
    out, batch = run(Edt, single, t0=0.5, theta=0.0)  # θ = 0 and H = 0: T0, not 0 / 0
    assert torch.equal(out, rows_of(single) / 0.5) and not batch.greedy.any()
    assert explained(batch)["edt"] == {"temperature": 0.5, "entropy": 0.0}


@pytest.mark.parametrize("cls, given", [(Edt, {"t0": 0.8}), (TempExt, {"delta": 0.5})])
def test_row_without_candidates_is_left_for_the_engine(cls, given):
    logits = torch.stack([t([-INF, -INF, -INF]), t([1.0, 2.0, 3.0])])
    out, batch = run(cls, logits, **given)
    assert torch.equal(out[0], logits[0])  # still all −inf (not NaN): the engine reports it
    assert cls.key not in explained(batch, 0) or "temperature" not in explained(batch, 0)[cls.key]
    assert not torch.equal(out[1], logits[1])


def test_edt_first_in_the_chain_reuses_the_raw_entropy():
    logits = random_logits(5, rows=2, vocab=100)
    batch = make_batch(logits)
    batch.inputs = RowInputs(logits, RawStatistics(torch.zeros(2), torch.tensor([0.5, 2.0]),
                                                   torch.zeros(2)))
    run(Edt, logits, batch, t0=1.0, theta=1.0, base=0.8)
    assert [explained(batch, r)["edt"]["entropy"] for r in range(2)] == [0.5, 2.0]
    assert explained(batch, 1)["edt"]["temperature"] == pytest.approx(0.8 ** 0.5)


def test_edt_reads_the_candidates_at_its_point_of_the_chain():
    logits = random_logits(3, rows=1, vocab=100)
    candidates = Candidates(logits.clone())
    batch = make_batch(logits)
    apply(TopK, candidates, batch, k=5)
    apply(Edt, candidates, batch)
    kept = torch.topk(logits[0], 5).values
    p = torch.softmax(kept.double(), dim=0)
    entropy = float(-(p * p.log()).sum())
    assert explained(batch)["edt"]["entropy"] == pytest.approx(entropy, rel=1e-5)


# -- Hot-or-Cold / AdapT ----------------------------------------------------------------------
NEWLINE = 198


def test_hot_or_cold_newline_rule():
    states = [SequenceState("a", FLAT, (1,), 0, frozenset(), [5, NEWLINE]),   # after a newline
              SequenceState("b", FLAT, (1,), 0, frozenset(), [NEWLINE, 5]),   # not
              SequenceState("c", FLAT, (4, NEWLINE), 0, frozenset(), []),     # prompt ends in one
              SequenceState("d", FLAT, (), 0, frozenset(), []),               # nothing before
              SequenceState("e", FLAT, (1,), 0, frozenset(), [13])]           # another newline id
    logits = random_logits(4, rows=5, vocab=300)
    out, batch = run(HotOrCold, logits, make_batch(logits, states=states), hot=1.5, cold=0.5,
                     newline_ids=[[NEWLINE, 13]] * 5)
    challenging = [True, False, True, False, True]
    for row, hard in enumerate(challenging):
        expected = 1.5 if hard else 0.5
        assert torch.equal(out[row], logits[row] / expected)
        assert explained(batch, row)["hot_or_cold"] == {"challenging": hard,
                                                         "temperature": expected}


def test_hot_or_cold_entropy_rule_and_mixed_rules():
    flat = torch.zeros(64)                     # H = ln 64 ≈ 4.16 nats
    peaked = log([0.97] + [0.03 / 63] * 63)    # H ≈ 0.26 nats
    logits = torch.stack([flat, peaked, flat])
    states = [SequenceState(str(i), FLAT, (NEWLINE,), 0, frozenset()) for i in range(3)]
    out, batch = run(HotOrCold, logits, make_batch(logits, states=states), hot=1.2, cold=0.0,
                     rule=["entropy", "entropy", "newline"], newline_ids=[[NEWLINE]] * 3,
                     entropy_threshold=2.0)
    decided = [explained(batch, r)["hot_or_cold"]["challenging"] for r in range(3)]
    assert decided == [True, False, True]
    assert torch.equal(out[0], flat / 1.2)
    assert torch.equal(out[1], peaked) and batch.greedy.tolist() == [False, True, False]
    assert torch.equal(out[2], flat / 1.2)  # row 2 follows the newline rule: its prompt ends in one


def test_hot_or_cold_entropy_rule_reads_the_raw_distribution():
    """A truncation before it does not change the decision: the rule reads the raw entropy."""
    flat = torch.arange(64, dtype=torch.float32).unsqueeze(0) * 0.01  # H ≈ ln 64 − 0.003
    candidates = Candidates(flat.clone())
    batch = make_batch(flat)
    apply(TopK, candidates, batch, k=1)
    apply(HotOrCold, candidates, batch, hot=2.0, cold=0.5, rule="entropy", entropy_threshold=3.0)
    assert explained(batch)["hot_or_cold"] == {"challenging": True, "temperature": 2.0}


# -- KL-guided temperature --------------------------------------------------------------------
def kl_temperature(kl: float, t0: float, t_min: float, scale: float) -> float:
    return t_min + (t0 - t_min) * math.exp(-kl / scale)


def test_kl_temperature_hand_computed():
    raw = torch.stack([log([0.5, 0.5, 0.0]), log([0.5, 0.5, 0.0]), log([0.5, 0.5, 0.0])])
    reference = torch.stack([log([0.25, 0.75, 0.0]),   # KL = ½ ln 2 + ½ ln ⅔ = ½ ln (4/3)
                             log([0.5, 0.5, 0.0]),     # KL = 0
                             log([1.0, 0.0, 0.0])])    # p_ref(1) = 0 < p(1): KL = +inf
    out, batch = run(KlTemperature, raw, make_batch(raw, reference), t0=1.0, t_min=0.2, scale=0.5)
    kls = [0.5 * math.log(4 / 3), 0.0, INF]
    for row, kl in enumerate(kls):
        said = explained(batch, row)["kl_temperature"]
        expected = kl_temperature(kl, 1.0, 0.2, 0.5)
        assert said["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-7)
        assert said["temperature"] == pytest.approx(expected, rel=1e-6)
        assert torch.allclose(out[row, :2], raw[row, :2] / expected, rtol=1e-6)
    assert torch.equal(out[1], raw[1])  # KL = 0 and t0 = 1: T = 1 exactly


def test_kl_temperature_reads_raw_logits_whatever_the_chain_did():
    raw = random_logits(6, rows=2, vocab=120)
    reference = random_logits(7, rows=2, vocab=120)
    batch = make_batch(raw, reference)
    sparse = apply(TopK, Candidates(raw.clone()), batch, k=10)
    apply(KlTemperature, sparse, batch, t0=1.0, t_min=0.1)
    p, q = torch.log_softmax(raw.double(), 1), torch.log_softmax(reference.double(), 1)
    kl = (p.exp() * (p - q)).sum(1)
    for row in range(2):
        assert explained(batch, row)["kl_temperature"]["kl"] == pytest.approx(float(kl[row]),
                                                                               rel=1e-4)


def test_kl_temperature_zero_is_greedy_and_reference_is_required_only_when_on():
    raw, reference = log([[0.5, 0.5]]), log([[1.0, 0.0]])  # KL = +inf: T = t_min = 0
    out, batch = run(KlTemperature, raw, make_batch(raw, reference), t0=1.0, t_min=0.0)
    assert torch.equal(out, raw) and batch.greedy.tolist() == [True]
    with pytest.raises(InvalidArgument) as error:
        run(KlTemperature, raw, t0=1.0, t_min=0.5)
    assert error.value.field == "reference_logits" and "kl_temperature" in str(error.value)
    out, batch = run(KlTemperature, raw, t0=1.0, t_min=1.0)  # off: no reference needed
    assert torch.equal(out, raw) and explained(batch) == {}


# -- SED chaotic points -----------------------------------------------------------------------
SED_ROW = log([0.5, 0.3, 0.2])  # H = 1.0297 nats; p(2) / p(1) = 0.6
SED_ENTROPY = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))


@pytest.mark.parametrize("entropy_threshold, ratio_threshold, chaotic", [
    (2.0, 0.5, True),    # ratio 0.6 > 0.5
    (2.0, 0.7, False),   # neither
    (1.0, 0.7, True),    # entropy 1.03 > 1.0
    (1.0, 0.0, True),    # the ratio criterion off, the entropy one fires
    (0.0, 0.7, False),   # the entropy criterion off
    (INF, 0.5, True),    # +inf turns the entropy criterion off too
    (2.0, 1.0, False),   # a ratio threshold of 1 never fires
])
def test_sed_flags(entropy_threshold, ratio_threshold, chaotic):
    candidates = Candidates(rows_of(SED_ROW).clone())
    values = candidates.values
    batch = make_batch(rows_of(SED_ROW))
    apply(Sed, candidates, batch, entropy_threshold=entropy_threshold,
          ratio_threshold=ratio_threshold)
    assert candidates.values is values and torch.equal(values, rows_of(SED_ROW))  # monitor only
    said = explained(batch)["sed"]
    assert said["chaotic"] is chaotic
    assert said["entropy"] == pytest.approx(SED_ENTROPY, rel=1e-6)
    assert said["top2_ratio"] == pytest.approx(0.6, rel=1e-6)


def test_sed_single_finite_token_has_ratio_zero():
    raw = t([[-INF, 1.0, -INF]])
    _, batch = run(Sed, raw, entropy_threshold=0.5, ratio_threshold=0.1)
    assert explained(batch)["sed"] == {"chaotic": False, "entropy": 0.0, "top2_ratio": 0.0}


# -- every stage: off rows, mixed batches, dense and sparse -----------------------------------
#: (processor, parameters that turn it on, parameters that leave a row off).
FAMILY = [
    (TempExt, {"temperature": 0.8, "delta": 0.5}, {"temperature": 1.0, "delta": 0.0}),
    (TempExt, {"temperature": 0.7, "delta": 0.0}, {"temperature": 1.0, "delta": 0.0}),
    (Edt, {"t0": 0.9, "theta": 1.0}, {"t0": 1.0, "theta": 0.0}),
    (Edt, {"t0": 0.9, "theta": 1.0, "base": 0.8}, {"t0": 1.0, "theta": 1.0, "base": 1.0}),
    (HotOrCold, {"hot": 1.3, "cold": 0.6, "newline_ids": [NEWLINE]},
     {"hot": 1.0, "cold": 1.0, "newline_ids": [NEWLINE]}),
    (HotOrCold, {"hot": 1.3, "cold": 0.6, "rule": "entropy", "entropy_threshold": 4.0},
     {"hot": 1.0, "cold": 1.0, "rule": "entropy", "entropy_threshold": 4.0}),
    (KlTemperature, {"t0": 0.9, "t_min": 0.2}, {"t0": 1.0, "t_min": 1.0}),
]
FAMILY_IDS = [f"{cls.key}-{i}" for i, (cls, _, _) in enumerate(FAMILY)]


def _mixed(on: dict, off: dict, pattern: list[bool]) -> dict:
    return {name: [(on if row else off)[name] for row in pattern] for name in on}


def _states(rows: int) -> list[SequenceState]:
    """Sequences half of which just produced a newline (hot_or_cold's rule)."""
    return [SequenceState(f"s{i}", FLAT, (1,), 0, frozenset(), [7, NEWLINE if i % 2 else 9])
            for i in range(rows)]


def _batch(logits: torch.Tensor) -> RowBatch:
    return make_batch(logits, random_logits(99, rows=logits.shape[0], vocab=logits.shape[1]),
                      _states(logits.shape[0]))


@pytest.mark.parametrize("cls, on, off", FAMILY, ids=FAMILY_IDS)
def test_batch_equals_single_rows_and_off_rows_are_bit_identical(cls, on, off):
    logits = random_logits(11, rows=5, vocab=200, scale=2.5)
    pattern = [True, False, True, True, False]
    batch = _batch(logits)
    out = apply(cls, Candidates(logits.clone()), batch, **_mixed(on, off, pattern)).to_dense()
    for row, is_on in enumerate(pattern):
        single = RowBatch([batch.states[row]], CPU, batch.inputs.select(torch.tensor([row])))
        alone = apply(cls, Candidates(logits[row:row + 1].clone()), single,
                      **{k: [v] for k, v in (on if is_on else off).items()}).to_dense()[0]
        assert torch.equal(out[row], alone)
        if is_on:
            assert not torch.equal(out[row], logits[row])
            assert cls.key in explained(batch, row)
            assert explained(batch, row) == explained(single, 0)
        else:
            assert torch.equal(out[row], logits[row])
            assert explained(batch, row) == {}  # an off row has nothing to say
    assert not batch.greedy.any()


@pytest.mark.parametrize("cls, on, off", FAMILY + [(Sed, {}, {"entropy_threshold": 0.0,
                                                              "ratio_threshold": 0.0})],
                         ids=FAMILY_IDS + ["sed"])
def test_all_rows_off_returns_untouched(cls, on, off):
    logits = random_logits(12, rows=3, vocab=50)
    candidates = Candidates(logits.clone())
    values = candidates.values
    batch = make_batch(logits, states=_states(3))  # no reference: off rows need none
    apply(cls, candidates, batch, **off)
    assert candidates.dense and candidates.values is values
    assert torch.equal(values, logits)
    assert batch.explanations == {} and not batch.greedy.any()


@pytest.mark.parametrize("cls, on, off", FAMILY + [(Sed, {}, {"entropy_threshold": 0.0,
                                                              "ratio_threshold": 0.0})],
                         ids=FAMILY_IDS + ["sed"])
def test_dense_and_sparse_batches_agree(cls, on, off):
    """The same rows after a top-k that turns the batch sparse (its order disturbed as a
    penalty would), and dense with −inf entries. Stages that read the candidates' entropy may
    differ by the float32 rounding of its sum; those that read the raw inputs agree exactly."""
    logits = random_logits(13, rows=4, vocab=300, scale=2.0)
    batch_sparse, batch_dense = _batch(logits), _batch(logits)
    sparse = apply(TopK, Candidates(logits.clone()), batch_sparse, k=60)
    assert not sparse.dense
    rows = torch.arange(4).repeat_interleave(2)
    tokens = sparse.ids[:, 30:32].reshape(-1).clone()
    present, columns = sparse.locate(rows, tokens)
    sparse.update(rows[present], columns, sparse.values[rows[present], columns] + 3.0)
    dense = Candidates(sparse.to_dense().clone())
    batch_dense.pristine = False  # its candidates come from the top-k, not the raw logits
    given = _mixed(on, off, [True, True, False, True])
    apply(cls, sparse, batch_sparse, **given)
    apply(cls, dense, batch_dense, **given)
    reads_candidates = cls in (TempExt, Edt)
    ours, theirs = sparse.to_dense(), dense.to_dense()
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    if reads_candidates:
        assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)],
                              rtol=1e-6, atol=0)
    else:
        assert torch.equal(ours, theirs)
    assert torch.equal(ours[2], theirs[2])  # the off row
    for row in range(4):
        mine, other = explained(batch_sparse, row), explained(batch_dense, row)
        assert mine.keys() == other.keys()
        for key in mine:
            assert mine[key].keys() == other[key].keys()
            for name, value in mine[key].items():
                if isinstance(value, bool):
                    assert value is other[key][name]
                else:
                    assert value == pytest.approx(other[key][name], rel=1e-6)


def test_every_adaptive_stage_is_registered_and_explains():
    for cls in (TempExt, Edt, HotOrCold, KlTemperature, Sed):
        assert PROCESSORS[cls.key] is cls
        assert "Off:" in cls.__doc__ and "Explains" in cls.__doc__


@pytest.mark.parametrize("entry, field", [
    ({"edt": {"base": 0.0}}, "spec.chain[0].edt.base"),
    ({"edt": {"base": 1.5}}, "spec.chain[0].edt.base"),
    ({"temp_ext": {"exponent": -0.1}}, "spec.chain[0].temp_ext.exponent"),
    ({"hot_or_cold": {"rule": "indent"}}, "spec.chain[0].hot_or_cold.rule"),
    ({"hot_or_cold": {"newline_ids": [-1]}}, "spec.chain[0].hot_or_cold.newline_ids"),
    ({"kl_temperature": {"scale": 0.0}}, "spec.chain[0].kl_temperature.scale"),
    ({"sed": {"ratio_threshold": 1.5}}, "spec.chain[0].sed.ratio_threshold"),
])
def test_invalid_parameters_name_the_field(entry, field):
    with pytest.raises(InvalidArgument) as error:
        parse_policy("bad", {"chain": [entry], "select": "sample"})
    assert error.value.field == field


# -- through the engine ------------------------------------------------------------------------
def engine_policy(chain: list, select="sample"):
    return resolve(parse_policy("adaptive", {"chain": chain, "select": select}),
                   PolicyVersion(1, "x"), {})


def test_engine_step_carries_each_rows_explanation():
    adaptive = engine_policy([{"edt": {"t0": 1.0, "theta": 1.0}}, {"sed": {}},
                              {"temp_ext": {"temperature": 1.0, "delta": 0.5}}])
    plain = resolve_flat({"temperature": 0.7})
    states = [SequenceState("a", adaptive, (1,), 3, frozenset()),
              SequenceState("b", plain, (1,), 4, frozenset()),
              SequenceState("c", adaptive, (1,), 5, frozenset(), [2])]
    logits = torch.stack([log([0.5, 0.25, 0.25, 0.0]), torch.zeros(4), log([0.5, 0.3, 0.2, 0.0])])
    outcomes = Engine(CPU).step(states, logits.clone())
    first = outcomes[0].explanation
    edt_t = 0.8 ** (1.0 / (1.5 * LN2))
    assert first["edt"]["temperature"] == pytest.approx(edt_t, rel=1e-6)
    assert first["edt"]["entropy"] == pytest.approx(1.5 * LN2, rel=1e-6)
    # H = 1.04 < 2 and p(2) / p(1) = 0.5, not above 0.5: not chaotic.
    assert first["sed"] == {"chaotic": False, "entropy": pytest.approx(1.5 * LN2, rel=1e-6),
                            "top2_ratio": pytest.approx(0.5, rel=1e-6)}
    # temp_ext reads the candidates after EDT's temperature: their entropy is lower than raw.
    assert first["temp_ext"]["candidates"] == 3
    assert first["temp_ext"]["normalized_entropy"] < 1.5 * LN2 / LN3
    assert outcomes[1].explanation == {}  # the flat policy has no adaptive stage
    assert outcomes[2].explanation["sed"]["chaotic"] is True  # ratio 0.6 > 0.5
    assert outcomes[2].explanation["sed"]["top2_ratio"] == pytest.approx(0.6, rel=1e-6)


def test_engine_greedy_from_a_dynamic_temperature_and_kl_reference():
    policy = engine_policy([{"kl_temperature": {"t0": 1.0, "t_min": 0.0, "scale": 1.0}}])
    states = [SequenceState(f"s{i}", policy, (1,), i, frozenset()) for i in range(2)]
    logits = torch.stack([t([0.0, 0.1, 0.2, 0.0]), t([0.0, 0.1, 0.2, 0.0])])
    reference = torch.stack([t([0.0, 0.1, -INF, 0.0]), t([0.0, 0.1, 0.2, 0.0])])
    for _ in range(3):  # the greedy row picks the argmax whatever the seed
        outcomes = Engine(CPU).step(states, logits.clone(), reference=reference)
        assert outcomes[0].token_id == 2
        assert outcomes[0].explanation["kl_temperature"]["kl"] == INF
        assert outcomes[0].explanation["kl_temperature"]["temperature"] == 0.0
        assert outcomes[1].explanation["kl_temperature"] == {"kl": 0.0, "temperature": 1.0}
    with pytest.raises(InvalidArgument):
        Engine(CPU).step(states, logits.clone())


def test_engine_hot_or_cold_follows_the_sequence_history():
    policy = engine_policy([{"hot_or_cold": {"hot": 1.0, "cold": 0.0,
                                             "newline_ids": [NEWLINE]}}])
    logits = random_logits(21, rows=2, vocab=300)
    states = [SequenceState("a", policy, (1,), 0, frozenset(), [NEWLINE]),
              SequenceState("b", policy, (1,), 0, frozenset(), [5])]
    outcomes = Engine(CPU).step(states, logits.clone())
    assert outcomes[0].explanation["hot_or_cold"] == {"challenging": True, "temperature": 1.0}
    assert outcomes[1].explanation["hot_or_cold"] == {"challenging": False, "temperature": 0.0}
    assert outcomes[1].token_id == int(logits[1].argmax())  # cold = 0: greedy


# -- temp_ext: llama.cpp's ranges ---------------------------------------------------------------
@pytest.mark.parametrize("temperature, delta", [(-0.5, 0.0), (-0.5, -1.0), (-1.0, 0.5),
                                                (0.0, -0.3)])
def test_temp_ext_non_positive_temperatures_are_greedy_as_llama_cpp(temperature, delta):
    """llama.cpp keeps only the best token at a temperature ≤ 0, dynamic or not; a delta ≤ 0 is
    a plain temperature. Both are taken (no range) and give a greedy row."""
    parse_policy("t", {"chain": [{"temp_ext": {"temperature": temperature, "delta": delta}}],
                       "select": "sample"})
    row = t([0.5, 2.0, -1.0, 1.5])
    out, batch = run(TempExt, row, temperature=temperature, delta=delta)
    assert torch.equal(out[0], row) and batch.greedy.tolist() == [True]
    theirs = llama_temp_ext(row.tolist(), temperature, delta, 1.0)
    assert theirs <= 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_temp_ext_negative_delta_is_plain_temperature_as_llama_cpp(seed):
    logits = random_logits(seed, rows=1, vocab=50)
    out, batch = run(TempExt, logits, temperature=0.7, delta=-0.4, exponent=2.0)
    assert llama_temp_ext(logits[0].tolist(), 0.7, -0.4, 2.0) == 0.7
    assert torch.equal(out[0], logits[0] / 0.7)
    assert explained(batch) == {"temp_ext": {"temperature": pytest.approx(0.7)}}
