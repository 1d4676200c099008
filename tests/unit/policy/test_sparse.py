"""sampler_service.policy.sparse: the whole row's statistics from K entries and tail statistics,
the tail's bounds through temperatures, each exactness rule accepting and refusing on
constructed rows, and one NotExact that lists every refused row."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from sampler_service.engine import Engine
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.sparse import NotExact, TailBound
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.policy.statistics import raw_statistics, top_two_logits
from sampler_service.server.status import to_rpc_status
from sampler_service.state import SequenceState
from tests.unit.helpers import sparse_rows

CPU = torch.device("cpu")
INF = math.inf
#: Ids 0..7 with logits 5 … −2: sent with K = 3, ids 0, 1, 2 (5, 4, 3) and a tail max of 2.
LADDER = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]
#: The same order, flatter: K = 3 sends the same ids.
FLATTER = [value / 2 for value in LADDER]


@st.composite
def dense_rows(draw):
    """([rows, vocab] float32 logits, about one in ten −inf but each row with a finite best, K)."""
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 200))
    values = draw(arrays(np.float32, (rows, vocab), elements=st.floats(-30, 30, width=32)))
    masked = draw(arrays(np.int8, (rows, vocab), elements=st.integers(0, 9))) == 0
    masked[:, draw(st.integers(0, vocab - 1))] = False
    values[masked] = -np.inf
    return torch.from_numpy(values), draw(st.integers(1, vocab))


@settings(max_examples=150, deadline=None)
@given(dense_rows())
def test_statistics_are_the_whole_rows(case):
    logits, k = case
    stats = sparse_rows(logits, k).statistics()
    exact = raw_statistics(logits.double())
    dense = raw_statistics(logits)
    for name in ("log_normalizer", "entropy", "varentropy"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), getattr(exact, name), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(got, getattr(dense, name), atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(dense_rows(), st.integers(0, 2 ** 31))
def test_top_two_and_lookups_are_the_dense_ones(case, seed):
    logits, k = case
    sparse = sparse_rows(logits, k)
    first, second = sparse.top_two()
    expected_first, expected_second = top_two_logits(logits)
    assert torch.equal(first, expected_first) and torch.equal(second, expected_second)
    tokens = torch.randint(0, logits.shape[1], (logits.shape[0], 5),
                           generator=torch.Generator().manual_seed(seed))
    sent = (sparse.ids.unsqueeze(1) == tokens.unsqueeze(2)).any(dim=2)
    expected = torch.where(sent, logits.gather(1, tokens), torch.full(tokens.shape, -INF))
    assert torch.equal(sparse.logits_at(tokens), expected)


@settings(max_examples=150, deadline=None)
@given(arrays(np.float32, st.integers(1, 60), elements=st.floats(-20, 20, width=32)),
       st.lists(st.floats(0.0625, 4.0, width=32), min_size=1, max_size=3))
def test_scaled_tail_bounds_hold(tail, temperatures):
    """After each temperature the bounds contain the tail's true max and log-sum-exp, computed
    with the engine's own float32 division."""
    values = torch.from_numpy(tail)
    row = torch.cat([values.amax().reshape(1) + 1.0, values]).unsqueeze(0)
    bound = TailBound(sparse_rows(row, 1))
    for temperature in temperatures:
        divisor = torch.tensor([temperature], dtype=torch.float32)
        values = values / divisor
        bound.scale(divisor, torch.tensor([True]))
        assert float(values.amax()) <= float(bound.max[0])
        lse = float(torch.logsumexp(values.double(), dim=0))
        assert float(bound.lse_low[0]) <= lse <= float(bound.lse_high[0])
    assert not bool(bound.pristine[0])


# -- the rules, on constructed rows ---------------------------------------------------------------
def policy(chain, select="sample", **defaults):
    return resolve(parse_policy("p", {"chain": chain, "select": select, "defaults": defaults}),
                   PolicyVersion(1, "x"), {})


def states(policy, rows: int, prompt=()) -> list[SequenceState]:
    return [SequenceState(f"s{i}", policy, tuple(prompt), 7 + i, frozenset({7}))
            for i in range(rows)]


def run(policy, rows, k, prompt=(), processed=False):
    """Dense and sparse outcomes of one step of `rows` (lists of logits), one sequence each."""
    logits = torch.tensor(rows, dtype=torch.float32)
    engine = Engine(CPU)
    return (engine.step(states(policy, len(rows), prompt), logits, processed),
            engine.step(states(policy, len(rows), prompt), sparse_rows(logits, k), processed))


def refusal(policy, rows, k, prompt=()) -> NotExact:
    sparse = sparse_rows(torch.tensor(rows, dtype=torch.float32), k)
    with pytest.raises(NotExact) as caught:
        Engine(CPU).step(states(policy, len(rows), prompt), sparse)
    return caught.value


def assert_same(dense, sparse):
    assert [o.token_id for o in sparse] == [o.token_id for o in dense]
    for a, b in zip(dense, sparse):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert b.entropy == pytest.approx(a.entropy, abs=1e-4)
        assert b.varentropy == pytest.approx(a.varentropy, abs=1e-4)
        assert [t for t, _ in b.top_logprobs] == [t for t, _ in a.top_logprobs]


@pytest.mark.parametrize("chain", [
    [{"top_k": {"k": 2}}], [{"top_k": {"k": 3}}], [{"min_p": {"p": 0.5}}],
    [{"top_p": {"p": 0.3}}], [{"temperature": {"temperature": 0.5}}, {"top_k": {"k": 3}}],
    [{"epsilon_cutoff": {"epsilon": 0.2}}], [{"allowed_token_ids": {"ids": [0, 1]}}],
    [{"repetition_penalty": {"penalty": 2.0}}, {"top_k": {"k": 1}}],
    [{"logit_bias": {"bias": {3: -3.0}}}, {"top_k": {"k": 1}}],
    [{"forced_tokens": {"tokens": {0: 1}}}],
])
def test_rules_accept_what_they_can_prove(chain):
    dense, sparse = run(policy(chain, logprobs=3), [LADDER, FLATTER], 3, prompt=(3,),
                        processed=True)
    assert_same(dense, sparse)


@pytest.mark.parametrize("chain, select, field, start", [
    ([{"top_k": {"k": 4}}], "sample", "rows[0]", "top_k: k = 4 is more than the K = 3"),
    ([{"min_p": {"p": 0.01}}], "sample", "rows[0]", "min_p: the threshold"),
    ([{"top_p": {"p": 0.99}}], "sample", "rows[0]", "top_p: the kept set does not close"),
    ([], "sample", "rows[0].policy", "sample: draws from the whole row; needs the tail excluded"),
    ([{"temperature": {"temperature": 0.5}}], "sample", "rows[0].policy", "sample:"),
    ([{"top_p": {"p": 0.99}}, {"top_k": {"k": 2}}], "sample", "rows[0]", "top_p:"),
    ([{"temperature": {"temperature": 0.9}}, {"typical_p": {"p": 0.5}}], "sample", "rows[0]",
     "typical_p: needs the whole row's entropy"),
    ([{"top_n_sigma": {"n": 1.0}}], "sample", "rows[0].policy", "top_n_sigma: σ is over"),
    ([{"kl_temperature": {"t0": 1.0, "t_min": 0.3}}], "greedy", "rows[0].policy",
     "kl_temperature: KL"),
    ([{"exponential_decay_length_penalty": {"start": 0, "factor": 1.5}}], "greedy",
     "rows[0].policy", "exponential_decay_length_penalty: has no sparse rule"),
    ([{"temperature": {"temperature": 0.5}}, {"edt": {}}], "greedy", "rows[0].policy",
     "edt: reads the entropy"),
    # a lift carries the tail over the cut: 2 / 0.5 = 4 ties the second best sent logit
    ([{"repetition_penalty": {"penalty": 0.5}}, {"top_k": {"k": 2}}], "sample", "rows[0]",
     "top_k: the k-th best sent logit (k = 2) 4 is not above the tail's max bound 4"),
    ([{"logit_bias": {"bias": {3: 3.0}}}, {"top_k": {"k": 1}}], "sample", "rows[0]", "top_k:"),
    ([{"forced_tokens": {"tokens": {0: 5}}}], "greedy", "rows[0]",
     "forced_tokens: the forced token 5 is not among the K sent entries"),
    ([{"allowed_token_ids": {"ids": [0, 5]}}], "sample", "rows[0].policy", "sample:"),
    ([], {"cot": {"k": 2}}, "rows[0].policy", "cot: groups need full rows"),
])
def test_rules_refuse_what_they_cannot_prove(chain, select, field, start):
    error = refusal(policy(chain, select), [LADDER], 3, prompt=(3,))
    assert error.code == "FAILED_PRECONDITION"
    assert [f for f, _ in error.violations] == [field]
    assert error.violations[0][1].startswith(start)


def test_greedy_refuses_a_tie_with_the_tail():
    """Ties go to the lowest id, and a tail id may be lower than the sent one."""
    tied = [1.0, 5.0, 5.0, 0.0]  # K = 1 sends id 1 or 2; the other one is the tail's max
    error = refusal(policy([], "greedy"), [tied], 1)
    assert error.violations[0][1].startswith("greedy: the best candidate 5 is not above")
    dense, sparse = run(policy([], "greedy"), [[1.0, 5.0, 4.0, 0.0]], 1)
    assert_same(dense, sparse)


def test_greedy_rows_of_a_sampling_policy_need_no_truncation():
    dense, sparse = run(resolve_flat({"temperature": 0.0}), [LADDER, LADDER[::-1]], 2)
    assert_same(dense, sparse)


def test_reported_logprobs_must_be_sent():
    dense, sparse = run(policy([{"top_k": {"k": 2}}], logprobs=3), [LADDER], 3)
    assert_same(dense, sparse)
    error = refusal(policy([{"top_k": {"k": 2}}], logprobs=4), [LADDER], 3)
    assert error.violations == (("rows[0]", "logprobs: the 4 best raw tokens are not all among "
                                             "the K = 3 sent entries (tail max 2)"),)


def test_one_error_lists_every_refused_row_and_translates_to_request_rows():
    tied = [5.0, 4.0, 3.0, 3.0, 1.0, 0.0, -1.0, -2.0]
    rows = [LADDER, tied, LADDER, tied]
    error = refusal(policy([{"top_k": {"k": 3}}]), rows, 3)
    assert [f for f, _ in error.violations] == ["rows[1]", "rows[3]"]
    moved = error.for_request([4, 7, 9, 12])
    assert [f for f, _ in moved.violations] == ["rows[7]", "rows[12]"]
    assert moved.violations[0][1].startswith("top_k: the k-th best sent logit (k = 3) 3 ")
    assert "resend them with full logits: rows[7], rows[12]" in moved.message
    status = to_rpc_status(moved)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert [(v.field, v.description) for v in detail.field_violations] == list(moved.violations)


def test_a_prefixed_error_keeps_every_violation():
    error = refusal(policy([{"top_k": {"k": 4}}]), [LADDER, LADDER], 3).with_field_prefix("step")
    assert [f for f, _ in error.violations] == ["step.rows[0]", "step.rows[1]"]
    assert error.field == "step.rows[0]"
