"""Decodes a `sampler.v1.Tensor` into a float32 torch tensor on the service device, wherever
its bytes are: inline (`raw`), in a registered host shared-memory region (`shared_memory`) or
in a registered CUDA region (`cuda_ipc`).

The wire may carry FP32, FP16 or BF16 (little-endian, as every host torch runs on); the
service computes in float32. Every transport goes the same way: a uint8 torch view of the
wire bytes (no copy: the message's bytes, the read-only mapping or the CUDA allocation),
viewed as the wire dtype, then one copy into a fresh float32 tensor on the device (host bytes
bound for a GPU cross in their wire dtype and widen there). A CUDA region of FP32 is already
what the engine needs: it is returned as a view of the region, which the engine reads but
never writes (it clones before working in place); read it only inside the step's
`RegionRegistry.hold`. A reference offset that is not a multiple of the element size costs
one extra copy of the bytes.
"""
from __future__ import annotations

import math

import torch

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import FailedPrecondition, InvalidArgument, echo
from sampler_service.transport.regions import (CUDA, SHARED_MEMORY_OFF, SYSTEM, RegionRegistry,
                                               host_bytes_tensor)

#: Bytes per element of each wire dtype.
ELEMENT_SIZE = {pb.FP32: 4, pb.FP16: 2, pb.BF16: 2}
_TORCH_DTYPE = {pb.FP32: torch.float32, pb.FP16: torch.float16, pb.BF16: torch.bfloat16}
#: Tensor.data case -> kind of region it references.
_REGION_KIND = {"shared_memory": SYSTEM, "cuda_ipc": CUDA}
#: The tensors of a request that may live in regions, as field paths.
_TENSOR_FIELDS = ("logits", "reference_logits", "sparse.logits")
#: Dimensions a tensor may have: every tensor of the protocol is [rows, vocab] or [vocab]
#: (logits and reference logits) or [rows, K] (sparse logits).
MAX_DIMS = 2


def decode_tensor(tensor: pb.Tensor, field: str, device: torch.device,
                  regions: RegionRegistry | None = None) -> torch.Tensor:
    """The tensor as float32 [shape] on `device`: a fresh tensor, except FP32 in a CUDA
    region, which comes back as a view of the region (read it, never write it, and only
    inside the step's `hold`). Errors: see `wire_tensor`."""
    typed = wire_tensor(tensor, field, regions)
    if typed.is_cuda:  # already on a device: a view (FP32) or a cast there
        return typed.to(device=device, dtype=torch.float32)
    return _float32_copy(typed, device)


def wire_tensor(tensor: pb.Tensor, field: str,
                regions: RegionRegistry | None = None) -> torch.Tensor:
    """The tensor's elements as they travel: a view in the wire dtype [shape] of the message's
    bytes, the mapped region or the CUDA allocation (no copy; read it only inside the step's
    `hold`). `decode_tensor` copies from it, and so does the step runner, into one batch buffer.

    `regions` are the registered regions (None: the service runs without shared memory).
    Raises InvalidArgument naming the offending part of `field` (dtype; shape: 1 or 2
    dimensions, each > 0; raw size, region kind, range or size), NotFound for an unknown
    region and FailedPrecondition when shared memory is off or a region's object shrank."""
    if tensor.dtype not in ELEMENT_SIZE:
        raise InvalidArgument(
            f"dtype {pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype}"
            " is not supported: use FP32, FP16 or BF16", f"{field}.dtype")
    if len(tensor.shape) > MAX_DIMS:
        shown = ", ".join(str(d) for d in tensor.shape[:4]) + (", ..." if len(tensor.shape) > 4
                                                                else "")
        raise InvalidArgument(f"shape [{shown}] has {len(tensor.shape)} dimensions; a tensor has "
                              f"at most {MAX_DIMS}: [rows, vocab] or [vocab] (sparse logits: "
                              "[rows, K])", f"{field}.shape")
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise InvalidArgument(f"shape {list(shape)} must be non-empty with every dimension > 0",
                              f"{field}.shape")
    expected = math.prod(shape) * ELEMENT_SIZE[tensor.dtype]
    need = f"shape {list(shape)} of {pb.DType.Name(tensor.dtype)} needs {expected} bytes"
    which = tensor.WhichOneof("data")
    if which is None:
        raise InvalidArgument("tensor carries no data: set `raw`, `shared_memory` or "
                              "`cuda_ipc`", f"{field}.raw")
    if which == "raw":
        raw = tensor.raw  # every access copies the bytes out of the message: once only
        if len(raw) != expected:
            raise InvalidArgument(f"raw holds {len(raw)} bytes but {need}", f"{field}.raw")
        return _typed(host_bytes_tensor(raw), tensor.dtype, shape)
    wire = _region_bytes(getattr(tensor, which), which, f"{field}.{which}", expected, need,
                         regions)
    return _typed(wire, tensor.dtype, shape)


def region_refs(request: pb.StepRequest | pb.PreviewRequest) -> list[tuple[str, str]]:
    """(region name, request field) of every region-backed tensor of `request` (logits,
    reference_logits, sparse.logits, each row's draft_probs), for `RegionRegistry.hold`; the
    field is the one a NotFound names, e.g. `logits.shared_memory.region`."""
    tensors = [(path, _submessage(request, path)) for path in _TENSOR_FIELDS]
    if "rows" in request.DESCRIPTOR.fields_by_name:
        tensors += [(f"rows[{i}].draft_probs", row.draft_probs)
                    for i, row in enumerate(request.rows) if row.HasField("draft_probs")]
    refs = []
    for path, tensor in tensors:
        which = None if tensor is None else tensor.WhichOneof("data")
        if which in _REGION_KIND:
            refs.append((getattr(tensor, which).region, f"{path}.{which}.region"))
    return refs


def _submessage(message, path: str):
    """The message at dotted `path` of `message`, or None where a part is unset or `message`
    has no such field."""
    for part in path.split("."):
        if part not in message.DESCRIPTOR.fields_by_name or not message.HasField(part):
            return None
        message = getattr(message, part)
    return message


def _region_bytes(ref: pb.RegionRef, which: str, field: str, expected: int, need: str,
                  regions: RegionRegistry | None) -> torch.Tensor:
    """uint8 view of the `ref.byte_size` bytes `ref` names, checked against the region."""
    if regions is None:
        raise FailedPrecondition(SHARED_MEMORY_OFF, field)
    region = regions.region_bytes(ref.region, _REGION_KIND[which], f"{field}.region")
    end = ref.offset + ref.byte_size
    if end > region.numel():
        raise InvalidArgument(f"offset {ref.offset} + byte_size {ref.byte_size} = {end} lies "
                              f"beyond region {echo(ref.region)} of {region.numel()} bytes",
                              f"{field}.byte_size")
    if ref.byte_size != expected:
        raise InvalidArgument(f"byte_size is {ref.byte_size} but {need}", f"{field}.byte_size")
    return region[ref.offset:end]


def _typed(wire: torch.Tensor, dtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 `wire` viewed as the wire dtype [shape]; a start that is not a multiple of
    the element size is first copied to an aligned buffer."""
    if wire.storage_offset() % ELEMENT_SIZE[dtype]:
        wire = wire.clone()
    return wire.view(_TORCH_DTYPE[dtype]).view(shape)


def _float32_copy(typed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh float32 tensor on `device` with the values of host tensor `typed`."""
    if device.type == "cpu":
        return typed.to(torch.float32, copy=True)
    return typed.to(device).to(torch.float32)
