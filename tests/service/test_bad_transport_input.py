"""Bad shared-memory and sparse input through the real server: each gets a precise status
naming its field, the server stays up and the sequence it names (and every other) is
untouched."""
from __future__ import annotations

import math
import struct
import threading
import time
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
import torch

from sampler_client import (FailedPreconditionError, InvalidArgumentError, NotFoundError,
                            SamplerClient)
from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc

VOCAB = 16


@pytest.fixture
def shm():
    """A 256-byte POSIX shared-memory object holding VOCAB fp32 logits (argmax 3) twice."""
    segment = shared_memory.SharedMemory(create=True, size=256)
    values = np.zeros(VOCAB, dtype="<f4")
    values[3] = 5.0
    segment.buf[:64] = values.tobytes()
    segment.buf[64:128] = values.tobytes()
    yield segment
    segment.close()
    segment.unlink()


@pytest.fixture
def regions(server):
    with grpc.insecure_channel(server.address) as channel:
        yield sampler_pb2_grpc.SharedMemoryStub(channel)


@pytest.fixture
def sequence(client):
    seq = client.create_sequence(policy="greedy")
    yield seq
    assert seq.info().output_ids == []  # the bad step changed nothing


def step_with(client, sequence, tensor: pb.Tensor | None = None, sparse=None):
    request = pb.StepRequest(rows=[pb.StepRow(sequence_id=sequence.sequence_id)])
    if tensor is not None:
        request.logits.CopyFrom(tensor)
    if sparse is not None:
        request.sparse.CopyFrom(sparse)
    return client._call(client._stub.Step, request)


def region_tensor(region: str, offset: int = 0, byte_size: int = 64) -> pb.Tensor:
    return pb.Tensor(dtype=pb.FP32, shape=[1, VOCAB], shared_memory=pb.RegionRef(
        region=region, offset=offset, byte_size=byte_size))


def test_a_registered_region_steps(client, regions, shm):
    regions.RegisterSystemRegion(pb.RegisterSystemRegionRequest(name="r", key=shm.name,
                                                                byte_size=256))
    seq = client.create_sequence(policy="greedy")
    assert step_with(client, seq, region_tensor("r", offset=64)).choices[0].token_id == 3


def test_an_unknown_region_is_not_found(client, sequence):
    with pytest.raises(NotFoundError) as err:
        step_with(client, sequence, region_tensor("nope"))
    assert err.value.fields == ["logits.shared_memory.region"]


@pytest.mark.parametrize("offset, byte_size", [(224, 64), (0, 60)])
def test_a_range_outside_the_region_or_off_the_shape_is_invalid(client, regions, shm, sequence,
                                                                 offset, byte_size):
    regions.RegisterSystemRegion(pb.RegisterSystemRegionRequest(name="r", key=shm.name,
                                                                byte_size=256))
    with pytest.raises(InvalidArgumentError) as err:
        step_with(client, sequence, region_tensor("r", offset, byte_size))
    assert err.value.fields == ["logits.shared_memory.byte_size"]


@pytest.mark.parametrize("key", ["/dev/shm/x", "a/b", "../x", ""])
def test_a_key_that_is_a_path_is_invalid(regions, key):
    with pytest.raises(grpc.RpcError) as err:
        regions.RegisterSystemRegion(pb.RegisterSystemRegionRequest(name="r", key=key,
                                                                    byte_size=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_region_cannot_be_unregistered_while_a_step_reads_it(start_server, shm):
    """The step waits in the batcher (another open stream may still send) holding its region."""
    server = start_server(batch_window_us=1_500_000)
    with SamplerClient(server.address, transport="inline") as client, \
            grpc.insecure_channel(server.address) as channel:
        regions = sampler_pb2_grpc.SharedMemoryStub(channel)
        regions.RegisterSystemRegion(pb.RegisterSystemRegionRequest(name="r", key=shm.name,
                                                                    byte_size=256))
        seq = client.create_sequence(policy="greedy")
        idle = client.stream()  # a caller with nothing queued: the batcher waits for it
        answers = []
        stepping = threading.Thread(target=lambda: answers.append(
            step_with(client, seq, region_tensor("r"))))
        stepping.start()
        deadline = time.monotonic() + 5
        while regions.RegionStatus(pb.RegionStatusRequest(name="r")).regions[0].in_use == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as err:
            regions.UnregisterRegion(pb.UnregisterRegionRequest(name="r"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stepping.join()
        idle.close()
        assert answers[0].choices[0].token_id == 3
        assert list(regions.UnregisterRegion(pb.UnregisterRegionRequest(name="r")).unregistered) == ["r"]


def test_region_references_are_refused_when_shared_memory_is_off(start_server):
    server = start_server(allow_shared_memory=False)
    with SamplerClient(server.address, transport="inline") as client:
        seq = client.create_sequence(policy="greedy")
        with pytest.raises(FailedPreconditionError, match="--allow-shared-memory"):
            step_with(client, seq, region_tensor("r"))


#: The tail of a row whose VOCAB - 2 unsent logits are all 0.
FLAT_TAIL = (0.0, math.log(VOCAB - 2), 0.0, 0.0)


def sparse_rows(ids, values, tail=FLAT_TAIL, vocab=VOCAB) -> pb.SparseRows:
    top, lse, mean, square = tail
    return pb.SparseRows(rows=[0], vocab_size=vocab, token_ids=struct.pack(f"<{len(ids)}i", *ids),
                         logits=pb.Tensor(dtype=pb.FP32, shape=[1, len(values)],
                                          raw=np.asarray(values, dtype="<f4").tobytes()),
                         tails=[pb.TailStats(max=top, log_sum_exp=lse, mean=mean,
                                             mean_square=square)])


def test_a_consistent_sparse_row_steps(client):
    seq = client.create_sequence(policy="greedy")
    choice = step_with(client, seq, sparse=sparse_rows([4, 9], [5.0, 1.0])).choices[0]
    assert choice.token_id == 4
    full = math.log(math.exp(5.0) + math.exp(1.0) + (VOCAB - 2))
    assert choice.logprob == pytest.approx(5.0 - full, abs=1e-5)


@pytest.mark.parametrize("why, ids, values, tail, vocab, field", [
    ("duplicate ids", [4, 4], [5.0, 1.0], FLAT_TAIL, VOCAB, "sparse.token_ids"),
    ("an id past the vocabulary", [4, VOCAB], [5.0, 1.0], FLAT_TAIL, VOCAB, "sparse.token_ids"),
    ("K larger than the vocabulary", [0, 1, 2], [3.0, 2.0, 1.0], (-math.inf, -math.inf, 0, 0), 2,
     "sparse.logits.shape"),
    ("a tail max above a sent logit", [4, 9], [5.0, 1.0], (3.0, 4.0, 2.0, 5.0), VOCAB,
     "sparse.tails[0].max"),
])
def test_inconsistent_sparse_rows_name_their_field(client, sequence, why, ids, values, tail,
                                                   vocab, field):
    with pytest.raises(InvalidArgumentError) as err:
        step_with(client, sequence, sparse=sparse_rows(ids, values, tail, vocab))
    assert err.value.fields[0].startswith(field), why


def test_dense_logits_must_cover_the_rows_not_sent_sparse(client, sequence):
    other = client.create_sequence(policy="greedy")
    request = pb.StepRequest(rows=[pb.StepRow(sequence_id=sequence.sequence_id),
                                   pb.StepRow(sequence_id=other.sequence_id)],
                             sparse=sparse_rows([4, 9], [5.0, 1.0]))
    with pytest.raises(InvalidArgumentError) as err:
        client._call(client._stub.Step, request)
    assert err.value.fields == ["logits.shape"]
    assert other.info().output_ids == []


def test_a_group_refuses_sparse_rows_for_good(client):
    group = client.create_beam_group([1, 2], num_beams=2, max_new_tokens=3)
    request = pb.StepRequest(rows=[pb.StepRow(sequence_id=group.sequence_id)] * 2,
                             sparse=pb.SparseRows(
                                 rows=[0, 1], vocab_size=VOCAB,
                                 token_ids=struct.pack("<4i", 4, 9, 4, 9),
                                 logits=pb.Tensor(dtype=pb.FP32, shape=[2, 2],
                                                  raw=np.asarray([5, 1, 5, 1], "<f4").tobytes()),
                                 tails=[pb.TailStats(max=0.0, log_sum_exp=FLAT_TAIL[1])] * 2))
    with pytest.raises(FailedPreconditionError) as err:
        client._call(client._stub.Step, request)
    assert err.value.fields == ["rows[0].policy", "rows[1].policy"]
    assert all(v.description.startswith("groups need full rows")
               for v in err.value.field_violations)
