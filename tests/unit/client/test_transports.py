"""sampler_client.transports: target locality, placing tensors inline and in shared-memory
regions, reuse and growth of the ring, retiring, closing, and auto's fallback.

The placer is sans-I/O: these tests run it with the SDK's own driver (`run_sync`) and answer
its SharedMemory calls themselves, reading the placed bytes back from /dev/shm.
"""
from __future__ import annotations

import logging
import os

import grpc
import numpy as np
import pytest

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import run_sync
from sampler_client.errors import FailedPreconditionError, SamplerError
from sampler_client.regions import ALIGNMENT
from sampler_client.tensors import wire_tensor
from sampler_client.transports import TensorPlacer, is_local_target

LOCAL = "127.0.0.1:50051"
LOGITS = np.linspace(-3, 3, 2 * 1000, dtype=np.float32).reshape(2, 1000)


class SharedMemoryAnswers:
    """Answers a placer's SharedMemory calls as a service that has shared memory on, records
    them, and reads placed tensors back; `refuse` maps a method to the error it raises."""

    def __init__(self, refuse: dict[str, SamplerError] | None = None):
        self.calls: list = []
        self.keys: dict[str, str] = {}
        self.refuse = refuse or {}

    def __call__(self, rpc):
        self.calls.append(rpc)
        if rpc.method in self.refuse:
            raise self.refuse[rpc.method]
        if rpc.method == "RegisterSystemRegion":
            self.keys[rpc.request.name] = rpc.request.key
            return pb.RegisterRegionResponse()
        if rpc.method == "UnregisterRegion":
            return pb.UnregisterRegionResponse()
        raise AssertionError(f"unexpected call {rpc.method}")

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]

    def read(self, tensor: pb.Tensor) -> bytes:
        ref = tensor.shared_memory
        with open(f"/dev/shm/{self.keys[ref.region]}", "rb") as file:
            file.seek(ref.offset)
            return file.read(ref.byte_size)


def place(placer: TensorPlacer, answers: SharedMemoryAnswers, *values):
    return run_sync(placer.place([None if v is None else wire_tensor(v) for v in values]), answers)


def close(placer: TensorPlacer, answers: SharedMemoryAnswers) -> None:
    run_sync(placer.close(), answers)


@pytest.fixture
def placers():
    """make(target, transport, **options) -> a TensorPlacer closed (regions freed) afterwards."""
    made: list[TensorPlacer] = []

    def make(target: str = LOCAL, transport: str = "shm", **options) -> TensorPlacer:
        made.append(TensorPlacer(target, transport, **options))
        return made[-1]

    yield make
    for placer in made:
        close(placer, SharedMemoryAnswers())


def client_objects(placer: TensorPlacer) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"sps_{placer.client_id[:12]}")]


@pytest.mark.parametrize("target, local", [
    ("127.0.0.1:50051", True), ("localhost:50051", True), ("LOCALHOST", True),
    ("[::1]:50051", True), ("::1", True), ("127.8.9.10:1", True), ("unix:///tmp/s.sock", True),
    ("unix:relative.sock", True), ("unix-abstract:sampler", True), ("dns:///localhost:50051", True),
    ("dns://8.8.8.8/localhost:50051", True), ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
    ("ipv6:[::1]:50051", True),
    ("10.0.0.7:50051", False), ("sampler.svc:50051", False), ("0.0.0.0:50051", False),
    ("dns:///sampler.svc:443", False), ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
    ("[2001:db8::1]:50051", False),
])
def test_local_targets(target, local):
    assert is_local_target(target) is local


def test_bad_transport_or_ring_size_is_refused():
    with pytest.raises(ValueError, match="'udp' is not one of"):
        TensorPlacer(LOCAL, "udp")
    with pytest.raises(ValueError, match="ring_slots must be >= 1"):
        TensorPlacer(LOCAL, "shm", ring_slots=0)


def test_inline_places_the_bytes_in_the_message_without_calls(placers):
    answers = SharedMemoryAnswers()
    placement = place(placers(transport="inline"), answers, LOGITS, None)
    assert placement.tensors[0] == pb.Tensor(dtype=pb.FP32, shape=[2, 1000], raw=LOGITS.tobytes())
    assert placement.tensors[1] is None and answers.calls == [] and placement.lent == []


def test_shm_packs_a_requests_tensors_into_one_region_at_aligned_offsets(placers):
    torch = pytest.importorskip("torch")
    answers = SharedMemoryAnswers()
    placer = placers()
    sources = [torch.from_numpy(LOGITS).bfloat16(), LOGITS[:, ::2].astype(np.float16),
               torch.from_numpy(LOGITS).double().t().contiguous().t()[:, 3:4]]
    placement = place(placer, answers, *sources)
    assert answers.methods() == ["RegisterSystemRegion"]
    registration = answers.calls[0].request
    assert registration.client_id == placer.client_id and registration.offset == 0
    refs = [t.shared_memory for t in placement.tensors]
    assert {r.region for r in refs} == {registration.name}
    assert [r.offset % ALIGNMENT for r in refs] == [0, 0, 0]
    assert refs[0].offset + refs[0].byte_size <= refs[1].offset
    assert refs[-1].offset + refs[-1].byte_size <= registration.byte_size
    for tensor, source in zip(placement.tensors, sources):
        inline = wire_tensor(source)
        assert (tensor.dtype, list(tensor.shape)) == (inline.dtype, list(inline.shape))
        assert answers.read(tensor) == inline.raw()
    assert [t.dtype for t in placement.tensors] == [pb.BF16, pb.FP16, pb.FP32]


def test_a_region_is_reused_once_answered_and_never_while_in_flight(placers):
    answers = SharedMemoryAnswers()
    placer = placers()
    first = place(placer, answers, LOGITS)
    second = place(placer, answers, LOGITS)  # the first is still in flight
    assert first.tensors[0].shared_memory.region != second.tensors[0].shared_memory.region
    first.finish(answered=True)
    third = place(placer, answers, -LOGITS)
    assert third.tensors[0].shared_memory.region == first.tensors[0].shared_memory.region
    assert answers.read(third.tensors[0]) == (-LOGITS).tobytes()
    assert answers.methods() == ["RegisterSystemRegion"] * 2
    assert len(client_objects(placer)) == 2


def test_with_every_region_in_flight_a_tensor_goes_inline(placers):
    answers = SharedMemoryAnswers()
    placer = placers(ring_slots=1)
    in_flight = place(placer, answers, LOGITS)
    overflow = place(placer, answers, LOGITS)
    assert in_flight.tensors[0].HasField("shared_memory")
    assert overflow.tensors[0].raw == LOGITS.tobytes()


def test_a_request_that_does_not_fit_replaces_the_region(placers):
    answers = SharedMemoryAnswers()
    placer = placers(ring_slots=1)
    small = place(placer, answers, LOGITS)
    small.finish(answered=True)
    old_key = answers.keys[small.tensors[0].shared_memory.region]
    large_values = np.ones((2, 400_000), np.float32)
    large = place(placer, answers, large_values)
    assert answers.methods() == ["RegisterSystemRegion", "UnregisterRegion", "RegisterSystemRegion"]
    assert answers.calls[1].request == pb.UnregisterRegionRequest(
        name=small.tensors[0].shared_memory.region, client_id=placer.client_id)
    assert not os.path.exists(f"/dev/shm/{old_key}")
    assert answers.read(large.tensors[0]) == large_values.tobytes()
    assert client_objects(placer) == [answers.keys[large.tensors[0].shared_memory.region]]


def test_an_unanswered_region_is_retired_until_close(placers):
    answers = SharedMemoryAnswers()
    placer = placers(ring_slots=1)
    lost = place(placer, answers, LOGITS)
    lost.finish(answered=False)  # the service may still read it: never written again
    lost.finish(answered=True)  # a second finish changes nothing
    fresh = place(placer, answers, LOGITS)
    assert fresh.tensors[0].shared_memory.region != lost.tensors[0].shared_memory.region
    assert len(client_objects(placer)) == 2
    close(placer, answers)
    assert answers.calls[-1].request == pb.UnregisterRegionRequest(name="",
                                                                   client_id=placer.client_id)
    assert client_objects(placer) == []


def test_close_calls_nothing_when_nothing_was_registered(placers):
    answers = SharedMemoryAnswers()
    placer = placers(transport="auto")
    close(placer, answers)
    assert answers.calls == []


def test_close_still_unlinks_when_the_service_is_gone(placers):
    placer = placers()
    place(placer, SharedMemoryAnswers(), LOGITS)
    gone = SamplerError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    close(placer, SharedMemoryAnswers(refuse={"UnregisterRegion": gone}))
    assert client_objects(placer) == []


def test_auto_gives_shared_memory_up_once_when_the_service_refuses(placers, caplog):
    off = FailedPreconditionError(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is off")
    answers = SharedMemoryAnswers(refuse={"RegisterSystemRegion": off})
    placer = placers(transport="auto")
    with caplog.at_level(logging.INFO, logger="sampler_client.transports"):
        placements = [place(placer, answers, LOGITS) for _ in range(3)]
    assert [p.tensors[0].raw for p in placements] == [LOGITS.tobytes()] * 3
    assert answers.methods() == ["RegisterSystemRegion"]  # asked once, never again
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "shared memory is off" in caplog.records[0].getMessage()
    assert client_objects(placer) == []


def test_explicit_shm_raises_the_refusal_and_keeps_nothing(placers):
    off = FailedPreconditionError(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is off")
    placer = placers()
    with pytest.raises(FailedPreconditionError, match="shared memory is off"):
        place(placer, SharedMemoryAnswers(refuse={"RegisterSystemRegion": off}), LOGITS)
    assert client_objects(placer) == []
    answers = SharedMemoryAnswers()
    placement = place(placer, answers, LOGITS)  # the slot was given back
    assert placement.tensors[0].HasField("shared_memory")


def test_auto_sends_inline_to_a_remote_service(placers):
    answers = SharedMemoryAnswers()
    placement = place(placers("sampler.svc:50051", "auto"), answers, LOGITS)
    assert placement.tensors[0].raw == LOGITS.tobytes() and answers.calls == []


def test_auto_sends_host_tensors_of_a_unix_socket_target_through_shared_memory(placers):
    answers = SharedMemoryAnswers()
    placement = place(placers("unix:///tmp/sampler.sock", "auto"), answers, LOGITS)
    assert answers.read(placement.tensors[0]) == LOGITS.tobytes()


def test_explicit_cuda_ipc_without_a_gpu_says_so(placers):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this process sees a CUDA device")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        place(placers(transport="cuda_ipc"), SharedMemoryAnswers(), LOGITS)


@pytest.mark.gpu
def test_auto_places_cuda_tensors_in_one_cuda_region(placers):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cupy")
    answers = SharedMemoryAnswers()
    registered = []

    def accept_cuda(rpc):
        if rpc.method == "RegisterCudaRegion":
            registered.append(rpc.request)
            return pb.RegisterRegionResponse()
        return answers(rpc)

    placer = placers(transport="auto")
    sources = [torch.from_numpy(LOGITS).cuda().bfloat16(), torch.from_numpy(LOGITS).cuda()]
    placement = run_sync(placer.place([wire_tensor(s) for s in sources]), accept_cuda)
    (registration,) = registered
    assert len(registration.raw_handle) == 64 and registration.device_id == sources[0].device.index
    assert [t.WhichOneof("data") for t in placement.tensors] == ["cuda_ipc", "cuda_ipc"]
    slot_bytes = placement.lent[0][1].region._bytes
    for tensor, source in zip(placement.tensors, sources):
        ref = tensor.cuda_ipc
        written = slot_bytes[ref.offset:ref.offset + ref.byte_size].cpu().numpy().tobytes()
        assert written == wire_tensor(source).raw()
