"""Logits as they travel: the wire dtype and shape of a torch tensor, NumPy array or list, and
its bytes written inline (`raw`), into host shared memory or into a CUDA allocation.

FP32, FP16 and BF16 tensors travel as they are (little-endian); other floats (and integers)
become FP32. The cast happens while the bytes are written, in one copy from the caller's
tensor, whatever its strides (`out.logits[:, -1, :]` is a non-contiguous view). A torch tensor
stays on its own device until written; torch is imported only when a torch tensor is given
(or a CUDA region is written), so a client-only install needs no torch.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from sampler_proto.sampler.v1 import sampler_pb2 as pb

#: Bytes per element of each wire dtype.
ELEMENT_SIZE = {pb.FP32: 4, pb.FP16: 2, pb.BF16: 2}
_NUMPY_WIRE = {np.dtype(np.float32): (pb.FP32, np.dtype("<f4")),
               np.dtype(np.float16): (pb.FP16, np.dtype("<f2"))}


def is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


class WireTensor(ABC):
    """A tensor about to travel: `dtype` (a `sampler.v1.DType`), `shape`, `nbytes`, and how
    to write its bytes. Made by `wire_tensor` / `wire_rows`."""

    dtype: int
    shape: tuple[int, ...]
    #: The CUDA device index holding the values, None on the host.
    cuda_device: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ELEMENT_SIZE[self.dtype]

    @abstractmethod
    def raw(self) -> bytes:
        """The little-endian bytes (copied to the host)."""

    @abstractmethod
    def write_to_host(self, buffer: memoryview, offset: int) -> None:
        """Writes the `nbytes` bytes at `offset` of a writable host buffer."""

    @abstractmethod
    def write_to_cuda(self, destination: Any) -> None:
        """Writes the bytes into `destination`, a uint8 torch CUDA tensor of `nbytes`
        elements, on the current stream of its device (the caller synchronises)."""

    @abstractmethod
    def take_rows(self, rows: Sequence[int]) -> "WireTensor":
        """The given rows of a 2-D tensor, in that order, same dtype and device."""

    @abstractmethod
    def float32(self) -> Any:
        """The values as float32 (a NumPy array, or a torch tensor on the same device), as
        the service reads them; may share memory with the caller's tensor: do not modify."""

    @abstractmethod
    def source(self) -> Any:
        """The caller's values (NumPy array or torch tensor) before the wire cast."""


class NumpyWire(WireTensor):
    """A NumPy array (or a list made one)."""

    def __init__(self, array: np.ndarray):
        if array.dtype not in _NUMPY_WIRE:
            array = array.astype(np.float32)
        self.array = array
        self.dtype, self._little_endian = _NUMPY_WIRE[array.dtype]
        self.shape = tuple(array.shape)

    def raw(self) -> bytes:
        return np.ascontiguousarray(self.array, dtype=self._little_endian).tobytes()

    def write_to_host(self, buffer: memoryview, offset: int) -> None:
        np.ndarray(self.shape, self._little_endian, buffer=buffer, offset=offset)[...] = self.array

    def write_to_cuda(self, destination: Any) -> None:
        import torch
        host = np.ascontiguousarray(self.array)
        if not host.flags.writeable:  # torch warns on read-only arrays
            host = host.copy()
        destination.view(torch.float16 if self.dtype == pb.FP16 else torch.float32) \
            .view(self.shape).copy_(torch.from_numpy(host))

    def take_rows(self, rows: Sequence[int]) -> "NumpyWire":
        return NumpyWire(self.array[list(rows)])

    def float32(self) -> np.ndarray:
        return self.array.astype(np.float32, copy=False)

    def source(self) -> np.ndarray:
        return self.array


class TorchWire(WireTensor):
    """A torch tensor, left on its device and in its dtype until written."""

    def __init__(self, tensor: Any):
        import torch
        self.tensor = tensor.detach()
        self._torch_dtype = {torch.bfloat16: torch.bfloat16,
                             torch.float16: torch.float16}.get(self.tensor.dtype, torch.float32)
        self.dtype = {torch.bfloat16: pb.BF16,
                      torch.float16: pb.FP16}.get(self._torch_dtype, pb.FP32)
        self.shape = tuple(self.tensor.shape)
        self.cuda_device = self.tensor.device.index if self.tensor.is_cuda else None

    def raw(self) -> bytes:
        import torch
        host = self.tensor.to(self._torch_dtype).contiguous().cpu()
        if self.dtype == pb.BF16:
            host = host.view(torch.int16)  # NumPy has no bfloat16: its bits travel
        return host.numpy().tobytes()

    def write_to_host(self, buffer: memoryview, offset: int) -> None:
        """A host tensor of the wire dtype is copied by NumPy: one thread, no OpenMP team to
        wake (or left spinning beside the service); a cast or a GPU tensor goes through torch."""
        import torch
        count = math.prod(self.shape)
        if self.tensor.device.type == "cpu" and self.tensor.dtype == self._torch_dtype:
            bits = self.tensor.view(torch.int16) if self.dtype == pb.BF16 else self.tensor
            source = bits.numpy()
            np.copyto(np.frombuffer(buffer, dtype=source.dtype, count=count, offset=offset)
                      .reshape(self.shape), source)
            return
        torch.frombuffer(buffer, dtype=self._torch_dtype, count=count, offset=offset) \
            .view(self.shape).copy_(self.tensor)

    def write_to_cuda(self, destination: Any) -> None:
        destination.view(self._torch_dtype).view(self.shape).copy_(self.tensor)

    def take_rows(self, rows: Sequence[int]) -> "TorchWire":
        import torch
        return TorchWire(self.tensor.index_select(
            0, torch.as_tensor(list(rows), dtype=torch.long, device=self.tensor.device)))

    def float32(self) -> Any:
        import torch
        return self.tensor.to(torch.float32)

    def source(self) -> Any:
        return self.tensor


def wire_tensor(values: Any) -> WireTensor:
    """`values` as it travels: a torch tensor stays a tensor, anything else becomes NumPy."""
    return TorchWire(values) if is_torch_tensor(values) else NumpyWire(np.asarray(values))


def wire_rows(values: Any, rows: int) -> WireTensor:
    """Logits for `rows` rows: a 1-D input is taken as a single row ([1, vocab])."""
    wire = wire_tensor(values)
    if len(wire.shape) == 1 and rows == 1:
        source = wire.source()
        return wire_tensor(source.reshape(1, -1))
    return wire


def stacked_rows(values: Any, rows: int) -> WireTensor:
    """A [rows, n] tensor given whole (a tensor, an array, nested lists) or as a list or tuple
    of `rows` rows ([n] or [1, n] each: torch tensors, joined on their device, or anything
    NumPy takes), e.g. a draft model's probabilities, one [1, vocab] row per draft."""
    if isinstance(values, (list, tuple)) and len(values) == rows:
        if all(is_torch_tensor(v) for v in values):
            import torch
            return wire_tensor(torch.cat([v.reshape(1, -1) for v in values]))
        return wire_tensor(np.concatenate([np.asarray(v, dtype=np.float32).reshape(1, -1)
                                           for v in values]))
    if isinstance(values, (list, tuple)):
        values = np.asarray(values, dtype=np.float32)
    return wire_rows(values, rows)


def inline_tensor(wire: WireTensor) -> pb.Tensor:
    """The wire tensor with its bytes in the message."""
    return pb.Tensor(dtype=wire.dtype, shape=list(wire.shape), raw=wire.raw())


def encode_tensor(values: Any) -> pb.Tensor:
    """A wire tensor with the shape of `values`, its bytes inline."""
    return inline_tensor(wire_tensor(values))


def encode_rows(values: Any, rows: int) -> pb.Tensor:
    """Logits for `rows` rows, inline: a 1-D input is taken as a single row."""
    return inline_tensor(wire_rows(values, rows))
