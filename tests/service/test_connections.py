"""How callers reach the server: the open-stream cap, a Unix socket, a separate health port,
host validation, and health answering while the engine is busy."""
from __future__ import annotations

import os
import stat
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sampler_client import ResourceExhaustedError, SamplerClient
from sampler_service.server.app import ServerConfig, check_host


def health_check(address: str, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout).status


def wait_for_streams(server, count: int) -> None:
    deadline = time.monotonic() + 30
    while server.servicer.open_streams < count:
        assert time.monotonic() < deadline, "the streams did not open"
        time.sleep(0.01)


def test_streams_beyond_max_streams_are_refused(start_server):
    server = start_server(max_streams=2)
    with SamplerClient(server.address) as client:
        sequence = client.create_sequence(policy="greedy")
        open_streams = [client.stream(), client.stream()]
        wait_for_streams(server, 2)
        with client.stream() as third, pytest.raises(ResourceExhaustedError) as err:
            third.step([sequence], torch.tensor([[0.0, 1.0]]))
        assert err.value.fields == ["--max-streams"]
        assert "--max-streams" in err.value.message
        assert open_streams[0].step([sequence], torch.tensor([[0.0, 1.0]]))[0].token_id == 1
        for stream in open_streams:
            stream.close()


def test_idle_streams_hold_no_thread(start_server):
    """1024 open streams that send nothing do not keep a new call from being answered."""
    server = start_server()
    with SamplerClient(server.address) as client:
        streams = [client.stream() for _ in range(1024)]
        wait_for_streams(server, 1024)
        started = time.perf_counter()
        sequence = client.create_sequence(policy="greedy")
        assert time.perf_counter() - started < 5
        assert sequence.step(torch.tensor([0.0, 2.0])).token_id == 1
        assert health_check(server.address) == health_pb2.HealthCheckResponse.SERVING
        for stream in streams:
            stream.close()


def test_unix_socket(start_server, tmp_path):
    path = tmp_path / "sampler.sock"
    server = start_server(port=None, uds=path)
    assert server.address == f"unix:{path}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert server.shared_memory  # only a local socket is bound
    for target in (f"unix://{path}", f"unix:{path}"):
        with SamplerClient(target) as client:
            assert client.create_sequence(policy="greedy").step(
                torch.tensor([3.0, 1.0])).token_id == 0
    server.stop(0)
    assert not path.exists()


def test_unix_socket_beside_tcp_with_its_own_mode(start_server, tmp_path):
    path = tmp_path / "s.sock"
    server = start_server(uds=path, uds_mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with SamplerClient(server.address) as tcp, SamplerClient(f"unix://{path}") as uds:
        sequence = tcp.create_sequence(policy="greedy")
        assert uds.get_sequence(sequence.sequence_id).sequence_id == sequence.sequence_id


def test_a_file_in_the_way_of_the_socket_is_kept(start_server, tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("data")
    with pytest.raises(OSError, match="not a socket"):
        start_server(port=None, uds=path)
    assert path.read_text() == "data"


def test_health_port_serves_health_alone(start_server):
    server = start_server(health_port=0, health_host="127.0.0.1")
    assert health_check(f"127.0.0.1:{server.health_port}") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        with SamplerClient("unused", channel=channel) as client, \
                pytest.raises(Exception) as err:
            client.create_sequence(policy="greedy")
        assert err.value.code == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("host", ["unix:/tmp/x", "/tmp/sock", "host name", "a..b", ""])
def test_hosts_that_are_not_addresses_are_refused(host):
    with pytest.raises(ValueError, match="--host"):
        check_host(host)


@pytest.mark.parametrize("host, bound", [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"),
                                         ("localhost", "localhost"), ("0.0.0.0", "0.0.0.0"),
                                         ("sampler.ns.svc", "sampler.ns.svc")])
def test_addresses_and_host_names_are_accepted(host, bound):
    assert check_host(host) == bound


@pytest.mark.parametrize("host, port, allowed", [("127.0.0.1", 1, True), ("::1", 1, True),
                                                 ("localhost", 1, True), ("0.0.0.0", 1, False),
                                                 ("10.1.2.3", 1, False), ("0.0.0.0", None, True)])
def test_shared_memory_defaults_to_local_binds(host, port, allowed):
    assert ServerConfig(host=host, port=port).shared_memory_allowed() is allowed
    assert ServerConfig(host=host, port=port, allow_shared_memory=True).shared_memory_allowed()


def test_health_answers_while_the_engine_is_busy(start_server):
    """Large steps keep the engine thread busy; health checks still answer within 100 ms."""
    server = start_server()
    stop = threading.Event()
    logits = torch.randn(64, 32000, generator=torch.Generator().manual_seed(0))

    def load():
        with SamplerClient(server.address) as client:
            sequences = client.create_sequences([dict(policy="creative", seed=i) for i in range(64)])
            while not stop.is_set():
                for sequence in sequences:
                    sequence.next_step = None
                client.step(sequences, logits)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connect first
            latencies = []
            for _ in range(20):
                started = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
        assert server.batcher.requests > 0
        assert sorted(latencies)[len(latencies) // 2] < 0.1
    finally:
        stop.set()
        for worker in workers:
            worker.join()
