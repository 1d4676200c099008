"""sampler_client.regions: POSIX shared-memory regions the client owns, and the rings."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.regions import (ALIGNMENT, RegionRing, SystemRegion, aligned,
                                    import_cupy, region_capacity)
from sampler_client.tensors import wire_tensor


def shm_path(region: SystemRegion) -> str:
    return f"/dev/shm/{region.key}"


@pytest.fixture
def new_region():
    """make(byte_size) -> a SystemRegion with a fresh name; every one is freed afterwards."""
    made: list[SystemRegion] = []

    def make(byte_size: int = 4096) -> SystemRegion:
        made.append(SystemRegion(f"sps_test_{uuid.uuid4().hex[:12]}", byte_size))
        return made[-1]

    yield make
    for region in made:
        region.free()


def test_a_system_region_reserves_its_pages_when_made(new_region):
    """A full /dev/shm fails the creation (and auto falls back), never a later write (SIGBUS)."""
    region = new_region(1 << 20)
    assert os.stat(shm_path(region)).st_blocks * 512 >= 1 << 20


def test_alignment_and_capacity():
    assert [aligned(n) for n in (0, 1, ALIGNMENT, ALIGNMENT + 1)] == [0, ALIGNMENT, ALIGNMENT,
                                                                       2 * ALIGNMENT]
    assert region_capacity(10) == 1 << 20
    assert region_capacity(32_833_536) == 40 << 20  # 64 x 128256 fp32, a quarter more, whole MiB
    assert region_capacity(4 << 20) >= 5 << 20


def test_a_system_region_is_written_registered_and_unlinked_once(new_region):
    region = new_region(4096)
    assert os.path.getsize(shm_path(region)) == 4096
    region.write(wire_tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), 256)
    with open(shm_path(region), "rb") as file:
        file.seek(256)
        assert np.frombuffer(file.read(24), "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    rpc = region.registration("client-a")
    assert rpc.method == "RegisterSystemRegion"
    assert rpc.request == pb.RegisterSystemRegionRequest(
        name=region.name, key=region.key, offset=0, byte_size=4096, client_id="client-a")
    region.free()
    assert not os.path.exists(shm_path(region))
    region.free()  # a second free does nothing


def test_a_region_never_freed_is_unlinked_when_collected():
    region = SystemRegion(f"sps_test_{uuid.uuid4().hex[:12]}", 4096)
    path = shm_path(region)
    assert os.path.exists(path)
    del region
    gc.collect()
    assert not os.path.exists(path)


def test_the_resource_tracker_stays_silent_whether_or_not_regions_are_freed():
    """A process that frees one region and forgets another exits with nothing left in
    /dev/shm and no resource-tracker warning (no leak report, no double unlink)."""
    name = f"sps_test_{uuid.uuid4().hex[:12]}"
    code = ("from sampler_client.regions import SystemRegion\n"
            f"SystemRegion('{name}_a', 1 << 16).free()\n"
            f"kept = SystemRegion('{name}_b', 1 << 16)\n")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(name)]


def test_ring_lends_fitting_regions_and_grows_up_to_its_size(new_region):
    ring = RegionRing(2)
    first = ring.acquire(100)
    assert first is not None and first.region is None and first.busy
    first.region = new_region(1000)
    second = ring.acquire(100)
    assert second is not first
    assert ring.acquire(100) is None  # both lent
    ring.release(first)
    assert ring.acquire(500) is first  # its region fits
    ring.release(first)
    second.region = new_region(4000)
    ring.release(second)
    assert ring.acquire(2000) is second  # the smallest region that fits
    assert ring.acquire(8000) is first  # none fits: the free one, to grow


def test_retired_slots_are_never_lent_again_and_drained_with_the_rest(new_region):
    ring = RegionRing(1)
    slot = ring.acquire(10)
    slot.region = retired = new_region()
    ring.retire(slot)
    fresh = ring.acquire(10)
    assert fresh is not slot and fresh.region is None
    fresh.region = kept = new_region()
    assert set(map(id, ring.drain())) == {id(retired), id(kept)}
    assert ring.drain() == []


def test_cuda_regions_say_how_to_get_cupy():
    try:
        import_cupy()
    except ImportError as error:
        assert "sampler-sidecar[gpu]" in str(error)
    else:
        pytest.skip("cupy is installed")
