"""SDK transports through the real server: inline, shared memory, auto and CUDA IPC, every
wire dtype, streams, sparse top-K rows with their automatic resend, auto's fallback when the
service has shared memory off, Unix-socket targets, and hf.generate on every transport.

Every test compares against the inline transport: the tokens (and logprobs) must be equal.
"""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time

import grpc
import pytest
import torch

from sampler_client import (AsyncSamplerClient, FailedPreconditionError, SamplerClient, hf)
from sampler_client.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options

VOCAB = 1000
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def step_logits(step: int, rows: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(rows, VOCAB, generator=generator) * 3).to(dtype)


def generate(client, policy: str = "creative", steps: int = 4, dtype=torch.float32,
             device: str = "cpu", stream: bool = False, params=None) -> list[list[tuple]]:
    """(token, logprob) per step and row of 3 seeded sequences of `policy`."""
    handles = client.create_sequences([dict(policy=policy, seed=7 + i, prompt_ids=[1, 2, 3],
                                            params=params) for i in range(3)])
    stepper = client.stream() if stream else client
    try:
        return [[(c.token_id, c.logprob) for c in
                 stepper.step(handles, step_logits(s, dtype=dtype).to(device))]
                for s in range(steps)]
    finally:
        if stream:
            stepper.close()
        client.release(handles)


def shm_objects(client) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"sps_{client.client_id[:12]}")]


class StepRecorder(grpc.UnaryUnaryClientInterceptor):
    """Records every unary Step request a client sends (resends included)."""

    def __init__(self):
        self.requests = []

    def intercept_unary_unary(self, continuation, details, request):
        if details.method.endswith("/Step"):
            self.requests.append(request)
        return continuation(details, request)


def recorded_client(server, **options) -> tuple[SamplerClient, StepRecorder]:
    recorder = StepRecorder()
    channel = grpc.intercept_channel(
        grpc.insecure_channel(server.address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)),
        recorder)
    return SamplerClient(server.address, channel=channel, **options), recorder


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transport", ["shm", "auto"])
def test_every_transport_and_dtype_gives_the_inline_tokens(server, transport, dtype):
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline, dtype=DTYPES[dtype])
    with SamplerClient(server.address, transport=transport) as client:
        assert generate(client, dtype=DTYPES[dtype]) == expected
        (region,) = client.regions()  # one step in flight at a time: one region, reused
        assert (region.kind, region.client_id) == ("system", client.client_id)


def test_regions_are_reused_and_close_unregisters_and_unlinks(server):
    with SamplerClient(server.address) as observer:
        client = SamplerClient(server.address, transport="shm", ring_slots=2)
        generate(client, steps=10)
        regions = client.regions()
        assert 1 <= len(regions) <= 2 and len(shm_objects(client)) == len(regions)
        assert all(r.in_use == 0 for r in regions)
        client.close()
        assert [r for r in observer.regions(all_clients=True)
                if r.client_id == client.client_id] == []
        assert shm_objects(client) == []


def test_concurrent_threads_share_the_ring_and_get_the_inline_tokens(server):
    """Steps from several threads at once: each takes its own region (or goes inline when
    the ring is all lent), never one another's."""
    from concurrent.futures import ThreadPoolExecutor

    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline, steps=3)
    with SamplerClient(server.address, transport="shm", ring_slots=2) as client:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: generate(client, steps=3), range(4)))
        assert results == [expected] * 4
        assert len(client.regions()) <= 2


def test_a_sync_stream_over_shared_memory_gives_the_inline_tokens(server):
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline, stream=True)
    with SamplerClient(server.address, transport="shm") as client:
        assert generate(client, stream=True) == expected
        assert len(client.regions()) == 1


def test_an_async_stream_over_shared_memory_gives_the_inline_tokens(server):
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline, stream=True)

    async def run():
        async with AsyncSamplerClient(server.address, transport="shm") as client:
            handles = await client.create_sequences([dict(policy="creative", seed=7 + i,
                                                          prompt_ids=[1, 2, 3]) for i in range(3)])
            async with client.stream() as stream:
                tokens = [[(c.token_id, c.logprob) for c in
                           await stream.step(handles, step_logits(s))] for s in range(4)]
            unary = await client.step(handles, step_logits(4))
            regions = await client.regions()
            await client.release(handles)
            return tokens, unary, regions, client.client_id

    tokens, unary, regions, client_id = asyncio.run(run())
    assert tokens == expected and len(unary) == 3
    assert len(regions) == 1 and regions[0].client_id == client_id
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"sps_{client_id[:12]}")]


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_sparse_rows_of_a_policy_that_accepts_them_give_the_inline_tokens(server, transport):
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline, policy="greedy")
    client, recorder = recorded_client(server, transport=transport, sparse_top_k=20)
    with client:
        assert generate(client, policy="greedy") == expected
    assert len(recorder.requests) == 4  # no resend
    for request in recorder.requests:
        assert list(request.sparse.rows) == [0, 1, 2] and not request.HasField("logits")
        assert request.sparse.logits.WhichOneof("data") == (
            "raw" if transport == "inline" else "shared_memory")


def test_sparse_rows_of_a_policy_that_never_runs_sparse_are_resent_in_full(server):
    """`default` samples the full distribution: the first step is refused (rows[i].policy),
    resent in full in the same call, and the sequences go in full from then on."""
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline, policy="default")
    client, recorder = recorded_client(server, transport="shm", sparse_top_k=20)
    with client:
        assert generate(client, policy="default") == expected
    first, resent, *later = recorder.requests
    assert list(first.sparse.rows) == [0, 1, 2]
    assert not resent.HasField("sparse") and list(resent.logits.shape) == [3, VOCAB]
    assert len(later) == 3 and not any(r.HasField("sparse") for r in later)


def test_sparse_rows_give_the_inline_tokens_whatever_the_policy_decides(server):
    """creative (penalties, temperature, top-k 40, top-p, min-p) and edt: whatever rows the
    service accepts or refuses, the tokens and logprobs are the dense ones."""
    for policy in ("creative", "edt"):
        with SamplerClient(server.address, transport="inline") as inline:
            expected = generate(inline, policy=policy, steps=5)
        with SamplerClient(server.address, sparse_top_k=64) as client:
            assert generate(client, policy=policy, steps=5) == expected


def test_groups_go_in_full_beside_sparse_rows(server):
    logits = step_logits(0, rows=3)
    with SamplerClient(server.address, transport="inline") as inline:
        plain, beams = inline.create_sequence(policy="greedy"), inline.create_beam_group(
            [3], 2, max_new_tokens=2)
        expected = [c.token_id for c in inline.step([plain, beams], logits)]
    client, recorder = recorded_client(server, sparse_top_k=10)
    with client:
        plain, beams = client.create_sequence(policy="greedy"), client.create_beam_group(
            [3], 2, max_new_tokens=2)
        assert [c.token_id for c in client.step([plain, beams], logits)] == expected
    (request,) = recorder.requests
    assert list(request.sparse.rows) == [0] and list(request.logits.shape) == [2, VOCAB]


def test_auto_falls_back_to_inline_when_the_service_has_shared_memory_off(start_server, caplog):
    server = start_server(allow_shared_memory=False)
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline)
    with caplog.at_level(logging.INFO, logger="sampler_client.transports"):
        with SamplerClient(server.address) as client:
            assert generate(client) == expected
            assert shm_objects(client) == []
    fallbacks = [r for r in caplog.records if r.name == "sampler_client.transports"]
    assert len(fallbacks) == 1 and "inline" in fallbacks[0].getMessage()
    with SamplerClient(server.address, transport="shm") as explicit:
        with pytest.raises(FailedPreconditionError, match="allow-shared-memory"):
            generate(explicit)
        assert shm_objects(explicit) == []


@pytest.mark.parametrize("scheme", ["unix://", "unix:"])
def test_a_unix_socket_target_uses_shared_memory(start_server, tmp_path, scheme):
    path = tmp_path / "sampler.sock"
    server = start_server(uds=path)
    with SamplerClient(server.address, transport="inline") as inline:
        expected = generate(inline)
    with SamplerClient(f"{scheme}{path}") as client:
        assert generate(client) == expected
        assert [r.kind for r in client.regions()] == ["system"]


@pytest.mark.e2e
@pytest.mark.parametrize("transport, sparse_top_k", [("shm", None), ("auto", 50), ("inline", 50)])
def test_hf_generate_gives_the_same_tokens_on_every_transport(server, smollm2, transport,
                                                              sparse_top_k):
    model, tokenizer = smollm2
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("Once upon a")]
    options = dict(policy="creative", max_new_tokens=8, seed=3)
    with SamplerClient(server.address, transport="inline") as inline:
        expected = hf.generate(model, prompts, inline, **options)
        beams = hf.generate(model, prompts[:1], inline, num_beams=2, max_new_tokens=4)
    with SamplerClient(server.address, transport=transport, sparse_top_k=sparse_top_k) as client:
        assert hf.generate(model, prompts, client, **options) == expected
        assert hf.generate(model, prompts[:1], client, num_beams=2, max_new_tokens=4) == beams


def verifications(client: SamplerClient, device: str = "cpu") -> list[list[int]]:
    """The tokens of three speculative verifications with draft probabilities (a sampling
    policy, fixed seeds), their logits and probabilities made on `device`."""
    g = torch.Generator().manual_seed(0)
    seq = client.create_sequence(params={"temperature": 1.0}, prompt_ids=[1], seed=4)
    out = []
    for k in (1, 3, 2):
        logits = torch.randn(k + 1, 64, generator=g)
        q = torch.softmax(torch.randn(k, 64, generator=g), 1)
        drafts = torch.multinomial(q, 1, generator=g).flatten().tolist()
        out.append(seq.verify(drafts, logits.to(device), q.to(device)))
    return out


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ipc_gives_the_inline_tokens(tmp_path, dtype):
    """CUDA IPC needs two processes (a handle cannot be opened by the process that exported
    it): the service runs in a subprocess on the same GPU, over a Unix socket."""
    pytest.importorskip("cupy")
    path, log = tmp_path / "sampler.sock", tmp_path / "service.log"
    with open(log, "wb") as output:
        service = subprocess.Popen([sys.executable, "-m", "sampler_service", "serve", "--no-tcp",
                                    "--uds", str(path), "--device", "cuda"],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline and service.poll() is None:
            time.sleep(0.2)
        assert path.exists(), log.read_text()
        with SamplerClient(f"unix://{path}", transport="inline") as inline:
            inline.wait_ready()
            expected = generate(inline, dtype=DTYPES[dtype])
            expected_greedy = generate(inline, policy="greedy", dtype=DTYPES[dtype])
            expected_verified = verifications(inline)
        for transport in ("cuda_ipc", "auto"):
            with SamplerClient(f"unix://{path}", transport=transport) as client:
                assert generate(client, dtype=DTYPES[dtype], device="cuda") == expected
                assert verifications(client, device="cuda") == expected_verified  # draft_probs too
                assert [r.kind for r in client.regions()] == ["cuda"]
        with SamplerClient(f"unix://{path}", sparse_top_k=20) as client:  # values by CUDA IPC
            assert generate(client, policy="greedy", dtype=DTYPES[dtype],
                            device="cuda") == expected_greedy
    finally:
        service.terminate()
        service.wait(timeout=30)


def test_a_refusal_listing_hundreds_of_rows_reaches_the_sdk_and_is_resent(server):
    """256 refused rows make trailers past gRPC's default 16 KiB metadata limit."""
    logits = step_logits(0, rows=256)
    with SamplerClient(server.address, transport="inline", sparse_top_k=8) as sparse, \
            SamplerClient(server.address, transport="inline") as inline:
        expected = [c.token_id for c in inline.step(
            inline.create_sequences([dict(policy="default", seed=i) for i in range(256)]), logits)]
        handles = sparse.create_sequences([dict(policy="default", seed=i) for i in range(256)])
        assert [c.token_id for c in sparse.step(handles, logits)] == expected
        assert all(h.dense_only for h in handles)  # refused as a policy: full rows from now on


def test_verifications_over_shared_memory_give_the_inline_tokens(server):
    with SamplerClient(server.address, transport="inline") as inline:
        expected = verifications(inline)
    with SamplerClient(server.address, transport="shm") as client:
        assert verifications(client) == expected
        assert [r.kind for r in client.regions()] == ["system"]
