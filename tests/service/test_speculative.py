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


def _unary(client, request):
    """A hand-made Step request sent as it is (a resend, or one the SDK would refuse)."""
    from sampler_client.calls import Rpc
    return client._performer(client._unary_step)(Rpc("Step", request))


def _accepted(choices) -> list[list[int]]:
    return [list(c.accepted_token_ids) for c in choices]


def test_forks_verify_each_fork_as_its_own_sequence(client):
    """Fork i is the sequence with seed + i: verifying drafts per fork emits what that
    sequence emits on the same drafts and logits, at the first step (every fork verifies the
    prompt row's drafts) and after, with other forks' rows plain (no drafts)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    params = {"temperature": 1.0, "top_k": 4, "max_tokens": 9}
    group = client.create_sequence(params={**params, "n": 3}, prompt_ids=[1], seed=5)
    alone = [client.create_sequence(params=params, prompt_ids=[1], seed=5 + i) for i in range(3)]
    drafts, logits = [[2, 3]], _logits(rng, 3)
    choices = group.verify(drafts, logits)
    assert _accepted(choices) == [seq.verify(drafts[0], logits) for seq in alone]
    assert [c.parent_row for c in choices] == [0, 0, 0] and group.next_step == 1
    for _ in range(12):
        running = [seq for seq, c in zip(alone, choices) if not c.finished]
        if group.result is not None:
            break
        drafts = [[int(t) for t in rng.integers(V, size=int(rng.integers(0, 3)))] for _ in running]
        rows = [_logits(rng, len(d) + 1) for d in drafts]
        # draft probabilities for some rows: a fork's drafts drawn from q
        probs = [None if not d or rng.random() < 0.5 else np.full((len(d), V), 1.0 / V)
                 for d in drafts]
        if not any(drafts):
            drafts[0], rows[0], probs[0] = [1], _logits(rng, 2), None
        choices = group.verify(drafts, np.concatenate(rows), probs)
        expected = [seq.verify(d, r, q) if d else [seq.step(r[0]).token_id]
                    for seq, d, r, q in zip(running, drafts, rows, probs)]
        assert _accepted(choices) == expected
        assert [c.parent_row for c in choices] == list(range(len(running)))
    assert group.result is not None
    hypotheses = {h.branch: list(h.token_ids) for h in group.result.hypotheses}
    assert hypotheses == {i: seq.info().output_ids for i, seq in enumerate(alone)}


def test_fork_verification_retry_and_restore(start_server, tmp_path):
    """A retried fork verification answers the same choices; a restart with --state-dir
    restores forks that hold more tokens than steps."""
    pytest.importorskip("torch")
    from sampler_client import SamplerClient
    rng = np.random.default_rng(5)
    server = start_server(state_dir=tmp_path)
    with SamplerClient(server.address) as client:
        group = client.create_sequence(params={"temperature": 1.0, "n": 2}, prompt_ids=[1],
                                       seed=1, sequence_id="forks")
        logits = _logits(rng, 4)
        logits[:, 1] += 20  # drafts of 1 are accepted
        first = group.verify([[1, 1, 1]], logits)
        assert _accepted(first) == [[1, 1, 1, int(first[0].token_id)],
                                    [1, 1, 1, int(first[1].token_id)]]
        from sampler_client import requests
        retry = requests.verify_request([("forks", 0, None)], [[1, 1, 1]], logits)
        assert _accepted(_unary(client, retry).choices) == _accepted(first)
        before = group.info()
    server.stop(0)
    again = start_server(state_dir=tmp_path)
    with SamplerClient(again.address) as client:
        info = client.get_sequence("forks")
        assert ([h.token_ids for h in info.group.running]
                == [h.token_ids for h in before.group.running])
        assert all(len(h.token_ids) == 4 for h in info.group.running)


@pytest.mark.parametrize("case, code, field", [
    ("rows", grpc.StatusCode.INVALID_ARGUMENT, "logits.shape"),
    ("id", grpc.StatusCode.INVALID_ARGUMENT, "rows[0].draft_token_ids[1]"),
    ("probs_range", grpc.StatusCode.INVALID_ARGUMENT, "rows[0].draft_probs"),
    ("own_zero", grpc.StatusCode.INVALID_ARGUMENT, "rows[0].draft_probs[0]"),
    ("beam", grpc.StatusCode.FAILED_PRECONDITION, "rows[0].draft_token_ids"),
    ("cot", grpc.StatusCode.FAILED_PRECONDITION, "rows[0].draft_token_ids"),
    ("mirostat", grpc.StatusCode.FAILED_PRECONDITION, "rows[0].draft_token_ids"),
])
def test_bad_input_names_field_and_advances_nothing(client, case, code, field):
    pytest.importorskip("torch")
    from sampler_client import requests
    rng = np.random.default_rng(3)
    if case == "beam":
        seq = client.create_beam_group([1], 2, max_new_tokens=4)
    elif case == "cot":
        seq = client.create_sequence(policy={"chain": [], "select": {"cot": {"k": 2}}},
                                     prompt_ids=[1])
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
    request = requests.verify_request([(seq.sequence_id, 0, None)], [drafts], logits, [probs])
    with pytest.raises(SamplerError) as err:
        _unary(client, request)
    assert err.value.code == code
    assert field in _fields(err.value)
    info = seq.info()
    assert not info.output_ids and not (info.group and info.group.hypotheses)


def test_verify_over_streams_and_shared_memory(server):
    """The same verifications through a StepStream and with every tensor (logits and
    draft_probs) in shared memory answer what unary inline ones do."""
    pytest.importorskip("torch")
    from sampler_client import SamplerClient
    rng = np.random.default_rng(6)
    params = {"temperature": 1.0}
    inline = SamplerClient(server.address, transport="inline")
    shm = SamplerClient(server.address, transport="shm")
    try:
        a = inline.create_sequence(params=params, prompt_ids=[1], seed=3)
        b = shm.create_sequence(params=params, prompt_ids=[1], seed=3)
        with shm.stream() as stream:
            for _ in range(6):
                k = int(rng.integers(1, 4))
                logits = _logits(rng, k + 1)
                drafts = [int(t) for t in rng.integers(V, size=k)]
                q = rng.dirichlet(np.ones(V), size=k).astype(np.float32)
                q[np.arange(k), drafts] += 0.1
                q /= q.sum(axis=1, keepdims=True)
                choice, = stream.verify([b], [drafts], logits, [q])
                assert list(choice.accepted_token_ids) == a.verify(drafts, logits, q)
        assert shm.regions() and b.info().output_ids == a.info().output_ids
    finally:
        inline.close()
        shm.close()


def test_async_twin_verifies_sequences_and_forks_as_the_sync_client(server, client):
    pytest.importorskip("torch")
    import asyncio
    from sampler_client.aio import AsyncSamplerClient
    rng = np.random.default_rng(7)
    logits = [_logits(rng, 3), _logits(rng, 2), _logits(rng, 3)]
    params = {"temperature": 1.0, "n": 2}

    def sync() -> list:
        seq = client.create_sequence(params={"temperature": 1.0}, prompt_ids=[1], seed=2)
        forks = client.create_sequence(params=params, prompt_ids=[1], seed=2)
        with client.stream() as stream:
            got = [_accepted(stream.verify([seq], [[1, 2]], logits[0]))]
        got.append(_accepted(forks.verify([[3]], logits[1])))
        got.append(_accepted(forks.verify([[4], []], logits[2])))
        return got

    async def twin() -> list:
        async with AsyncSamplerClient(server.address) as aio:
            seq = await aio.create_sequence(params={"temperature": 1.0}, prompt_ids=[1], seed=2)
            forks = await aio.create_sequence(params=params, prompt_ids=[1], seed=2)
            async with aio.stream() as stream:
                got = [_accepted(await stream.verify([seq], [[1, 2]], logits[0]))]
            got.append(_accepted(await forks.verify([[3]], logits[1])))
            got.append(_accepted(await forks.verify([[4], []], logits[2])))
            return got

    assert asyncio.run(twin()) == sync()


def test_one_request_verifies_sequences_and_forks_as_separate_ones(client):
    """`client.verify` of a plain sequence (drafts), another (none) and a fork group in one
    request answers what each verified alone answers."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    params = {"temperature": 1.0}

    def made():
        return [client.create_sequence(params=params, prompt_ids=[1], seed=1),
                client.create_sequence(params=params, prompt_ids=[2], seed=2),
                client.create_sequence(params={**params, "n": 2}, prompt_ids=[3], seed=3)]

    together, alone = made(), made()
    for _ in range(3):
        drafts = [[int(t) for t in rng.integers(V, size=2)], [],
                  *[[int(rng.integers(V))] for _ in range(together[2].running_rows)]]
        rows = [_logits(rng, len(d) + 1) for d in drafts]
        choices = client.verify(together, drafts, np.concatenate(rows))
        expected = [alone[0].verify(drafts[0], rows[0]), [alone[1].step(rows[1][0]).token_id],
                    *_accepted(alone[2].verify(drafts[2:], np.concatenate(rows[2:])))]
        assert _accepted(choices) == expected
