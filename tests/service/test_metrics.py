"""Prometheus metrics over HTTP: rows per policy, errors by code, live sequences, decisions."""
from __future__ import annotations

import urllib.request

import pytest
import torch

from sampler_client import InvalidArgumentError, SamplerClient


def scrape(server) -> dict[str, float]:
    """The server's /metrics as {sample name with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


@pytest.fixture
def metered(start_server):
    return start_server(metrics_port=0)


def test_rows_errors_and_live_sequences_are_counted(metered):
    with SamplerClient(metered.address) as client:
        greedy = client.create_sequence(policy="greedy")
        flat = client.create_sequence(params={"temperature": 0.5}, seed=1)
        client.step([greedy, flat], torch.randn(2, 16))
        greedy.step(torch.randn(16))
        with pytest.raises(InvalidArgumentError):
            greedy.step(torch.full((16,), float("nan")))
        samples = scrape(metered)
    assert samples['sampler_rows_total{policy="greedy"}'] == 2
    assert samples['sampler_rows_total{policy="(flat)"}'] == 1
    assert samples['sampler_errors_total{code="INVALID_ARGUMENT",method="Step"}'] == 1
    assert samples["sampler_live_sequences"] == 2
    assert samples["sampler_step_seconds_count"] == 2


def test_metrics_are_off_unless_a_port_is_given(server):
    assert server.metrics_port is None


def test_decisions_of_adaptive_policies_are_counted_per_policy(metered):
    """A near one-hot row is entropix's "flowing" quadrant; a flat one makes `sed` flag a
    chaotic point."""
    peaked = torch.full((32,), -30.0)
    peaked[3] = 0.0
    with SamplerClient(metered.address) as client:
        sequence = client.create_sequence(policy="entropix", seed=1)
        assert sequence.step(peaked).explanation["entropix"]["quadrant"] == "flowing"
        sequence.step(torch.zeros(32))
        samples = scrape(metered)
    assert samples['sampler_decisions_total{decision="quadrant=flowing",policy="entropix",'
                   'stage="entropix"}'] == 1
    assert samples['sampler_decisions_total{decision="chaotic=true",policy="entropix",'
                   'stage="sed"}'] == 1
    assert samples['sampler_decisions_total{decision="chaotic=false",policy="entropix",'
                   'stage="sed"}'] == 1
    assert samples['sampler_rows_total{policy="entropix"}'] == 2


def test_metrics_host_is_separate_from_the_data_path(start_server, tmp_path):
    """Data on a Unix socket only, metrics on their own address (a pod's Prometheus scrape)."""
    server = start_server(port=None, uds=tmp_path / "s.sock", metrics_port=0,
                          metrics_host="127.0.0.1")
    with SamplerClient(server.address) as client:
        client.create_sequence(policy="greedy").step(torch.tensor([0.0, 1.0]))
    assert scrape(server)['sampler_rows_total{policy="greedy"}'] == 1.0
