"""The SDK against a real server: the issue's example as written, dtypes, streams, asyncio."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from sampler_client import AsyncSamplerClient, SamplerClient


def test_readme_example_works_as_written(server):
    logits = torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0, 0.0])
    logits_2d = torch.stack([logits, logits.flip(0)])
    with SamplerClient(server.address) as client:
        seq = client.create_sequence(policy="creative", prompt_ids=[1, 2, 3], seed=7,
                                     params={"temperature": 0.7})
        choice = seq.step(logits)
        assert 0 <= choice.token_id < 6
        assert choice.logprob == pytest.approx(float(torch.log_softmax(logits, 0)[choice.token_id]))
        assert (choice.finished, choice.finish_reason) == (False, None)
        seq_a = client.create_sequence(policy="greedy")
        seq_b = client.create_sequence(policy="greedy")
        choices = client.step([seq_a, seq_b], logits_2d)
        assert [c.token_id for c in choices] == [4, 1]
        assert [c.parent_row for c in choices] == [0, 1]
        survivors = client.preview(logits, policy={"chain": [{"top_p": {"p": 0.7}}],
                                                   "select": "sample"}, history=[5, 5, 0])
        probs = torch.softmax(logits, 0)
        assert [t for t, _ in survivors] == [4, 1]  # 0.63 < 0.7, then 0.63 + 0.14 covers it
        kept = probs[[4, 1]] / probs[[4, 1]].sum()
        assert [p for _, p in survivors] == pytest.approx(kept.tolist(), rel=1e-5)


@pytest.mark.parametrize("make", [
    lambda x: x.numpy(),
    lambda x: x.numpy().astype(np.float16),
    lambda x: x,
    lambda x: x.half(),
    lambda x: x.bfloat16(),
    lambda x: x.tolist(),
], ids=["numpy-fp32", "numpy-fp16", "torch-fp32", "torch-fp16", "torch-bf16", "list"])
def test_every_wire_dtype_gives_the_argmax(client, make):
    logits = torch.full((300,), -2.0)
    logits[217] = 4.0
    choice = client.create_sequence(policy="greedy").step(make(logits))
    assert choice.token_id == 217


def test_logprobs_entropy_and_top_n(client):
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    seq = client.create_sequence(policy="greedy", params={"logprobs": 3})
    choice = seq.step(logits, processed_logprobs=True)
    assert choice.token_id == 0
    assert choice.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    assert [t for t, _ in choice.top_logprobs] == [0, 1, 2] or [t for t, _ in choice.top_logprobs] == [0, 1, 3]
    assert [lp for _, lp in choice.top_logprobs] == pytest.approx([math.log(p) for p in (0.5, 0.25, 0.125)])
    h = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
    assert choice.entropy == pytest.approx(h, abs=1e-6)
    v = sum(p * (math.log(p) + h) ** 2 for p in (0.5, 0.25, 0.125, 0.125))
    assert choice.varentropy == pytest.approx(v, abs=1e-5)
    assert choice.processed_logprob == 0.0  # greedy draws from a point mass
    assert (choice.processed_entropy, choice.processed_varentropy) == (0.0, 0.0)
    info = seq.info()
    assert info.entropies == pytest.approx([h], abs=1e-6)
    assert info.output_ids == [0] and info.vocab_size == 4


def test_stop_ids_max_tokens_and_min_tokens(client):
    logits = torch.tensor([0.0, 5.0, 1.0, 2.0])  # EOS = 1 is the favourite
    seq = client.create_sequence(policy="greedy", eos_token_ids=[1],
                                 params={"min_tokens": 2, "max_tokens": 5})
    first, second, third = (seq.step(logits) for _ in range(3))
    assert (first.token_id, second.token_id) == (3, 3)  # EOS masked while fewer than 2 tokens
    assert (third.token_id, third.finished, third.finish_reason, third.stop_token_id) == (1, True, "stop", 1)
    capped = client.create_sequence(params={"temperature": 0, "max_tokens": 2, "stop_token_ids": [2]})
    assert [capped.step(torch.tensor([0.0, 0.0, 0.0, 9.0])).finish_reason for _ in range(2)] == [None, "length"]
    stopped = client.create_sequence(params={"temperature": 0, "stop_token_ids": [2]})
    assert stopped.step(torch.tensor([0.0, 0.0, 9.0, 0.0])).finish_reason == "stop"


def test_retried_step_returns_the_same_answer_and_does_not_advance(client):
    seq = client.create_sequence(policy="default", seed=11)
    logits = torch.randn(50)
    first = seq.step(logits)
    seq.next_step = 0  # the worker did not see the answer and sends step 0 again
    again = seq.step(torch.randn(50))  # whatever it sends, the recorded answer comes back
    assert again == first
    assert seq.info().output_ids == [first.token_id]
    assert seq.step(logits).step == 1


def test_release_and_get(client):
    seq = client.create_sequence(policy="greedy", sequence_id="abc")
    assert client.get_sequence("abc").policy == "greedy"
    assert client.release([seq, "never-made"]) == ["never-made"]


def test_stream_answers_in_order_and_survives_a_bad_step(client):
    sequences = [client.create_sequence(policy="default", seed=i) for i in range(3)]
    with client.stream() as stream:
        for _ in range(4):
            choices = stream.step(sequences, torch.randn(3, 64))
            assert [c.sequence_id for c in choices] == [s.sequence_id for s in sequences]
        with pytest.raises(Exception):
            stream.step(sequences, torch.randn(2, 64))
        assert stream.step(sequences, torch.randn(3, 64))[0].step == 4
        assert stream.last_service_micros > 0


def test_async_client_twin(server):
    async def run():
        async with AsyncSamplerClient(server.address) as client:
            seq = await client.create_sequence(policy="greedy")
            choice = await seq.step(torch.tensor([0.0, 1.0, 3.0]))
            async with client.stream() as stream:
                streamed = await stream.step([seq], torch.tensor([[4.0, 1.0, 3.0]]))
            preview = await client.preview(torch.tensor([0.0, 1.0, 3.0]), policy="greedy")
            info = await seq.info()
            await seq.release()
            return choice.token_id, streamed[0].token_id, preview, info.output_ids
    assert asyncio.run(run()) == (2, 0, [(2, 1.0)], [2, 0])


def test_the_client_imports_without_torch():
    """A client-only install has no torch: importing the SDK and encoding NumPy must not need it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, sampler_client\n"
            "from sampler_client.tensors import encode_tensor\n"
            "assert encode_tensor(np.zeros(3, np.float16)).shape == [3]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_async_client_runs_groups(server):
    """The asyncio twin creates and steps a beam group, forks and a CoT group."""
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])

    async def run():
        async with AsyncSamplerClient(server.address) as client:
            beams = await client.create_beam_group([3], 2, max_new_tokens=1, num_return_sequences=2)
            beam_choices = await beams.step(logits.expand(2, 4))
            forks = await client.create_forks([3], 3, seed=5, params={"max_tokens": 1})
            fork_choices = await forks.step(logits)
            cot = await client.create_cot_group([3], 2, max_new_tokens=1)
            await cot.step(logits)
            info = await cot.info()
            return beams.result, beam_choices, forks.result, fork_choices, info.group

    beam_result, beam_choices, fork_result, fork_choices, cot_info = asyncio.run(run())
    assert [h.token_ids for h in beam_result.hypotheses] == [[1], [2]]
    assert [c.parent_row for c in beam_choices] == [0, 0] and all(c.finished for c in beam_choices)
    assert len(fork_result.hypotheses) == 3 and [c.parent_row for c in fork_choices] == [0, 0, 0]
    assert cot_info.kind == "cot" and [h.token_ids[0] for h in cot_info.hypotheses] in ([1, 2], [2, 1])


def test_explain_plan_shows_the_planned_chain(client, server):
    assert client.explain_plan("greedy") == ["greedy()"]
    assert client.explain_plan(params={"temperature": 0.7, "top_k": 40}) == [
        "temperature(temperature=0.7)", "top_k(k=40, min_keep=1)", "sample()"]
    planned = client.explain_plan({"chain": [{"top_k": {"k": 5}}, {"min_p": {"p": 0.1}}],
                                   "select": "greedy"})
    assert planned == ["greedy()"]

    async def twin():
        async with AsyncSamplerClient(server.address) as aio:
            return await aio.explain_plan("creative")

    assert asyncio.run(twin())[-1] == "sample()"
