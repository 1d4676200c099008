"""decode_tensor: every wire dtype on every transport equals a plain NumPy decoding of the
same bytes (random bytes, so NaN, infinity and subnormal patterns too), every bad tensor and
region reference names its field; region_refs lists what a step must hold. CUDA cases skip
without CUDA and cupy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import FailedPrecondition, InvalidArgument, NotFound
from sampler_service.transport.codec import ELEMENT_SIZE, decode_tensor, region_refs
from tests.unit.transport.conftest import requires_cuda

CPU = torch.device("cpu")
DTYPES = [pb.FP32, pb.FP16, pb.BF16]


def reference_decode(data: bytes, dtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The straightforward decoding: NumPy reads little-endian elements and widens them to
    float32; BF16 is the upper half of a float32."""
    if dtype == pb.FP32:
        values = np.frombuffer(data, "<f4").astype(np.float32)
    elif dtype == pb.FP16:
        values = np.frombuffer(data, "<f2").astype(np.float32)
    else:
        values = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(values.reshape(shape).copy())


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit, except that any NaN matches any NaN."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    actual = actual.cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def region_tensor(dtype: int, shape, which: str, region: str, offset: int,
                  byte_size: int | None = None) -> pb.Tensor:
    size = math.prod(shape) * ELEMENT_SIZE[dtype] if byte_size is None else byte_size
    return pb.Tensor(dtype=dtype, shape=list(shape), **{which: pb.RegionRef(
        region=region, offset=offset, byte_size=size)})


def field_of(excinfo) -> str:
    return excinfo.value.field


# --- every dtype on every transport ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_bytes_decode_like_the_reference(dtype):
    data = np.random.default_rng(dtype).integers(0, 256, 2 * 7 * ELEMENT_SIZE[dtype],
                                                 dtype=np.uint8).tobytes()
    tensor = pb.Tensor(dtype=dtype, shape=[2, 7], raw=data)
    assert_same_floats(decode_tensor(tensor, "logits", CPU), reference_decode(data, dtype, (2, 7)))


def test_every_transport_decodes_like_the_reference(shm_objects, cpu_regions):
    """Region bases and reference offsets at every alignment (a misaligned offset takes the
    extra-copy path)."""
    shm = shm_objects(bytes(8192))
    for base in range(4):
        cpu_regions.register_system(f"r{base}", shm.name, base, 4096, "")

    @given(dtype=st.sampled_from(DTYPES),
           shape=st.lists(st.integers(1, 9), min_size=1, max_size=2).map(tuple),
           base=st.integers(0, 3), offset=st.integers(0, 64), seed=st.integers(0, 2**32 - 1))
    @settings(max_examples=200, deadline=None)
    def check(dtype, shape, base, offset, seed):
        size = math.prod(shape) * ELEMENT_SIZE[dtype]
        data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
        shm.buf[base + offset:base + offset + size] = data
        expected = reference_decode(data, dtype, shape)
        raw = pb.Tensor(dtype=dtype, shape=list(shape), raw=data)
        assert_same_floats(decode_tensor(raw, "logits", CPU, cpu_regions), expected)
        shared = region_tensor(dtype, shape, "shared_memory", f"r{base}", offset)
        assert_same_floats(decode_tensor(shared, "logits", CPU, cpu_regions), expected)

    check()


def test_a_decoded_region_is_a_copy_of_its_bytes_then(shm_objects, cpu_regions):
    values = torch.arange(12, dtype=torch.float32)
    shm = shm_objects(values.numpy().tobytes())
    cpu_regions.register_system("r", shm.name, 0, 48, "")
    decoded = decode_tensor(region_tensor(pb.FP32, (3, 4), "shared_memory", "r", 0), "logits",
                            CPU, cpu_regions)
    shm.buf[:48] = bytes(48)  # the worker's next step
    assert torch.equal(decoded, values.view(3, 4))
    decoded.add_(1)  # the engine may write its copy
    assert bytes(shm.buf[:48]) == bytes(48)


def test_a_decoded_raw_tensor_is_writable_and_leaves_the_message_alone():
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    tensor = pb.Tensor(dtype=pb.FP32, shape=[6], raw=data)
    decoded = decode_tensor(tensor, "logits", CPU)
    decoded.mul_(2)
    assert tensor.raw == data
    assert decoded.tolist() == [0, 2, 4, 6, 8, 10]


# --- bad tensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_an_unsupported_dtype_is_invalid(dtype):
    with pytest.raises(InvalidArgument, match="use FP32, FP16 or BF16") as excinfo:
        decode_tensor(pb.Tensor(dtype=dtype, shape=[1], raw=bytes(4)), "logits", CPU)
    assert field_of(excinfo) == "logits.dtype"


@pytest.mark.parametrize("shape", [[], [0], [2, 0], [3, -1]])
def test_an_empty_shape_is_invalid(shape):
    with pytest.raises(InvalidArgument) as excinfo:
        decode_tensor(pb.Tensor(dtype=pb.FP32, shape=shape, raw=b""), "reference_logits", CPU)
    assert field_of(excinfo) == "reference_logits.shape"


@pytest.mark.parametrize("dims", [3, 65, 10_000])
@pytest.mark.parametrize("field", ["logits", "reference_logits", "sparse.logits"])
def test_more_than_two_dimensions_are_invalid(dims, field):
    """Every tensor is [rows, vocab], [vocab] or [rows, K]: a third dimension (torch allows
    64) is refused before anything is sized, and the message shows only the first four."""
    tensor = pb.Tensor(dtype=pb.FP32, shape=[1] * (dims - 1) + [4], raw=bytes(16))
    with pytest.raises(InvalidArgument, match=f"has {dims} dimensions; a tensor has at most 2"
                       ) as excinfo:
        decode_tensor(tensor, field, CPU)
    assert field_of(excinfo) == f"{field}.shape"
    assert len(str(excinfo.value)) < 200


def test_a_tensor_without_data_is_invalid():
    with pytest.raises(InvalidArgument, match="set `raw`, `shared_memory` or `cuda_ipc`") as excinfo:
        decode_tensor(pb.Tensor(dtype=pb.FP32, shape=[1]), "logits", CPU)
    assert field_of(excinfo) == "logits.raw"


@pytest.mark.parametrize("size", [0, 7, 9])
def test_raw_bytes_of_the_wrong_size_are_invalid(size):
    with pytest.raises(InvalidArgument, match=f"raw holds {size} bytes but shape") as excinfo:
        decode_tensor(pb.Tensor(dtype=pb.FP16, shape=[2, 2], raw=bytes(size)), "logits", CPU)
    assert field_of(excinfo) == "logits.raw"


# --- bad region references ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["shared_memory", "cuda_ipc"])
def test_regions_while_shared_memory_is_off_are_a_failed_precondition(which):
    with pytest.raises(FailedPrecondition, match="--allow-shared-memory") as excinfo:
        decode_tensor(region_tensor(pb.FP32, (1, 4), which, "r", 0), "logits", CPU, None)
    assert field_of(excinfo) == f"logits.{which}"


def test_an_unknown_region_is_not_found(cpu_regions):
    with pytest.raises(NotFound) as excinfo:
        decode_tensor(region_tensor(pb.FP32, (1, 4), "shared_memory", "r", 0), "sparse.logits",
                      CPU, cpu_regions)
    assert field_of(excinfo) == "sparse.logits.shared_memory.region"


def test_a_region_of_the_other_kind_is_invalid(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with pytest.raises(InvalidArgument, match="system region; reference it as shared_memory") \
            as excinfo:
        decode_tensor(region_tensor(pb.FP32, (1, 4), "cuda_ipc", "r", 0), "logits", CPU,
                      cpu_regions)
    assert field_of(excinfo) == "logits.cuda_ipc.region"


@pytest.mark.parametrize("offset, byte_size", [(1, 16), (16, 1), (2**63, 16)])
def test_a_range_beyond_the_region_is_invalid(shm_objects, cpu_regions, offset, byte_size):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with pytest.raises(InvalidArgument, match="beyond region 'r' of 16 bytes") as excinfo:
        decode_tensor(region_tensor(pb.FP32, (1, 4), "shared_memory", "r", offset, byte_size),
                      "logits", CPU, cpu_regions)
    assert field_of(excinfo) == "logits.shared_memory.byte_size"


@pytest.mark.parametrize("byte_size", [0, 8, 12])
def test_a_byte_size_that_is_not_the_shape_is_invalid(shm_objects, cpu_regions, byte_size):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with pytest.raises(InvalidArgument, match=f"byte_size is {byte_size} but shape \\[2, 2\\] "
                       "of FP32 needs 16 bytes") as excinfo:
        decode_tensor(region_tensor(pb.FP32, (2, 2), "shared_memory", "r", 0, byte_size),
                      "logits", CPU, cpu_regions)
    assert field_of(excinfo) == "logits.shared_memory.byte_size"


def test_a_shrunk_object_is_a_failed_precondition(shrunk_region):
    with pytest.raises(FailedPrecondition, match="register the region again") as excinfo:
        decode_tensor(region_tensor(pb.FP32, (1, 4), "shared_memory", "r", 0), "logits", CPU,
                      shrunk_region)
    assert field_of(excinfo) == "logits.shared_memory.region"


# --- region_refs ----------------------------------------------------------------------------

def test_region_refs_lists_every_region_backed_tensor_of_a_step():
    request = pb.StepRequest(
        logits=region_tensor(pb.FP32, (1, 4), "shared_memory", "a", 0),
        reference_logits=region_tensor(pb.FP16, (1, 4), "cuda_ipc", "b", 64),
        sparse=pb.SparseRows(logits=region_tensor(pb.FP32, (1, 2), "shared_memory", "a", 16)))
    assert region_refs(request) == [("a", "logits.shared_memory.region"),
                                    ("b", "reference_logits.cuda_ipc.region"),
                                    ("a", "sparse.logits.shared_memory.region")]


def test_region_refs_skips_inline_and_unset_tensors():
    assert region_refs(pb.StepRequest()) == []
    assert region_refs(pb.StepRequest(
        logits=pb.Tensor(dtype=pb.FP32, shape=[1], raw=bytes(4)),
        sparse=pb.SparseRows(vocab_size=3))) == []


def test_region_refs_reads_preview_requests_too():
    request = pb.PreviewRequest(logits=region_tensor(pb.FP32, (4,), "shared_memory", "a", 0))
    assert region_refs(request) == [("a", "logits.shared_memory.region")]


def test_a_step_holds_what_region_refs_lists(shm_objects, cpu_regions):
    shm = shm_objects(np.arange(4, dtype="<f4").tobytes())
    cpu_regions.register_system("a", shm.name, 0, 16, "")
    request = pb.StepRequest(logits=region_tensor(pb.FP32, (1, 4), "shared_memory", "a", 0))
    with cpu_regions.hold(region_refs(request)):
        assert cpu_regions.status("a")[0].in_use == 1
        decoded = decode_tensor(request.logits, "logits", CPU, cpu_regions)
    assert decoded.tolist() == [[0, 1, 2, 3]]
    request.reference_logits.CopyFrom(region_tensor(pb.FP32, (1, 4), "cuda_ipc", "gone", 0))
    with pytest.raises(NotFound) as excinfo:
        with cpu_regions.hold(region_refs(request)):
            pytest.fail("the block must not run")
    assert field_of(excinfo) == "reference_logits.cuda_ipc.region"


# --- CUDA -----------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_cuda
def test_host_transports_decode_onto_the_gpu(shm_objects, cpu_regions):
    cuda = torch.device("cuda", 0)
    shm = shm_objects(bytes(4096))
    cpu_regions.register_system("r", shm.name, 0, 4096, "")
    for dtype in DTYPES:
        data = np.random.default_rng(dtype).integers(0, 256, 6 * ELEMENT_SIZE[dtype] * 50,
                                                     dtype=np.uint8).tobytes()
        shm.buf[2:2 + len(data)] = data
        expected = reference_decode(data, dtype, (6, 50))
        for tensor in (pb.Tensor(dtype=dtype, shape=[6, 50], raw=data),
                       region_tensor(dtype, (6, 50), "shared_memory", "r", 2)):
            decoded = decode_tensor(tensor, "logits", cuda, cpu_regions)
            assert decoded.device == cuda
            assert_same_floats(decoded, expected)


@pytest.mark.gpu
@requires_cuda
def test_a_cuda_region_decodes_like_the_reference_in_every_dtype(cuda_exporter, cuda_regions):
    pytest.importorskip("cupy")
    cuda = torch.device("cuda", 0)
    data = np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    cuda_regions.register_cuda("r", cuda_exporter(data), 0, len(data), "")
    for dtype in DTYPES:
        for offset in (0, 256, 2, 3):
            shape = (8, 1000)
            size = math.prod(shape) * ELEMENT_SIZE[dtype]
            expected = reference_decode(data[offset:offset + size], dtype, shape)
            tensor = region_tensor(dtype, shape, "cuda_ipc", "r", offset)
            with cuda_regions.hold(region_refs(pb.StepRequest(logits=tensor))):
                decoded = decode_tensor(tensor, "logits", cuda, cuda_regions)
                assert decoded.device == cuda
                assert_same_floats(decoded, expected)
