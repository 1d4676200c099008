"""Memory regions a model worker shares with the service: POSIX shared-memory objects (system
regions) and CUDA allocations exported with cudaIpcGetMemHandle (CUDA regions).

NVIDIA Triton's system and CUDA shared-memory extensions are the model. Each region is mapped
or opened once, read-only where the OS allows it, when it is registered; a step then reads its
bytes with no system call (`region_bytes` hands out a uint8 torch view, the codec copies out of
it). The service never creates, resizes or unlinks a worker's shared-memory object: it only
maps it, and unmapping it at unregistration leaves the object to the worker.

A step reads regions inside `hold(refs)`: while held, a region cannot be unregistered, so its
memory cannot go away under a decode (the bytes themselves are the worker's to keep stable
until the answer, as the proto says). The registry is thread-safe: the event loop registers
and unregisters while the engine's thread holds and reads.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import mmap
import os
import stat
import threading
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from sampler_service.errors import (FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                    SamplerServiceError)

log = logging.getLogger(__name__)

SYSTEM = "system"
CUDA = "cuda"
#: Bytes of a cudaIpcMemHandle_t.
CUDA_IPC_HANDLE_BYTES = 64
#: Where Linux keeps POSIX shared-memory objects (what shm_open names).
SHM_DIRECTORY = "/dev/shm"
#: The answer to every shared-memory use while the service runs without it.
SHARED_MEMORY_OFF = ("shared memory is off: start the service with --allow-shared-memory "
                     "(the default when it listens on loopback or a Unix socket)")
_NAME_MAX = 255
_GPU_EXTRA = "pip install 'sampler-sidecar[gpu]' (cupy-cuda12x; cupy-cuda11x for CUDA 11)"


@dataclass(frozen=True)
class RegionInfo:
    """A registered region as `RegionStatus` shows it. `key` is set for system regions,
    `device_id` for CUDA ones; `in_use` counts the steps reading the region now."""
    name: str
    kind: str
    key: str
    offset: int
    byte_size: int
    device_id: int
    client_id: str
    in_use: int


class _BytesForTorch:
    """Offers a read-only byte buffer to torch through numpy's array interface, as writable.
    torch has no read-only tensors (it warns on read-only buffers); the service only copies
    out of these views, never writes them. Keeps the buffer, and so a mapping, alive."""

    def __init__(self, buffer):
        self._view = np.frombuffer(buffer, dtype=np.uint8)
        self.__array_interface__ = {"data": (self._view.ctypes.data, False), "version": 3,
                                    "shape": self._view.shape, "typestr": "|u1"}


def host_bytes_tensor(buffer) -> torch.Tensor:
    """uint8 CPU tensor [len(buffer)] over `buffer` (bytes, a memoryview) without a copy.
    Read it only: it may be a message's bytes or a read-only mapping."""
    return torch.from_numpy(np.asarray(_BytesForTorch(buffer)))


def shm_object_name(key: str) -> str:
    """The object name of a shm_open key ("/name" or "name"), or InvalidArgument naming `key`
    for anything that could reach outside the shared-memory directory."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or ".." in name or "\0" in name:
        raise InvalidArgument(
            f"key {key!r} is not a shared-memory object name: give the name shm_open takes "
            "(\"/name\" or \"name\": no other \"/\", no \"..\", no NUL), never a path", "key")
    if len(name.encode()) > _NAME_MAX:
        raise InvalidArgument(f"key {key[:32]!r}... is {len(name.encode())} bytes long; an "
                              f"object name has at most {_NAME_MAX}", "key")
    return name


class SystemMapping:
    """Bytes [offset, offset + byte_size) of a POSIX shared-memory object, mapped read-only
    and shared (MAP_SHARED, PROT_READ): the worker's later writes show through.

    `data` is a uint8 [byte_size] CPU tensor over the mapping (no copy; writing it would
    fault, and nothing does: the codec copies out of it)."""

    def __init__(self, key: str, offset: int, byte_size: int):
        name = shm_object_name(key)
        self.end = offset + byte_size
        fd = self._open(key, f"{SHM_DIRECTORY}/{name}")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"{SHM_DIRECTORY}/{name} is not a shared-memory object",
                                      "key")
            if self.end > info.st_size:
                raise InvalidArgument(
                    f"offset {offset} + byte_size {byte_size} = {self.end} lies beyond the "
                    f"{info.st_size}-byte shared-memory object {key!r}", "byte_size")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                self._mmap = mmap.mmap(fd, self.end - start, flags=mmap.MAP_SHARED,
                                       prot=mmap.PROT_READ, offset=start)
            except OSError as exc:
                raise FailedPrecondition(f"cannot map shared-memory object {key!r}: "
                                         f"{exc.strerror}", "key") from None
        finally:
            os.close(fd)  # the mapping keeps a descriptor of its own
        # The view pins the mapping: mmap.close refuses while it lives.
        self.data = host_bytes_tensor(memoryview(self._mmap)[offset - start:][:byte_size])

    @staticmethod
    def _open(key: str, path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no shared-memory object {key!r} ({path}): the worker creates it "
                           "(shm_open) before registering it", "key") from None
        except PermissionError as exc:
            raise FailedPrecondition(
                f"the service may not read shared-memory object {key!r} ({exc.strerror}): "
                "create it readable by the service's user", "key") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidArgument(f"{path} is a symbolic link, not a shared-memory object",
                                      "key") from None
            raise FailedPrecondition(f"cannot open shared-memory object {key!r}: "
                                     f"{exc.strerror}", "key") from None

    def check_intact(self, field: str) -> None:
        """FailedPrecondition naming `field` when the worker shrank the object below the
        region (reading it would raise SIGBUS and take the service down)."""
        size = self._mmap.size()
        if size < self.end:
            raise FailedPrecondition(
                f"the shared-memory object behind this region shrank to {size} bytes, below "
                f"the region's end at {self.end}: register the region again", field)

    def close(self) -> None:
        self.data = None
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive: the mapping goes with the last one
            log.warning("a shared-memory mapping is still viewed; it is unmapped when the "
                        "last view is dropped")


def _import_cupy():
    try:
        import cupy
    except ImportError:
        raise FailedPrecondition(f"CUDA regions need cupy, which this service lacks: "
                                 f"{_GPU_EXTRA}", "raw_handle") from None
    return cupy


@functools.cache
def _cuda_driver() -> ctypes.CDLL:
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuMemGetAddressRange_v2.argtypes = [
        ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    driver.cuMemGetAddressRange_v2.restype = ctypes.c_int
    driver.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    driver.cuGetErrorName.restype = ctypes.c_int
    return driver


def cuda_allocation_bytes(pointer: int) -> int:
    """Bytes from `pointer` to the end of the CUDA allocation holding it
    (cuMemGetAddressRange; the device's context must be current on this thread)."""
    driver = _cuda_driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer)
    if status != 0:
        name = ctypes.c_char_p()
        driver.cuGetErrorName(status, ctypes.byref(name))
        raise FailedPrecondition(f"the CUDA driver cannot size the opened allocation: "
                                 f"{(name.value or b'error %d' % status).decode()}", "raw_handle")
    return base.value + size.value - pointer


class CudaMapping:
    """A CUDA allocation of another process, opened once (cudaIpcOpenMemHandle) on the
    service's GPU. `data` is a uint8 [byte_size] tensor on that GPU over it (no copy)."""

    def __init__(self, raw_handle: bytes, device_index: int, byte_size: int):
        cupy = _import_cupy()
        self._cupy = cupy
        self._device_index = device_index
        with cupy.cuda.Device(device_index):
            try:
                self._pointer = cupy.cuda.runtime.ipcOpenMemHandle(raw_handle)
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise FailedPrecondition(
                    f"the CUDA driver refused the IPC handle: {exc}. The worker and the service "
                    "must see the same GPU, IPC must be permitted between them (one host, a "
                    "shared IPC namespace in containers), and the handle must come from "
                    "cudaIpcGetMemHandle in another, still running process", "raw_handle") from None
            try:
                available = cuda_allocation_bytes(self._pointer)
                if byte_size > available:
                    raise InvalidArgument(f"byte_size {byte_size} exceeds the {available}-byte "
                                          "CUDA allocation of the handle", "byte_size")
                memory = cupy.cuda.UnownedMemory(self._pointer, byte_size, raw_handle,
                                                 device_index)
                array = cupy.ndarray((byte_size,), dtype=cupy.uint8,
                                     memptr=cupy.cuda.MemoryPointer(memory, 0))
                self.data = torch.from_dlpack(array)
            except BaseException:
                cupy.cuda.runtime.ipcCloseMemHandle(self._pointer)
                raise

    def check_intact(self, field: str) -> None:
        """A CUDA allocation cannot shrink while it is open."""

    def close(self) -> None:
        """Waits for the GPU work that may read the allocation, then closes the handle."""
        torch.cuda.synchronize(self._device_index)
        self.data = None
        with self._cupy.cuda.Device(self._device_index):
            try:
                self._cupy.cuda.runtime.ipcCloseMemHandle(self._pointer)
            except self._cupy.cuda.runtime.CUDARuntimeError as exc:
                log.warning("closing a CUDA IPC handle failed: %s", exc)


@dataclass
class _Region:
    """A registered region: what was registered (`registered.in_use` unused), its mapping and
    how many steps read it now."""

    registered: RegionInfo
    mapping: SystemMapping | CudaMapping
    in_use: int = 0

    @property
    def name(self) -> str:
        return self.registered.name

    @property
    def kind(self) -> str:
        return self.registered.kind

    @property
    def client_id(self) -> str:
        return self.registered.client_id

    def info(self) -> RegionInfo:
        return dataclasses.replace(self.registered, in_use=self.in_use)


class RegionRegistry:
    """The regions registered with the service, by name.

    `device` is the service's device: CUDA regions must live on it; `max_regions` caps how
    many regions (each an open mapping and descriptor) may be registered at once."""

    def __init__(self, device: torch.device, max_regions: int = 1024):
        self.device = device
        self.max_regions = max_regions
        self._cuda_index = (None if device.type != "cuda" else
                            device.index if device.index is not None else torch.cuda.current_device())
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register_system(self, name: str, key: str, offset: int, byte_size: int,
                        client_id: str) -> None:
        """Maps bytes [offset, offset + byte_size) of the POSIX shared-memory object `key`
        ("/name" or "name") read-only under `name`.

        Raises InvalidArgument (bad `name`, `key`, `byte_size`), NotFound (no object `key`),
        FailedPrecondition (the object is not readable), ResourceExhausted (`max_regions`)."""
        self._check_free(name)
        if byte_size <= 0:
            raise InvalidArgument("byte_size must be > 0", "byte_size")
        mapping = SystemMapping(key, offset, byte_size)
        self._insert(_Region(RegionInfo(name, SYSTEM, key, offset, byte_size, 0, client_id, 0),
                             mapping))

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int,
                      client_id: str) -> None:
        """Opens the CUDA allocation of `raw_handle` (a cudaIpcMemHandle_t) on the service's
        GPU under `name`; blocks while the driver maps it (call it off the event loop).

        Raises InvalidArgument (bad `name`, `raw_handle`, `byte_size`), FailedPrecondition
        (the service is on the CPU or lacks cupy, `device_id` is not its GPU, the driver
        refuses the handle), ResourceExhausted (`max_regions`)."""
        self._check_free(name)
        if len(raw_handle) != CUDA_IPC_HANDLE_BYTES:
            raise InvalidArgument(f"raw_handle has {len(raw_handle)} bytes; a cudaIpcMemHandle_t "
                                  f"has {CUDA_IPC_HANDLE_BYTES}", "raw_handle")
        if byte_size <= 0:
            raise InvalidArgument("byte_size must be > 0", "byte_size")
        if self._cuda_index is None:
            raise FailedPrecondition(f"the service runs on the {self.device.type}: CUDA regions "
                                     "need a service started with --device cuda (or auto on a "
                                     "GPU machine); send system shared memory instead",
                                     "device_id")
        if device_id != self._cuda_index:
            raise FailedPrecondition(f"device_id {device_id} is not the service's GPU "
                                     f"(cuda:{self._cuda_index}): allocate the region there",
                                     "device_id")
        mapping = CudaMapping(raw_handle, self._cuda_index, byte_size)
        self._insert(_Region(RegionInfo(name, CUDA, "", 0, byte_size, device_id, client_id, 0),
                             mapping))

    def unregister(self, name: str, client_id: str) -> list[str]:
        """Forgets region `name`, or (empty `name`) every region registered with `client_id`;
        returns the names unregistered. All or nothing: NotFound for an unknown `name`,
        FailedPrecondition naming a region a step is reading."""
        if not name and not client_id:
            raise InvalidArgument("set `name` (one region) or `client_id` (every region that "
                                  "client registered)", "name")
        with self._lock:
            if name and name not in self._regions:
                raise NotFound(f"no region named {name!r} is registered", "name")
            chosen = ([self._regions[name]] if name else
                      [r for r in self._regions.values() if r.client_id == client_id])
            for region in chosen:
                if region.in_use:
                    steps = "step" if region.in_use == 1 else "steps"
                    raise FailedPrecondition(f"region {region.name!r} is in use by "
                                             f"{region.in_use} {steps}; retry after they "
                                             "answer", "name")
            for region in chosen:
                del self._regions[region.name]
        for region in chosen:
            region.mapping.close()
        return [region.name for region in chosen]

    def status(self, name: str = "") -> list[RegionInfo]:
        """Region `name` (NotFound if unknown), or every region, in registration order."""
        with self._lock:
            if not name:
                return [region.info() for region in self._regions.values()]
            if name not in self._regions:
                raise NotFound(f"no region named {name!r} is registered", "name")
            return [self._regions[name].info()]

    @contextlib.contextmanager
    def hold(self, refs: Iterable[tuple[str, str]]) -> Iterator[None]:
        """Marks each region of `refs` ((region name, request field) pairs) in use by one step
        until the block ends, so none can be unregistered meanwhile. NotFound naming the field
        of the first unknown region (nothing is held then)."""
        refs = list(refs)
        names = list(dict.fromkeys(name for name, _ in refs))
        with self._lock:
            for name, field in refs:
                if name not in self._regions:
                    raise NotFound(f"no region named {name!r} is registered: register it "
                                   "with the SharedMemory service first", field)
            held = [self._regions[name] for name in names]
            for region in held:
                region.in_use += 1
        try:
            yield
        finally:
            with self._lock:
                for region in held:
                    region.in_use -= 1

    def region_bytes(self, name: str, kind: str, field: str) -> torch.Tensor:
        """uint8 [byte_size] view of region `name`: on the CPU for a system region, on the
        service's GPU for a CUDA one. Read it only inside `hold`, and copy out of it.

        NotFound / InvalidArgument (another `kind`) / FailedPrecondition (the object shrank),
        each naming `field`."""
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"no region named {name!r} is registered: register it with the "
                           "SharedMemory service first", field)
        if region.kind != kind:
            raise InvalidArgument(
                f"region {name!r} is a {region.kind} region; reference it as "
                f"{'shared_memory' if region.kind == SYSTEM else 'cuda_ipc'}", field)
        region.mapping.check_intact(field)
        return region.mapping.data

    def close(self) -> None:
        """Unmaps and closes every region (server stop, after the last step answered)."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            if region.in_use:
                log.warning("closing region %r while %d steps read it", region.name,
                            region.in_use)
            region.mapping.close()

    def _check_free(self, name: str) -> None:
        if not name:
            raise InvalidArgument("name is required: the name steps will reference the "
                                  "region by", "name")
        with self._lock:
            self._check_free_locked(name)

    def _check_free_locked(self, name: str) -> None:
        if name in self._regions:
            raise InvalidArgument(f"a region named {name!r} is already registered: "
                                  "unregister it first or pick another name", "name")
        if len(self._regions) >= self.max_regions:
            raise ResourceExhausted(f"{len(self._regions)} regions are registered, the cap "
                                    f"(max_regions = {self.max_regions}): unregister the "
                                    "regions you no longer use", "max_regions")

    def _insert(self, region: _Region) -> None:
        """Adds a freshly mapped region, unless another registration took its name (or the
        last free place) meanwhile: then the mapping is closed and that error raised."""
        with self._lock:
            try:
                self._check_free_locked(region.name)
            except SamplerServiceError as exc:
                error = exc
            else:
                self._regions[region.name] = region
                return
        region.mapping.close()
        raise error
