"""Encodes logits (torch tensors, NumPy arrays or lists) as `sampler.v1.Tensor`.

torch is imported only when a torch tensor is given, so a client-only install needs no torch.
FP32, FP16 and BF16 tensors travel as they are (little-endian); other floats become FP32.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sampler_proto.sampler.v1 import sampler_pb2 as pb

_NUMPY_DTYPES = {np.dtype(np.float32): (pb.FP32, "<f4"), np.dtype(np.float16): (pb.FP16, "<f2")}


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _torch_to_wire(tensor) -> tuple[int, np.ndarray]:
    import torch
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return pb.BF16, tensor.view(torch.int16).numpy().astype("<i2", copy=False)
    if tensor.dtype == torch.float16:
        return pb.FP16, tensor.numpy()
    return pb.FP32, tensor.to(torch.float32).numpy()


def encode_tensor(values: Any) -> pb.Tensor:
    """A wire tensor with the shape of `values`."""
    if _is_torch_tensor(values):
        dtype, array = _torch_to_wire(values)
        if dtype != pb.BF16:
            array = array.astype(_NUMPY_DTYPES[array.dtype][1], copy=False)
    else:
        array = np.asarray(values)
        if array.dtype not in _NUMPY_DTYPES:
            array = array.astype(np.float32)
        dtype, little_endian = _NUMPY_DTYPES[array.dtype]
        array = array.astype(little_endian, copy=False)
    return pb.Tensor(dtype=dtype, shape=list(array.shape), raw=np.ascontiguousarray(array).tobytes())


def encode_rows(values: Any, rows: int) -> pb.Tensor:
    """Logits for `rows` rows: a 1-D input is taken as a single row."""
    tensor = encode_tensor(values)
    if len(tensor.shape) == 1 and rows == 1:
        tensor.shape.insert(0, 1)
    return tensor
