"""Speculative decoding verification through the real server and SDK (docs/speculative.md)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from sampler_client.errors import SamplerError

V = 6


def _fields(err) -> str:
    return " ".join(str(v) for v in (err.field_violations or ())) + " " + err.message


def _logits(rng, rows, vocab=V):
    return rng.normal(0, 2, size=(rows, vocab)).astype(np.float32)


def test_greedy_verify_equals_plain_greedy(client):
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    plain = client.create_sequence(policy={"chain": [], "select": {"greedy": {}}}, prompt_ids=[1])
    spec = client.create_sequence(policy={"chain": [], "select": {"greedy": {}}}, prompt_ids=[1])
    produced: list[int] = []
    while len(produced) < 30:
        k = int(rng.integers(1, 4))
        rows = _logits(rng, k + 1)
        argmax = rows.argmax(axis=1)
        drafts = [int(argmax[j]) if rng.random() < 0.6 else int(rng.integers(V)) for j in range(k)]
        tokens = spec.verify(drafts, rows)
        expected = []
        for j in range(k + 1):
            choice = plain.step(rows[j])
            expected.append(choice.token_id)
            if j == k or choice.token_id != drafts[j]:
                break
        assert tokens == expected
        produced += tokens
        assert spec.next_step == plain.next_step == len(produced)
    assert spec.info().output_ids == plain.info().output_ids
    row = _logits(rng, 1)[0]  # a plain step continues after verifications
    assert spec.step(row).token_id == plain.step(row).token_id


def test_retry_returns_same_tokens_and_advances_nothing(client):
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    seq = client.create_sequence(policy="creative", prompt_ids=[1, 2], seed=3)
    rows = _logits(rng, 3, 50)
    first = seq.verify([4, 5], rows)
    seq.next_step -= len(first)  # resend the same step number
    assert seq.verify([4, 5], rows) == first
    assert len(seq.info().output_ids) == len(first)


def test_draft_probs_nested_list_and_sampling(client):
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    seq = client.create_sequence(params={"temperature": 1.0}, prompt_ids=[1], seed=9)
    q = np.full((2, V), 1.0 / V).tolist()
    tokens = seq.verify([1, 2], _logits(rng, 3), draft_probs=q)
    assert 1 <= len(tokens) <= 3 and seq.next_step == len(tokens)


@pytest.mark.parametrize("case, code, field", [
    ("rows", grpc.StatusCode.INVALID_ARGUMENT, "logits.shape"),
    ("id", grpc.StatusCode.INVALID_ARGUMENT, "rows[0].draft_token_ids[1]"),
    ("probs_range", grpc.StatusCode.INVALID_ARGUMENT, "rows[0].draft_probs"),
    ("own_zero", grpc.StatusCode.INVALID_ARGUMENT, "rows[0].draft_probs[0]"),
    ("beam", grpc.StatusCode.FAILED_PRECONDITION, "rows[0].draft_token_ids"),
    ("mirostat", grpc.StatusCode.FAILED_PRECONDITION, "rows[0].draft_token_ids"),
])
def test_bad_input_names_field_and_advances_nothing(client, case, code, field):
    pytest.importorskip("torch")
    from sampler_client import requests
    rng = np.random.default_rng(3)
    if case == "beam":
        seq = client.create_beam_group([1], 2, max_new_tokens=4)
    elif case == "mirostat":
        seq = client.create_sequence(policy={"chain": [], "select": {"mirostat": {}}}, prompt_ids=[1])
    else:
        seq = client.create_sequence(params={"temperature": 1.0}, prompt_ids=[1], seed=1)
    drafts, logits, probs = [1, 2], _logits(rng, 3), None
    if case == "rows":
        logits = _logits(rng, 2)
    elif case == "id":
        drafts = [1, V]
    elif case == "probs_range":
        probs = np.full((2, V), 1.5, dtype=np.float32)
    elif case == "own_zero":
        probs = np.full((2, V), 0.2, dtype=np.float32)
        probs[0, 1] = 0.0
    request = requests.verify_request(seq.sequence_id, 0, drafts, logits, probs)
    with pytest.raises(SamplerError) as err:
        client._performer(client._unary_step)(__import__("sampler_client.calls").calls.Rpc(
            "Step", request))
    assert err.value.code == code
    assert field in _fields(err.value)
    info = seq.info()
    assert not info.output_ids and not (info.group and info.group.hypotheses)
