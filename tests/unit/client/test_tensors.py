"""sampler_client.tensors: wire dtypes, and the same bytes inline and written into a buffer."""
from __future__ import annotations

import numpy as np
import pytest

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.tensors import encode_rows, wire_rows, wire_tensor

VALUES = np.array([[0.5, -2.25, 3.0], [1e-3, 65000.0, -np.inf]], np.float32)


def _torch_source(dtype_name, strided=False):
    def make():
        torch = pytest.importorskip("torch")
        tensor = torch.from_numpy(VALUES).to(getattr(torch, dtype_name))
        return tensor.t().contiguous().t() if strided else tensor
    return make


SOURCES = {  # name: (make, wire dtype, the little-endian bytes expected)
    "numpy-fp32": (lambda: VALUES, pb.FP32, VALUES.astype("<f4").tobytes()),
    "numpy-fp16": (lambda: VALUES.astype(np.float16), pb.FP16, VALUES.astype("<f2").tobytes()),
    "numpy-fp64": (lambda: VALUES.astype(np.float64), pb.FP32, VALUES.astype("<f4").tobytes()),
    "numpy-big-endian": (lambda: VALUES.astype(">f4"), pb.FP32, VALUES.astype("<f4").tobytes()),
    "list": (lambda: VALUES.tolist(), pb.FP32, VALUES.astype("<f4").tobytes()),
    "torch-fp32": (_torch_source("float32"), pb.FP32, VALUES.astype("<f4").tobytes()),
    "torch-fp16": (_torch_source("float16"), pb.FP16, VALUES.astype("<f2").tobytes()),
    "torch-fp64-strided": (_torch_source("float64", strided=True), pb.FP32,
                           VALUES.astype("<f4").tobytes()),
    "torch-fp32-strided": (_torch_source("float32", strided=True), pb.FP32,
                           VALUES.astype("<f4").tobytes()),
    "torch-fp16-strided": (_torch_source("float16", strided=True), pb.FP16,
                           VALUES.astype("<f2").tobytes()),
}


def _bf16_bytes() -> bytes:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(VALUES).bfloat16().view(torch.int16).numpy().astype("<i2").tobytes()


@pytest.mark.parametrize("name", SOURCES)
def test_inline_and_host_buffer_bytes_are_the_wire_encoding(name):
    make, dtype, expected = SOURCES[name]
    wire = wire_tensor(make())
    assert (wire.dtype, wire.shape, wire.nbytes) == (dtype, (2, 3), len(expected))
    assert wire.raw() == expected
    buffer = bytearray(b"\xff" * (len(expected) + 40))
    wire.write_to_host(memoryview(buffer), 32)
    assert bytes(buffer[32:32 + len(expected)]) == expected
    assert buffer[:32] == b"\xff" * 32 and buffer[32 + len(expected):] == b"\xff" * 8


@pytest.mark.parametrize("strided", [False, True])
def test_bf16_travels_as_its_bits_inline_and_in_a_buffer(strided):
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(VALUES).bfloat16()
    wire = wire_tensor(tensor.t().contiguous().t() if strided else tensor)
    expected = _bf16_bytes()
    assert (wire.dtype, wire.raw()) == (pb.BF16, expected)
    buffer = bytearray(len(expected))
    wire.write_to_host(memoryview(buffer), 0)
    assert bytes(buffer) == expected


@pytest.mark.parametrize("name", ["numpy-fp16", "torch-fp32", "torch-fp64-strided"])
def test_take_rows_keeps_the_dtype(name):
    make, dtype, _ = SOURCES[name]
    taken = wire_tensor(make()).take_rows([1, 0, 1])
    assert (taken.dtype, taken.shape) == (dtype, (3, 3))
    expected = VALUES[[1, 0, 1]].astype("<f2" if dtype == pb.FP16 else "<f4").tobytes()
    assert taken.raw() == expected


def test_a_single_1d_row_becomes_one_by_vocab():
    assert wire_rows(VALUES[0], 1).shape == (1, 3)
    assert wire_rows(VALUES[0], 2).shape == (3,)  # left as it is, for the service to reject
    assert list(encode_rows(VALUES[0], 1).shape) == [1, 3]


def test_float32_view_is_what_the_service_reads():
    torch = pytest.importorskip("torch")
    bf16 = torch.from_numpy(VALUES).bfloat16()
    assert torch.equal(wire_tensor(bf16).float32(), bf16.float())
    assert wire_tensor(VALUES.astype(np.float16)).float32().dtype == np.float32


@pytest.mark.gpu
def test_cuda_writes_equal_the_inline_bytes():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for name in ("numpy-fp16", "torch-fp32", "torch-fp64-strided"):
        make, _, expected = SOURCES[name]
        source = make()
        source = source.cuda() if torch.is_tensor(source) else source
        wire = wire_tensor(source)
        destination = torch.zeros(wire.nbytes, dtype=torch.uint8, device="cuda")
        wire.write_to_cuda(destination)
        assert destination.cpu().numpy().tobytes() == expected
    bf16 = wire_tensor(torch.from_numpy(VALUES).bfloat16().cuda())
    destination = torch.zeros(bf16.nbytes, dtype=torch.uint8, device="cuda")
    bf16.write_to_cuda(destination)
    assert bf16.cuda_device == destination.device.index
    assert destination.cpu().numpy().tobytes() == _bf16_bytes()


def test_stacked_rows_takes_a_whole_tensor_or_one_row_per_draft():
    torch = pytest.importorskip("torch")
    from sampler_client.tensors import stacked_rows
    whole = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    forms = [whole, whole.tolist(), [whole[i] for i in range(3)],
             [whole[i:i + 1] for i in range(3)], [torch.from_numpy(whole[i]) for i in range(3)],
             [torch.from_numpy(whole[i:i + 1]) for i in range(3)]]
    for form in forms:
        wire = stacked_rows(form, 3)
        assert wire.shape == (3, 5) and wire.raw() == whole.tobytes(), type(form[0])
    one = stacked_rows(whole[0], 1)  # one draft: a [vocab] row
    assert one.shape == (1, 5) and one.raw() == whole[0].tobytes()
