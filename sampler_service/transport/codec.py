"""Decodes a `sampler.v1.Tensor` carrying inline little-endian bytes into float32 torch tensors.

The wire may carry FP32, FP16 or BF16; the service always computes in float32. Decoding goes
through NumPy (`frombuffer` views the message bytes without copying; the cast to float32 makes
the one copy the service needs anyway, since processors work on their own buffers).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import InvalidArgument

#: Bytes per element of each wire dtype.
ELEMENT_SIZE = {pb.FP32: 4, pb.FP16: 2, pb.BF16: 2}


def _bf16_to_float32(raw: bytes) -> np.ndarray:
    """BF16 is the upper half of an IEEE float32: widen by shifting 16 bits left."""
    halves = np.frombuffer(raw, dtype="<u2")
    return (halves.astype(np.uint32) << 16).view(np.float32)


def decode_tensor(tensor: pb.Tensor, field: str, device: torch.device) -> torch.Tensor:
    """Returns the tensor as float32 on `device`, or raises InvalidArgument naming `field`."""
    if tensor.dtype not in ELEMENT_SIZE:
        raise InvalidArgument(
            f"dtype {pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype}"
            " is not supported: use FP32, FP16 or BF16", f"{field}.dtype")
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidArgument(f"shape {list(shape)} must be non-empty with every dimension > 0",
                              f"{field}.shape")
    which = tensor.WhichOneof("data")
    if which != "raw":
        raise InvalidArgument("tensor carries no data: set `raw`", f"{field}.raw")
    expected = math.prod(shape) * ELEMENT_SIZE[tensor.dtype]
    if len(tensor.raw) != expected:
        raise InvalidArgument(
            f"raw holds {len(tensor.raw)} bytes but shape {list(shape)} of "
            f"{pb.DType.Name(tensor.dtype)} needs {expected}", f"{field}.raw")
    if tensor.dtype == pb.FP32:
        array = np.frombuffer(tensor.raw, dtype="<f4").astype(np.float32, copy=True)
    elif tensor.dtype == pb.FP16:
        array = np.frombuffer(tensor.raw, dtype="<f2").astype(np.float32)
    else:
        array = _bf16_to_float32(tensor.raw)
    return torch.from_numpy(array.reshape(shape)).to(device)
