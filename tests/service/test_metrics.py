"""Prometheus metrics over HTTP, through the real server and SDK: RPCs by code, steps by policy
and transport, payload bytes, batch rows, in-flight requests and open streams, rows, bounded
decisions, live sequences, the process collectors and no `_created` series; and one
`request_failed` log record per failed request."""
from __future__ import annotations

import logging
import time
import urllib.request

import pytest
import torch

from sampler_client import (InvalidArgumentError, NotFoundError, ResourceExhaustedError,
                            SamplerClient)
from sampler_service.server.metrics import decision_labels

VOCAB = 16


def scrape_text(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()


def scrape(server) -> dict[str, float]:
    """The server's /metrics as {sample name with labels: value}."""
    samples = {}
    for line in scrape_text(server).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def metered(start_server):
    return start_server(metrics_port=0)


def test_rows_errors_and_live_sequences_are_counted(metered):
    with SamplerClient(metered.address, transport="inline") as client:
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
    assert samples['sampler_rpc_total{code="INVALID_ARGUMENT",method="Step"}'] == 1
    assert samples["sampler_live_sequences"] == 2
    assert samples['sampler_step_duration_seconds_count{policy="(mixed)",transport="inline"}'] == 1
    assert samples['sampler_step_duration_seconds_count{policy="greedy",transport="inline"}'] == 1


def test_requests_steps_payload_and_batches_are_counted(metered):
    """Every step here is alone in its batch (one caller at a time): batch rows are the rows
    of each request, the NaN one included (it fails in the batch)."""
    nan = torch.full((VOCAB,), float("nan"))
    with SamplerClient(metered.address, transport="inline", replay=False) as client:
        greedy = client.create_sequence(policy="greedy")
        flat = client.create_sequence(params={"temperature": 0.5}, seed=1)
        inline = client.create_sequence(policy={"chain": [{"top_k": {"k": 3}}], "select": "greedy"})
        client.step([greedy, flat], torch.randn(2, VOCAB))      # (mixed), 2 rows
        greedy.step(torch.randn(VOCAB))                          # greedy
        inline.step(torch.randn(VOCAB))                          # inline
        with pytest.raises(InvalidArgumentError):
            greedy.step(nan)                                     # counted, not timed
        stream = client.stream()
        stream.step([greedy], torch.randn(1, VOCAB))             # greedy, on the stream
        stream.close()
    with SamplerClient(metered.address, transport="shm", replay=False) as client:
        client.create_sequence(policy="greedy").step(torch.randn(VOCAB))   # greedy over shm
    wait_for(lambda: scrape(metered)["sampler_open_streams"] == 0)
    text = scrape_text(metered)
    samples = scrape(metered)

    rpc = {key[len("sampler_rpc_total"):]: value for key, value in samples.items()
           if key.startswith("sampler_rpc_total{")}
    assert rpc['{code="OK",method="CreateSequences"}'] == 4
    assert rpc['{code="OK",method="Step"}'] == 4
    assert rpc['{code="INVALID_ARGUMENT",method="Step"}'] == 1
    assert rpc['{code="OK",method="StepStream"}'] == 1
    assert rpc['{code="OK",method="RegisterSystemRegion"}'] >= 1
    assert samples['sampler_errors_total{code="INVALID_ARGUMENT",method="Step"}'] == 1
    assert not [key for key in samples if key.startswith("sampler_errors_total") and "OK" in key]

    steps = {key[len("sampler_step_duration_seconds_count"):]: value
             for key, value in samples.items()
             if key.startswith("sampler_step_duration_seconds_count{")}
    assert steps == {'{policy="(mixed)",transport="inline"}': 1,
                     '{policy="greedy",transport="inline"}': 2,
                     '{policy="inline",transport="inline"}': 1,
                     '{policy="greedy",transport="shm"}': 1}
    assert samples['sampler_step_duration_seconds_bucket{le="+Inf",policy="greedy",'
                   'transport="inline"}'] == 2

    # fp32: rows x vocab x 4 bytes, the failed request's included
    inline_rows = 2 + 1 + 1 + 1 + 1
    assert samples['sampler_payload_bytes_total{transport="inline"}'] == inline_rows * VOCAB * 4
    assert samples['sampler_payload_bytes_total{transport="shm"}'] == VOCAB * 4

    assert samples["sampler_batch_rows_count"] == 6
    assert samples["sampler_batch_rows_sum"] == 7
    assert samples['sampler_batch_rows_bucket{le="1.0"}'] == 5

    assert samples['sampler_rows_total{policy="greedy"}'] == 4
    assert samples['sampler_rows_total{policy="(flat)"}'] == 1
    assert samples['sampler_rows_total{policy="inline"}'] == 1
    assert samples["sampler_inflight_requests"] == 0
    assert samples["sampler_open_streams"] == 0
    assert samples["sampler_live_sequences"] == 4

    assert samples["process_resident_memory_bytes"] > 0
    assert samples["process_cpu_seconds_total"] > 0
    assert any(key.startswith("python_info{") for key in samples)
    assert any(key.startswith("python_gc_objects_collected_total{") for key in samples)
    names = [line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
             for line in text.splitlines() if line]
    assert not [name for name in names if name.endswith("_created")]
    openmetrics = urllib.request.Request(
        f"http://127.0.0.1:{metered.metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(openmetrics, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        assert "_created" not in answer.read().decode()


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
    assert samples['sampler_decisions_total{decision="action=argmax",policy="entropix",'
                   'stage="entropix"}'] == 1
    assert samples['sampler_decisions_total{decision="chaotic=true",policy="entropix",'
                   'stage="sed"}'] == 1
    assert samples['sampler_decisions_total{decision="chaotic=false",policy="entropix",'
                   'stage="sed"}'] == 1
    assert samples['sampler_rows_total{policy="entropix"}'] == 2
    decisions = [key for key in samples if key.startswith("sampler_decisions_total{")]
    assert not [key for key in decisions if 'decision="other"' in key], decisions


def test_only_declared_decisions_of_registered_stages_become_labels():
    """What a stage did not declare, or a key that names no stage, is "other": a plug-in
    cannot make series without bound."""
    assert decision_labels("sed", "chaotic", True) == ("sed", "chaotic=true")
    assert decision_labels("hot_or_cold", "challenging", False) == ("hot_or_cold",
                                                                    "challenging=false")
    assert decision_labels("entropix", "quadrant", "exploring") == ("entropix",
                                                                    "quadrant=exploring")
    assert decision_labels("entropix", "quadrant", "request-1234") == ("entropix", "other")
    assert decision_labels("entropix", "note", "anything") == ("entropix", "other")
    assert decision_labels("top_k", "mode", "x") == ("top_k", "other")
    assert decision_labels("no_such_stage", "quadrant", "flowing") == ("other", "other")


def test_metrics_host_is_separate_from_the_data_path(start_server, tmp_path):
    """Data on a Unix socket only, metrics on their own address (a pod's Prometheus scrape)."""
    server = start_server(port=None, uds=tmp_path / "s.sock", metrics_port=0,
                          metrics_host="127.0.0.1")
    with SamplerClient(server.address) as client:
        client.create_sequence(policy="greedy").step(torch.tensor([0.0, 1.0]))
    assert scrape(server)['sampler_rows_total{policy="greedy"}'] == 1.0


def failures(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "request_failed"]


def test_each_failed_request_is_logged_once_with_its_fields(metered, caplog):
    caplog.set_level(logging.INFO, logger="sampler_service.requests")
    nan = torch.full((VOCAB,), float("nan"))
    with SamplerClient(metered.address, transport="inline", replay=False) as client:
        greedy = client.create_sequence(policy="greedy", sequence_id="seq-a")
        greedy.step(torch.randn(VOCAB))
        gone = client.create_sequence(policy="greedy", sequence_id="seq-gone")
        client.release([gone])
        assert failures(caplog) == []  # successes log nothing here

        with pytest.raises(InvalidArgumentError):
            greedy.step(nan)
        with pytest.raises(NotFoundError):
            gone.step(torch.randn(VOCAB))
        with pytest.raises(NotFoundError):
            client.create_sequence(policy="no-such-policy", sequence_id="seq-b")
        stream = client.stream()
        with pytest.raises(InvalidArgumentError):
            stream.step([greedy], nan.unsqueeze(0))
        stream.step([greedy], torch.randn(1, VOCAB))  # the stream goes on
        stream.close()
    records = failures(caplog)
    got = [(r.method, r.code, r.sequence_id, r.levelno, r.name) for r in records]
    assert got == [("Step", "INVALID_ARGUMENT", "seq-a", logging.INFO, "sampler_service.requests"),
                   ("Step", "NOT_FOUND", "seq-gone", logging.INFO, "sampler_service.requests"),
                   ("CreateSequences", "NOT_FOUND", "seq-b", logging.INFO,
                    "sampler_service.requests"),
                   ("StepStream", "INVALID_ARGUMENT", "seq-a", logging.INFO,
                    "sampler_service.requests")]
    assert records[1].field == "rows[0].sequence_id"
    assert records[2].field == "sequences[0].policy"
    assert all(r.field for r in records)
    assert "Step failed: INVALID_ARGUMENT" in records[0].getMessage()
    samples = scrape(metered)
    assert samples['sampler_rpc_total{code="INVALID_ARGUMENT",method="StepStream"}'] == 1
    assert samples['sampler_rpc_total{code="OK",method="StepStream"}'] == 1
    assert samples['sampler_rpc_total{code="NOT_FOUND",method="CreateSequences"}'] == 1


def test_a_refused_stream_is_logged_as_a_warning_and_counted(start_server, caplog):
    caplog.set_level(logging.INFO, logger="sampler_service.requests")
    server = start_server(metrics_port=0, max_streams=0)
    with SamplerClient(server.address, transport="inline", replay=False) as client:
        sequence = client.create_sequence(policy="greedy")
        stream = client.stream()
        with pytest.raises(ResourceExhaustedError):
            stream.step([sequence], torch.randn(1, VOCAB))
        stream.close()
    [record] = failures(caplog)
    assert (record.method, record.code, record.field, record.sequence_id, record.levelno) == (
        "StepStream", "RESOURCE_EXHAUSTED", "--max-streams", None, logging.WARNING)
    samples = scrape(server)
    assert samples['sampler_rpc_total{code="RESOURCE_EXHAUSTED",method="StepStream"}'] == 1
    assert samples["sampler_open_streams"] == 0 and samples["sampler_inflight_requests"] == 0
