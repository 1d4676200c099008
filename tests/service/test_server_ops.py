"""Operations: health, reflection, graceful stop, the CLI and policy files."""
from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest
import torch
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from sampler_client import InvalidArgumentError, SamplerClient


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_serving_then_not_serving_on_stop(server):
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.address, "sampler.v1.Sampler") == health_pb2.HealthCheckResponse.SERVING
    server.stop(0)
    answer = asyncio.run(server.health.Check(health_pb2.HealthCheckRequest(service=""), None))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"sampler.v1.Sampler", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        methods = {m.name for m in pool.FindServiceByName("sampler.v1.Sampler").methods}
        assert methods == {"CreateSequences", "ReleaseSequences", "GetSequence", "Step",
                           "StepStream", "Preview", "RegisterTokenizer"}


def test_policy_file_extends_the_defaults(start_server, tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text(textwrap.dedent("""
        policies:
          precise:
            description: Low temperature.
            chain:
              - temperature: {temperature: 0.1}
              - top_k: {k: 2}
            select: sample
            overridable: [seed]
    """))
    server = start_server(policies=path)
    with SamplerClient(server.address) as client:
        seq = client.create_sequence(policy="precise", seed=1)
        assert seq.step(torch.tensor([0.0, 5.0, 4.9, -1.0])).token_id in (1, 2)
        assert client.create_sequence(policy="creative").policy == "creative"


def test_cli_serves_and_stops_gracefully_on_sigterm(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        address = re.search(r"listening on (\S+)", line).group(1)
        with SamplerClient(address) as client:
            assert client.create_sequence(policy="greedy").step(torch.tensor([1.0, 2.0])).token_id == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()


def test_cli_rejects_an_invalid_policy_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("policies:\n  broken:\n    chain: [{top_p: {p: 2}}]\n    select: sample\n")
    result = subprocess.run([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                             "--policies", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "policies.broken.chain[0].top_p.p" in result.stderr


def test_preview_matches_the_in_process_distribution(client, server):
    from sampler_service.engine import Engine
    from sampler_service.policy.spec import resolve_flat
    from sampler_service.state import SequenceState

    logits = torch.randn(200, generator=torch.Generator().manual_seed(5))
    params = {"temperature": 0.7, "top_k": 30, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.2}
    state = SequenceState("local", resolve_flat(params), prompt_ids=(3, 4), seed=0,
                          eos_token_ids=frozenset(), output_ids=[7, 7, 9])
    expected = torch.exp(Engine(torch.device("cpu")).distribution(state, logits))
    survivors = client.preview(logits, params=params, history=[7, 7, 9], prompt_ids=[3, 4])
    assert {t for t, _ in survivors} == set(expected.nonzero().squeeze(1).tolist())
    for token, probability in survivors:
        assert probability == pytest.approx(float(expected[token]), rel=1e-5)
    assert [p for _, p in survivors] == sorted((p for _, p in survivors), reverse=True)
    with pytest.raises(InvalidArgumentError):
        client.preview(logits, params=params, history=[500])


def test_resource_caps_name_their_flags(start_server):
    """--max-prompt-tokens and --max-state-bytes through the real server and SDK."""
    from sampler_client import SamplerClient
    from sampler_client.errors import ResourceExhaustedError
    from sampler_service.state.store import STATE_BASE_BYTES, STATE_TOKEN_BYTES
    one = STATE_BASE_BYTES + 16 * STATE_TOKEN_BYTES  # a sequence with a 16-token prompt
    server = start_server(max_prompt_tokens=16, max_state_bytes=2 * one + 10)
    with SamplerClient(server.address) as client:
        with pytest.raises(ResourceExhaustedError) as err:
            client.create_sequence(policy="greedy", prompt_ids=list(range(17)))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.fields == ["--max-prompt-tokens"]
        kept = [client.create_sequence(policy="greedy", prompt_ids=list(range(16)))
                for _ in range(2)]
        with pytest.raises(ResourceExhaustedError) as err:
            client.create_sequence(policy="greedy", prompt_ids=list(range(16)))
        assert err.value.fields == ["--max-state-bytes"]
        kept[0].release()
        client.create_sequence(policy="greedy", prompt_ids=list(range(16)))
