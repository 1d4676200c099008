"""Memory the client shares with the service, and the rings that reuse it.

- `SystemRegion`: a POSIX shared-memory object the client creates (on Linux a file under
  /dev/shm), registered with RegisterSystemRegion. Python's resource tracker sees it created
  and unlinked by this process exactly once each: `free()` (or, for a client never closed, a
  finalizer at garbage collection or interpreter exit) closes and unlinks it, so the tracker
  neither warns nor unlinks it a second time.
- `CudaRegion`: one CUDA allocation (cudaMalloc through cupy, the `gpu` extra, imported only
  here) exported with cudaIpcGetMemHandle, registered with RegisterCudaRegion.
- `RegionRing`: up to `size` regions of one kind (and device), each lent to one request at a
  time and lent again only after the service answered the step that read it.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Protocol

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import Rpc
from sampler_client.tensors import WireTensor

#: Tensors in one region start at multiples of this many bytes (CUDA's allocation alignment).
ALIGNMENT = 256
_MIB = 1 << 20


def aligned(byte_size: int) -> int:
    return -(-byte_size // ALIGNMENT) * ALIGNMENT


def region_capacity(byte_size: int) -> int:
    """The size of a new region for `byte_size` bytes: a quarter more (so a batch that grows a
    little does not re-register), in whole MiB."""
    return max(_MIB, -(-(byte_size + byte_size // 4) // _MIB) * _MIB)


class Region(Protocol):
    """What the rings and the transports need of a region."""

    name: str
    byte_size: int
    #: The `sampler.v1.Tensor.data` field that references this kind of region.
    tensor_field: str

    def registration(self, client_id: str) -> Rpc: ...
    def write(self, wire: WireTensor, offset: int) -> None: ...
    def finish_writes(self) -> None: ...
    def free(self) -> None: ...


def _close_and_unlink(memory: shared_memory.SharedMemory) -> None:
    memory.close()
    try:
        memory.unlink()
    except FileNotFoundError:  # already removed by someone else: nothing left to free
        pass


class SystemRegion:
    """A POSIX shared-memory object of `byte_size` bytes, created under the key `name`."""

    tensor_field = "shared_memory"

    def __init__(self, name: str, byte_size: int):
        self.name = name
        self.byte_size = byte_size
        self._memory = shared_memory.SharedMemory(name=name, create=True, size=byte_size)
        self._free = weakref.finalize(self, _close_and_unlink, self._memory)
        try:  # reserve the pages now: a full /dev/shm is an OSError here, not a SIGBUS mid-write
            os.posix_fallocate(self._memory._fd, 0, byte_size)
        except OSError:
            self._free()
            raise

    @property
    def key(self) -> str:
        """The name shm_open takes (without the leading "/")."""
        return self._memory.name

    def registration(self, client_id: str) -> Rpc:
        return Rpc("RegisterSystemRegion", pb.RegisterSystemRegionRequest(
            name=self.name, key=self.key, offset=0, byte_size=self.byte_size, client_id=client_id))

    def write(self, wire: WireTensor, offset: int) -> None:
        wire.write_to_host(self._memory.buf, offset)

    def finish_writes(self) -> None:
        """Host writes are visible to the service as soon as they are made."""

    def free(self) -> None:
        """Closes and unlinks the object (once; later calls do nothing)."""
        self._free()


def import_cupy() -> Any:
    try:
        import cupy
    except ImportError as error:
        raise ImportError("the cuda_ipc transport needs cupy: pip install 'sampler-sidecar[gpu]' "
                          "(cupy-cuda12x; the cupy wheel of your CUDA otherwise)") from error
    return cupy


class CudaRegion:
    """One CUDA allocation of `byte_size` bytes on `device`, exported for IPC.

    Writes go through a torch uint8 view of the allocation, on the device's current torch
    stream; `finish_writes` synchronises that stream, so the bytes are visible to the service
    before the request that references them is sent.
    """

    tensor_field = "cuda_ipc"

    def __init__(self, name: str, byte_size: int, device: int):
        import torch
        cupy = import_cupy()
        self.name = name
        self.byte_size = byte_size
        self.device = device
        with cupy.cuda.Device(device):
            memory = cupy.cuda.Memory(byte_size)  # its own cudaMalloc, not a pool's sub-block
            self.handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr))
            array = cupy.ndarray((byte_size,), dtype=cupy.uint8,
                                 memptr=cupy.cuda.MemoryPointer(memory, 0))
        self._bytes = torch.as_tensor(array, device=f"cuda:{device}")  # keeps `memory` alive

    def registration(self, client_id: str) -> Rpc:
        return Rpc("RegisterCudaRegion", pb.RegisterCudaRegionRequest(
            name=self.name, raw_handle=self.handle, device_id=self.device,
            byte_size=self.byte_size, client_id=client_id))

    def write(self, wire: WireTensor, offset: int) -> None:
        wire.write_to_cuda(self._bytes[offset:offset + wire.nbytes])

    def finish_writes(self) -> None:
        import torch
        torch.cuda.current_stream(self.device).synchronize()

    def free(self) -> None:
        """Drops the allocation (cudaFree once nothing references it)."""
        self._bytes = None


@dataclass(eq=False)
class RingSlot:
    """A place in a ring: its region (None until one is made) and whether a request holds it."""

    region: Region | None = None
    busy: bool = False


class RegionRing:
    """Up to `size` slots of one kind of region, lent one request at a time.

    `acquire` lends a free slot (preferring the smallest region that fits, else one to grow,
    else a new slot while fewer than `size` exist) or None when all are lent. `release` takes
    a slot back once the service answered the step that read it; `retire` takes it out of use
    for good when the service may still read it (the call failed without an answer): its
    region is freed only by `drain`, after the client unregistered everything.
    """

    def __init__(self, size: int):
        self.size = size
        self._slots: list[RingSlot] = []
        self._retired: list[Region] = []
        self._lock = threading.Lock()

    def acquire(self, byte_size: int) -> RingSlot | None:
        with self._lock:
            free = [s for s in self._slots if not s.busy]
            fitting = [s for s in free if s.region is not None and s.region.byte_size >= byte_size]
            if fitting:
                slot = min(fitting, key=lambda s: s.region.byte_size)
            elif free:
                slot = max(free, key=lambda s: 0 if s.region is None else s.region.byte_size)
            elif len(self._slots) < self.size:
                slot = RingSlot()
                self._slots.append(slot)
            else:
                return None
            slot.busy = True
            return slot

    def release(self, slot: RingSlot) -> None:
        with self._lock:
            slot.busy = False

    def retire(self, slot: RingSlot) -> None:
        with self._lock:
            self._slots.remove(slot)
            if slot.region is not None:
                self._retired.append(slot.region)

    def renew(self) -> list[Region]:
        """Empties the slots not lent now and returns their regions, for the caller to free:
        each such slot makes a new region when next lent."""
        with self._lock:
            idle = [s for s in self._slots if not s.busy and s.region is not None]
            regions = [s.region for s in idle]
            for slot in idle:
                slot.region = None
            return regions

    def drain(self) -> list[Region]:
        """Empties the ring and returns every region it held, for the caller to free."""
        with self._lock:
            regions = [s.region for s in self._slots if s.region is not None] + self._retired
            self._slots, self._retired = [], []
            return regions
