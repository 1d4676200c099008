"""`sampler-service health` (the image's HEALTHCHECK) as a user runs it, a subprocess, against
a real server: 0 SERVING, 1 another status or a service the server does not know, 2 no answer;
and it stays light (no torch, no numpy)."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sampler_service", "health", *args],
                          capture_output=True, text=True, timeout=60)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def health_server(start_server):
    pytest.importorskip("grpc_health")
    return start_server(health_port=0, health_host="127.0.0.1")


def test_serving_on_the_health_port(health_server):
    result = health("--target", f"127.0.0.1:{health_server.health_port}")
    assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")


def test_serving_on_the_data_port_and_for_the_whole_server(health_server):
    result = health("--target", health_server.address, "--service", "")
    assert (result.returncode, result.stdout) == (0, "SERVING\n")


def test_serving_on_the_unix_socket(start_server, tmp_path):
    pytest.importorskip("grpc_health")
    path = tmp_path / "sampler.sock"
    start_server(port=None, uds=path)
    result = health("--target", f"unix:{path}")
    assert (result.returncode, result.stdout) == (0, "SERVING\n")


def test_a_service_the_server_does_not_know_exits_1(health_server):
    result = health("--target", f"127.0.0.1:{health_server.health_port}",
                    "--service", "no.such.Service")
    assert result.returncode == 1
    assert result.stdout.startswith("SERVICE_UNKNOWN"), result.stdout


def test_not_serving_exits_1(health_server):
    """The status the server reports while it drains (set here as stop() sets it)."""
    from grpc_health.v1 import health_pb2

    from sampler_service.server.app import SAMPLER_SERVICE
    asyncio.run_coroutine_threadsafe(
        health_server.health.set(SAMPLER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING),
        health_server._loop).result(10)
    result = health("--target", f"127.0.0.1:{health_server.health_port}")
    assert (result.returncode, result.stdout) == (1, "NOT_SERVING\n")


def test_an_unreachable_port_exits_2_with_one_line():
    port = free_port()
    result = health("--target", f"127.0.0.1:{port}", "--timeout", "5")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sampler-service health: 127.0.0.1:{port}: ")


def test_a_missing_socket_exits_2(tmp_path):
    result = health("--target", f"unix:{tmp_path / 'none.sock'}", "--timeout", "5")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def test_bad_usage_exits_2():
    assert health("--timeout", "0").returncode == 2
    assert health("--timeout", "soon").returncode == 2


def test_stays_light(health_server):
    """A HEALTHCHECK runs every few seconds beside the service: no torch, no numpy."""
    code = ("import sys\n"
            "from sampler_service.cli import main\n"
            f"code = main(['health', '--target', '127.0.0.1:{health_server.health_port}'])\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'numba') if m in sys.modules)\n"
            "print(code, heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.splitlines()[-1] == "0 []", (result.stdout, result.stderr)
