"""Micro-batching through the real server: concurrent callers' rows run as one engine call,
each caller gets exactly its own answers (the tokens it gets alone), and a bad request in a
batch fails alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sampler_client import FailedPreconditionError, InvalidArgumentError, SamplerClient

STREAMS, STEPS, VOCAB = 8, 6, 300


def logits_for(stream: int, step: int) -> torch.Tensor:
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(stream * 1000 + step))


def wait_for_streams(server, count: int) -> None:
    deadline = time.monotonic() + 10
    while server.servicer.open_streams < count:
        assert time.monotonic() < deadline, "the streams did not open"
        time.sleep(0.01)


def run_streams(server, policy: str = "creative") -> list[list[int]]:
    """STREAMS workers, one stream each, stepping one seeded sequence in lockstep."""
    barrier = threading.Barrier(STREAMS)
    with SamplerClient(server.address) as client:
        sequences = [client.create_sequence(policy=policy, seed=i) for i in range(STREAMS)]
        streams = [client.stream() for _ in range(STREAMS)]
        wait_for_streams(server, STREAMS)

        def worker(i: int) -> list[int]:
            tokens = []
            for step in range(STEPS):
                barrier.wait()
                tokens.append(streams[i].step([sequences[i]], logits_for(i, step))[0].token_id)
            return tokens

        with ThreadPoolExecutor(STREAMS) as pool:
            tokens = list(pool.map(worker, range(STREAMS)))
        for stream in streams:
            stream.close()
        client.release(sequences)
    return tokens


def test_concurrent_streams_share_engine_calls_and_get_their_own_tokens(start_server):
    batched = start_server(batch_window_us=500_000)
    together = run_streams(batched)
    assert batched.batcher.batches < batched.batcher.requests  # rows did share engine calls
    alone = start_server(batch_window_us=0, max_batch_rows=1)
    assert run_streams(alone) == together
    assert alone.batcher.batches == alone.batcher.requests


def test_a_bad_request_in_a_batch_fails_alone(start_server):
    """Three streams send at once into one batch: a request with NaN logits (refused by
    validation), one whose policy masks every token (refused while planning), and a good one."""
    server = start_server(batch_window_us=2_000_000)
    with SamplerClient(server.address) as client:
        good, bad, empty = (client.create_sequence(policy="greedy"),
                            client.create_sequence(policy="greedy"),
                            client.create_sequence(params={"min_tokens": 3}, eos_token_ids=[0]))
        streams = [client.stream() for _ in range(3)]
        wait_for_streams(server, 3)
        only_eos = torch.full((1, VOCAB), float("-inf"))
        only_eos[0, 0] = 1.0
        nan = torch.zeros(1, VOCAB)
        nan[0, 5] = float("nan")
        row = torch.zeros(1, VOCAB)
        row[0, 7] = 3.0
        work = [(streams[0], good, row), (streams[1], bad, nan), (streams[2], empty, only_eos)]
        before = server.batcher.batches

        def send(item):
            stream, sequence, logits = item
            try:
                return stream.step([sequence], logits)[0].token_id
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                return exc

        with ThreadPoolExecutor(3) as pool:
            token, nan_error, masked_error = pool.map(send, work)
        assert server.batcher.batches == before + 1  # one engine batch for the three
        assert token == 7
        assert isinstance(nan_error, InvalidArgumentError) and nan_error.fields == ["logits"]
        assert isinstance(masked_error, FailedPreconditionError)
        assert bad.info().output_ids == [] and empty.info().output_ids == []
        assert good.info().output_ids == [7]
        for stream in streams:
            stream.close()


def test_a_request_larger_than_max_batch_rows_runs_alone(start_server):
    server = start_server(max_batch_rows=2)
    with SamplerClient(server.address) as client:
        sequences = [client.create_sequence(policy="greedy") for _ in range(5)]
        logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
        choices = client.step(sequences, logits)
    assert [c.token_id for c in choices] == logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("rows", [0, -1])
def test_max_batch_rows_must_be_positive(start_server, rows):
    with pytest.raises(ValueError, match="--max-batch-rows"):
        start_server(max_batch_rows=rows)


def test_same_sequence_twice_never_shares_a_batch(start_server):
    """A retry racing its original: both answered with the one recorded step."""
    server = start_server(batch_window_us=500_000)
    with SamplerClient(server.address) as client:
        sequence = client.create_sequence(policy="default", seed=5)
        streams = [client.stream() for _ in range(2)]
        wait_for_streams(server, 2)
        logits = logits_for(0, 0)

        def send(stream):
            sequence_copy = type(sequence)(client, _created(sequence))
            return stream.step([sequence_copy], logits)[0]

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(send, streams)
        assert (first.step, first.token_id) == (second.step, second.token_id) == (0, first.token_id)
        assert sequence.info().output_ids == [first.token_id]
        for stream in streams:
            stream.close()


def _created(sequence):
    from sampler_proto.sampler.v1 import sampler_pb2 as pb
    return pb.CreatedSequence(sequence_id=sequence.sequence_id, policy=sequence.policy,
                              seed=sequence.seed)


def lone_stream_tokens(server, steps: int = 6) -> tuple[list[int], int]:
    """(tokens of one seeded sequence stepped alone over a stream, the batches run)."""
    with SamplerClient(server.address) as client:
        sequence = client.create_sequence(policy="creative", seed=5)
        with client.stream() as stream:
            tokens = [stream.step([sequence], logits_for(0, step))[0].token_id
                      for step in range(steps)]
    return tokens, server.batcher.batches


def test_small_steps_on_the_event_loop_equal_those_in_the_engine_thread(start_server, tmp_path):
    on_loop = start_server()
    assert on_loop.servicer.runner.engine_idle is not None  # a CPU engine: allowed
    in_thread = start_server(state_dir=tmp_path)
    assert in_thread.servicer.runner.engine_idle is None  # never waits on a disk or a snapshot
    assert lone_stream_tokens(on_loop) == lone_stream_tokens(in_thread)
