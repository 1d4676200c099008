"""The `entropix` selector: each quadrant reached by a constructed row, with its adjusted
parameters computed by hand (bits, the first published rules), the clarifying token emitted
once and not twice in a row, the worker's attention signals changing the parameters, the
presets, the best-of-n law against its frequencies, determinism, batch and dense/sparse
invariance, and the explanations through `Engine.step`."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import RowBatch
from sampler_service.policy.processors.base import RowInputs
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.selectors import SELECTORS
from sampler_service.policy.selectors.entropix import (Entropix, best_of_n_log_probs,
                                                       draw_columns)
from sampler_service.policy.selectors.sample import draw_inverse_cdf
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
INF = math.inf
LN2 = math.log(2.0)
VOCAB = 4096
T0 = 0.666


def policy(chain=(), **select):
    spec = parse_policy("entropix", {"chain": list(chain), "select": {"entropix": select}})
    return resolve(spec, PolicyVersion(1, "x"), {})


def state(pol, seed=0, output=(), name="s") -> SequenceState:
    return SequenceState(name, pol, (), seed, frozenset(), list(output))


def step(states, rows, signals=None, processed=True):
    logits = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows])
    return Engine(CPU).step(states, logits, processed, signals=signals)


def explained(outcome) -> dict:
    return outcome.explanation["entropix"]


def dist(s: SequenceState, row) -> torch.Tensor:
    """q [V]: what the selector draws from for `s` (Preview's path, no signals)."""
    return torch.exp(Engine(CPU).distribution(s, torch.as_tensor(row, dtype=torch.float32)))


def bits(row: torch.Tensor) -> tuple[float, float]:
    """(H, V) in bits of softmax(row), float64."""
    log_p = torch.log_softmax(row.double(), dim=0)
    p = log_p.exp()
    log2_p = torch.where(p > 0, log_p / LN2, torch.zeros_like(log_p))
    h = float(-(p * log2_p).sum())
    return h, float((p * (log2_p + h) ** 2).sum())


def masked(values: dict[int, float], vocab: int = VOCAB) -> torch.Tensor:
    row = torch.full((vocab,), -INF)
    for token, value in values.items():
        row[token] = value
    return row


# -- constructed rows: (H, V) in bits ---------------------------------------------------------
#: One token far above the rest: H ≈ 0, V ≈ 0 (flowing).
ONE_HOT = torch.full((VOCAB,), -30.0).index_fill_(0, torch.tensor([3]), 20.0)
#: 20 equal tokens: H = log2 20 = 4.32, V = 0 (first rules: treading).
FLAT20 = masked({t: 0.0 for t in range(100, 120)})
#: 5 equal tokens: H = log2 5 = 2.32, V = 0 (first: adaptive; later: treading).
FLAT5 = masked({t: 0.0 for t in range(5)})
#: p = 0.6, 0.4: H = 0.971, V = 0.0821 (adaptive).
TWO = masked({0: math.log(0.6), 1: math.log(0.4)})


def tail_row(head: float, tail_tokens: int) -> torch.Tensor:
    """Token 0 with probability `head`, the rest spread over `tail_tokens` tokens with distinct
    logits (a spread of ±1 around the uniform tail)."""
    row = torch.full((VOCAB,), -INF)
    spread = torch.linspace(-1.0, 1.0, tail_tokens)
    tail = torch.log_softmax(spread, dim=0) + math.log(1 - head)
    row[1:tail_tokens + 1] = tail
    row[0] = math.log(head)
    return row


#: p0 = 0.5 and 0.5 over 50 tokens: H = 3.71, V = 7.63 (first: exploring; later: resampling).
FORK = tail_row(0.5, 50)
#: p0 = 0.4 and 0.6 over 4000 tokens: H ≈ 8.1, V ≈ 30 (resampling in both).
MIST = tail_row(0.4, 4000)
#: p0 = 0.9 and 0.1 over 1000 tokens: H ≈ 1.5, V ≈ 15: the later thresholds make it both
#: exploring (H < 2.1) and resampling (H > 0.7); the earlier rule wins.
SPIKY = tail_row(0.9, 1000)


def test_constructed_rows_have_the_intended_bits():
    assert bits(ONE_HOT)[0] < 1e-6 and bits(ONE_HOT)[1] < 1e-6
    assert bits(FLAT20) == pytest.approx((math.log2(20), 0.0), abs=1e-9)
    assert bits(FLAT5) == pytest.approx((math.log2(5), 0.0), abs=1e-9)
    h, v = bits(TWO)
    assert h == pytest.approx(-(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)))
    assert v == pytest.approx(0.6 * (math.log2(0.6) + h) ** 2 + 0.4 * (math.log2(0.4) + h) ** 2)
    h, v = bits(FORK)
    assert 3.0 < h < 5.0 and v > 5.8
    h, v = bits(MIST)
    assert h > 5.0 and v > 5.8
    h, v = bits(SPIKY)
    assert 0.7 < h < 2.1 and v > 5.8


# -- the spec ---------------------------------------------------------------------------------
def test_registered_with_entropix_defaults():
    assert SELECTORS["entropix"] is Entropix
    assert dict(policy().selector.values) == {
        "temperature": 0.666, "top_p": 0.9, "top_k": 27, "min_p": 0.0,
        "clarifying_token_id": -1, "n_adaptive_samples": 5, "preset": "first",
        "low_entropy": 0.1, "low_varentropy": 0.1, "helv_entropy": 3.0, "lehv_entropy": 5.0,
        "hehv_entropy": 5.0, "high_varentropy": 5.0}


@pytest.mark.parametrize("given, field", [({"preset": "middle"}, "preset"),
                                          ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
                                          ({"clarifying_token_id": -2}, "clarifying_token_id"),
                                          ({"n_adaptive_samples": 0}, "n_adaptive_samples"),
                                          ({"low_entropy": -1.0}, "low_entropy")])
def test_bad_parameters_name_the_field(given, field):
    with pytest.raises(InvalidArgument) as error:
        policy(**given)
    assert error.value.field == f"spec.select.entropix.{field}"


# -- each quadrant by hand --------------------------------------------------------------------
def test_flowing_takes_the_argmax():
    (out,) = step([state(policy())], [ONE_HOT])
    assert out.token_id == 3
    assert explained(out)["quadrant"] == "flowing" and explained(out)["action"] == "argmax"
    assert "temperature" not in explained(out)  # nothing adjusted: nothing to report
    assert out.processed_logprob == 0.0


def test_treading_emits_the_clarifying_token_once_then_samples_hotter():
    s = state(policy(clarifying_token_id=7), seed=3)
    (out,) = step([s], [FLAT20])
    assert out.token_id == 7
    assert explained(out) == pytest.approx({
        "quadrant": "treading", "action": "clarify", "entropy_bits": math.log2(20),
        "varentropy_bits": 0.0}, abs=1e-5)
    assert out.processed_logprob == 0.0  # a point mass: the token was not drawn
    s.record_step(out, VOCAB)
    (again,) = step([s], [FLAT20])  # just emitted: sample hotter instead
    assert again.token_id in range(100, 120)
    e = explained(again)
    assert e["action"] == "sample"
    assert e["temperature"] == pytest.approx(min(1.5, T0 * 1.3))
    assert (e["top_k"], e["top_p"], e["min_p"]) == (27, pytest.approx(0.9), 0.0)
    assert again.processed_logprob == pytest.approx(math.log(1 / 20), abs=1e-6)
    s.record_step(again, VOCAB)
    (third,) = step([s], [FLAT20])  # the last token is no longer the clarifying one
    assert third.token_id == 7


def test_treading_without_a_clarifying_token_samples_hotter():
    (out,) = step([state(policy())], [FLAT20])
    assert explained(out)["action"] == "sample"
    assert explained(out)["temperature"] == pytest.approx(T0 * 1.3)


def test_exploring_raises_temperature_and_widens_top_k():
    (out,) = step([state(policy())], [FORK])
    e = explained(out)
    assert (e["quadrant"], e["action"]) == ("exploring", "sample")
    assert e["temperature"] == pytest.approx(min(1.5, T0 * 1.2))
    assert e["top_k"] == 40  # max(5, int(27 · (1 + 0.5 · (1 − 0))))
    assert (e["top_p"], e["min_p"]) == (pytest.approx(0.9), 0.0)


def test_resampling_is_hot():
    (out,) = step([state(policy())], [MIST])
    e = explained(out)
    assert (e["quadrant"], e["action"]) == ("resampling", "sample")
    assert e["temperature"] == pytest.approx(2.0)  # max(2, 0.666 · 2)
    assert (e["top_k"], e["top_p"]) == (27, pytest.approx(0.9))  # max(0.5, 0.9 − 0)


def test_adaptive_parameters_by_hand():
    (out,) = step([state(policy())], [TWO])
    e = explained(out)
    h, v = bits(TWO)
    assert (e["quadrant"], e["action"]) == ("adaptive", "best_of_n")
    assert (e["entropy_bits"], e["varentropy_bits"]) == pytest.approx((h, v), rel=1e-5)
    assert e["temperature"] == pytest.approx(T0 * (1 + 0.3 * (h + v)), rel=1e-5)  # 0.8764
    assert (e["top_k"], e["top_p"]) == (27, pytest.approx(0.9))
    assert e["min_p"] == pytest.approx(0.01)  # clip(0 · (1 − 0.5 U), 0.01, 0.5)


# -- attention signals ------------------------------------------------------------------------
def signals(rows: int, **values: float) -> dict[str, torch.Tensor]:
    return {name: torch.full((rows,), value) for name, value in values.items()}


@pytest.mark.parametrize("row, sent, expected", [
    (FLAT20, {"attention_entropy": 2.0}, {"temperature": T0 * 1.7}),
    (FLAT20, {"attention_entropy": 5.0}, {"temperature": 1.5}),  # capped
    (FORK, {"interaction_strength": 1.0, "agreement": 0.4},
     {"temperature": T0 * 1.5, "top_k": 35}),                     # int(27 · 1.3) = 35
    (FORK, {"interaction_strength": 5.0, "agreement": 3.0},
     {"temperature": 1.5, "top_k": 5}),                           # capped; max(5, int(0))
    (MIST, {"attention_varentropy": 3.0, "attention_entropy": 1.0},
     {"temperature": T0 * 3.5, "top_p": 0.7}),                    # 2.331; max(0.5, 0.9 − 0.2)
    (MIST, {"attention_entropy": 3.0}, {"top_p": 0.5}),           # floored
])
def test_attention_signals_adjust_the_quadrant_parameters(row, sent, expected):
    (out,) = step([state(policy())], [row], signals=signals(1, **sent))
    e = explained(out)
    for name, value in expected.items():
        assert e[name] == pytest.approx(value, rel=1e-5), name


def test_attention_signals_adjust_the_adaptive_parameters():
    pol = policy(min_p=0.03)
    sent = signals(1, attention_entropy=1.0, attention_varentropy=1.0, agreement=0.5,
                   interaction_strength=1.0)
    (out,) = step([state(pol)], [TWO], signals=sent)
    e = explained(out)
    u = sum(bits(TWO))
    assert e["temperature"] == pytest.approx(T0 * (1 + 0.3 * u + 0.2 * 2.0 - 0.2 * 0.5), rel=1e-5)
    assert e["top_p"] == pytest.approx(0.99)                # clip(0.9 · 1.1, 0.1, 1)
    assert e["top_k"] == 32                                 # round(27 · 1.2) = round(32.4)
    assert e["min_p"] == pytest.approx(0.03 * (1 - 0.5 * u), rel=1e-5)  # 0.0142, in [0.01, 0.5]
    (plain,) = step([state(pol)], [TWO])
    assert explained(plain)["temperature"] < e["temperature"]


# -- presets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("row, first, later", [
    (ONE_HOT, "flowing", "flowing"),
    (FLAT20, "treading", "treading"),
    (FLAT5, "adaptive", "treading"),      # H = 2.32: above later's 2.1, below first's 3
    (FORK, "exploring", "resampling"),    # H = 3.7: below first's 5, above later's 2.1
    (MIST, "resampling", "resampling"),
    (SPIKY, "exploring", "exploring"),    # later: both rules match, exploring comes first
    (TWO, "adaptive", "adaptive"),        # H = 0.97: neither low nor high in either set
])
def test_presets_classify_by_their_thresholds(row, first, later):
    for preset, quadrant in (("first", first), ("later", later)):
        (out,) = step([state(policy(preset=preset))], [row])
        assert explained(out)["quadrant"] == quadrant, preset


def test_custom_thresholds_are_used_only_with_the_custom_preset():
    low = {"helv_entropy": 2.0}
    (ignored,) = step([state(policy(**low))], [FLAT5])
    (custom,) = step([state(policy(preset="custom", **low))], [FLAT5])
    assert explained(ignored)["quadrant"] == "adaptive"
    assert explained(custom)["quadrant"] == "treading"
    (flowing,) = step([state(policy(preset="custom", low_entropy=1.0, low_varentropy=0.1))],
                      [TWO])
    assert explained(flowing)["action"] == "argmax" and flowing.token_id == 0


# -- distributions ----------------------------------------------------------------------------
def reference_q(row: torch.Tensor, temperature: float, top_k: int, top_p: float,
                min_p: float) -> torch.Tensor:
    """entropix's order by sorting: softmax(l/T), min-p, top-k (ties kept), nucleus (HF)."""
    p = torch.softmax(row.double() / temperature, dim=0)
    p = torch.where(p >= min_p * p.max(), p, torch.zeros_like(p))
    kth = torch.sort(p, descending=True).values[top_k - 1]
    p = torch.where(p >= kth, p, torch.zeros_like(p))
    p = p / p.sum()
    ordered = torch.sort(p, descending=True).values
    before = ordered.cumsum(0) - ordered
    last = ordered[int((before < top_p).sum()) - 1]
    p = torch.where(p >= last, p, torch.zeros_like(p))
    return p / p.sum()


@pytest.mark.parametrize("row, temperature, top_k", [(FORK, T0 * 1.2, 40), (MIST, 2.0, 27)])
def test_sampled_rows_draw_from_the_adjusted_truncation(row, temperature, top_k):
    q = dist(state(policy()), row)
    expected = reference_q(row, temperature, top_k, 0.9, 0.0)
    assert set(q.nonzero().squeeze(1).tolist()) == set(expected.nonzero().squeeze(1).tolist())
    assert torch.allclose(q.double(), expected, atol=1e-6)
    tokens = [o.token_id for o in step([state(policy(), seed=i) for i in range(200)], [row] * 200)]
    assert set(tokens) <= set(expected.nonzero().squeeze(1).tolist())
    assert len(set(tokens)) > 3


def test_best_of_n_law_by_hand():
    h, v = bits(TWO)
    t = T0 * (1 + 0.3 * (h + v))
    q1 = 0.4 ** (1 / t) / (0.6 ** (1 / t) + 0.4 ** (1 / t))  # both kept: q0 ≈ 0.61 < 0.9
    for n in (1, 2, 5):
        q = dist(state(policy(n_adaptive_samples=n)), TWO)
        assert float(q[1]) == pytest.approx(q1 ** n, rel=1e-4)  # both of n draw token 1
        assert float(q[0]) == pytest.approx(1 - q1 ** n, rel=1e-5)


def test_best_of_n_frequencies_follow_the_law():
    """Two draws keep token 1 only when both draw it: q1² ≈ 0.149; ties in the raw logits
    (three equal tokens) keep the first draw, so the law is q itself."""
    rows = 4000
    three = masked({5: 1.0, 6: 1.0, 7: 1.0}, vocab=16)
    for row, n in ((TWO[:16], 2), (three, 5)):
        pol = policy(n_adaptive_samples=n)
        law = dist(state(pol), row)
        tokens = torch.tensor([o.token_id for o in step(
            [state(pol, seed=i, name=str(i)) for i in range(rows)], [row] * rows,
            processed=False)])
        for token in law.nonzero().squeeze(1).tolist():
            p = float(law[token])
            frequency = float((tokens == token).double().mean())
            assert abs(frequency - p) < 5 * math.sqrt(p * (1 - p) / rows), (n, token)
    assert torch.allclose(dist(state(policy()), three)[5:8], torch.full((3,), 1 / 3))


def test_best_of_n_log_probs_sums_to_one_with_ties():
    log_q = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]]))
    raw = torch.tensor([[1.0, 2.0, 2.0, 0.5, 9.0]])  # tokens 1 and 2 tie; token 4 unsupported
    law = best_of_n_log_probs(log_q, raw, torch.tensor([3])).exp()[0]
    # By raw logit: token 3 (F = 0.4), token 0 (F = 0.5), tokens 1, 2 tied (F = 1, F⁻ = 0.5).
    assert float(law[3]) == pytest.approx(0.4 ** 3)
    assert float(law[0]) == pytest.approx(0.5 ** 3 - 0.4 ** 3)
    tied = 1.0 - 0.5 ** 3
    assert float(law[1]) == pytest.approx(tied * 0.2 / 0.5)
    assert float(law[2]) == pytest.approx(tied * 0.3 / 0.5)
    assert float(law[4]) == 0.0
    assert float(law.sum()) == pytest.approx(1.0)


def test_point_rows_have_a_point_distribution_even_where_the_chain_masked_the_token():
    pol = policy([{"top_k": {"k": 10}}], clarifying_token_id=7)  # 7 is outside FLAT20's tokens
    q = dist(state(pol), FLAT20)
    assert float(q[7]) == 1.0 and int((q > 0).sum()) == 1
    assert float(dist(state(pol), ONE_HOT)[3]) == 1.0


@pytest.mark.parametrize("row", [FLAT20, ONE_HOT])
def test_clarifying_token_beyond_the_vocabulary_is_invalid_on_any_step(row):
    with pytest.raises(InvalidArgument) as error:
        step([state(policy(clarifying_token_id=VOCAB))], [row])
    assert error.value.field == "logits.shape"


def test_greedy_chain_temperature_takes_the_argmax():
    pol = policy([{"temperature": {"temperature": 0.0}}], clarifying_token_id=7)
    outs = step([state(pol), state(pol)], [MIST, FLAT20])
    assert [o.token_id for o in outs] == [0, 100]
    assert [explained(o)["action"] for o in outs] == ["argmax", "argmax"]
    assert [explained(o)["quadrant"] for o in outs] == ["resampling", "treading"]


# -- determinism, batch and dense/sparse invariance -------------------------------------------
ALL_ROWS = [ONE_HOT, FLAT20, FLAT5, TWO, FORK, MIST]


def test_same_seed_same_tokens_whatever_the_batch():
    pol = policy(clarifying_token_id=7)
    sent = signals(len(ALL_ROWS), agreement=0.2, interaction_strength=0.5)
    together = step([state(pol, seed=11 + i, name=str(i)) for i in range(len(ALL_ROWS))],
                    ALL_ROWS, signals=sent)
    again = step([state(pol, seed=11 + i, name=str(i)) for i in range(len(ALL_ROWS))],
                 ALL_ROWS, signals=sent)
    assert [o.token_id for o in together] == [o.token_id for o in again]
    for i, row in enumerate(ALL_ROWS):
        (alone,) = step([state(pol, seed=11 + i, name=str(i))], [row],
                        signals=signals(1, agreement=0.2, interaction_strength=0.5))
        assert alone.token_id == together[i].token_id
        assert alone.explanation == together[i].explanation
        assert alone.processed_logprob == pytest.approx(together[i].processed_logprob, abs=1e-6)
    seeds = {step([state(pol, seed=s)], [MIST])[0].token_id for s in range(20)}
    assert len(seeds) > 5  # the seed matters


def test_a_sparse_batch_chooses_as_the_dense_one():
    dense = policy(clarifying_token_id=7)
    sparse = policy([{"top_k": {"k": 1200}}], clarifying_token_id=7)
    for seed in range(10):
        a = step([state(dense, seed=seed, name=str(i)) for i in range(len(ALL_ROWS))], ALL_ROWS)
        b = step([state(sparse, seed=seed, name=str(i)) for i in range(len(ALL_ROWS))], ALL_ROWS)
        assert [o.token_id for o in a] == [o.token_id for o in b]


def test_draw_zero_is_the_sample_selectors_draw():
    values = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 2
    values[0, 10:] = -INF
    batch = RowBatch([state(policy(), seed=s, output=[1] * s) for s in range(6)], CPU)
    columns = draw_columns(values, batch, 4)
    assert torch.equal(columns[:, 0], draw_inverse_cdf(values, batch)[0])
    assert bool((columns[0] < 10).all())
    assert len({tuple(c) for c in columns.T.tolist()}) > 1  # the draws differ


def test_select_without_the_engine_reads_raw_inputs():
    """A RowBatch with raw inputs only (no statistics, no signals) works, as Preview's does."""
    rows = torch.stack([TWO, FLAT20])
    pol = policy(clarifying_token_id=7)
    batch = RowBatch([state(pol), state(pol)], CPU, RowInputs(rows))
    args = Engine(CPU)._stage_args(Entropix(), [pol.selector, pol.selector])
    tokens = Entropix().select(Candidates(rows.clone()), args, batch)
    assert tokens.tolist()[1] == 7 and tokens.tolist()[0] in (0, 1)
    assert batch.explanation_for(1)["entropix"]["action"] == "clarify"
