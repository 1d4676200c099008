"""Fixtures of the transport tests: real POSIX shared-memory objects, region registries, and
CUDA allocations exported by another process (skipped without CUDA and cupy)."""
from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import shared_memory

import pytest
import torch

from sampler_service.transport.regions import RegionRegistry

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Run in another process: copies the bytes of file argv[1] into a fresh cudaMalloc
#: allocation (its base, as a worker's region is), prints its cudaIpcMemHandle_t in hex and
#: keeps the allocation until stdin closes.
_CUDA_EXPORTER = """
import sys
import numpy as np
import cupy
data = np.fromfile(sys.argv[1], dtype=np.uint8)
pointer = cupy.cuda.runtime.malloc(data.size)
cupy.cuda.runtime.memcpy(pointer, data.ctypes.data, data.size, cupy.cuda.runtime.memcpyHostToDevice)
cupy.cuda.runtime.deviceSynchronize()
print(cupy.cuda.runtime.ipcGetMemHandle(pointer).hex(), flush=True)
sys.stdin.read()
cupy.cuda.runtime.free(pointer)
"""


@pytest.fixture
def shm_objects():
    """make(data: bytes) -> a new POSIX shared-memory object holding `data` (the test's own
    mapping of it stays writable); every object is unlinked at teardown."""
    made: list[shared_memory.SharedMemory] = []

    def make(data: bytes) -> shared_memory.SharedMemory:
        shm = shared_memory.SharedMemory(create=True, size=len(data))
        made.append(shm)
        shm.buf[:len(data)] = data
        return shm

    yield make
    for shm in made:
        shm.close()
        shm.unlink()


@pytest.fixture
def cpu_regions():
    registry = RegionRegistry(torch.device("cpu"))
    yield registry
    registry.close()


@pytest.fixture
def cuda_exporter(tmp_path):
    """export(data: bytes) -> the 64-byte CUDA IPC handle of an allocation holding `data` in
    another process, which keeps it until teardown (request this fixture before the registry
    that opens the handle, so the registry closes it first)."""
    processes: list[subprocess.Popen] = []

    def export(data: bytes) -> bytes:
        path = tmp_path / f"region{len(processes)}.bin"
        path.write_bytes(data)
        process = subprocess.Popen([sys.executable, "-c", _CUDA_EXPORTER, str(path)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        line = process.stdout.readline()
        assert line, "the exporting process died"
        return bytes.fromhex(line.strip())

    yield export
    for process in processes:
        process.stdin.close()
        assert process.wait(timeout=120) == 0


@pytest.fixture
def cuda_regions():
    registry = RegionRegistry(torch.device("cuda", 0))
    yield registry
    registry.close()




@pytest.fixture
def shrunk_region(shm_objects, cpu_regions):
    """`cpu_regions` with region "r" (bytes 4096-8191 of an object) whose object the worker
    then shrank to 4096 bytes: the registered range lies past its end."""
    shm = shm_objects(bytes(8192))
    cpu_regions.register_system("r", shm.name, 4096, 4096, "")
    fd = os.open(f"/dev/shm/{shm.name}", os.O_RDWR)
    try:
        os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
    return cpu_regions
