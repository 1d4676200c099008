"""RegionRegistry: real POSIX shared-memory objects mapped read-only, every bad registration,
hold / unregister-in-use, bulk unregistration by client, the cap; CUDA regions exported by
another process (skipped without CUDA and cupy)."""
from __future__ import annotations

import importlib.util
import mmap
import os
import threading

import pytest
import torch

from sampler_service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from sampler_service.transport.regions import (CUDA, SYSTEM, RegionInfo, RegionRegistry,
                                               host_bytes_tensor)
from tests.unit.transport.conftest import requires_cuda

def shm_maps(name: str) -> list[str]:
    """Permissions of this process's mappings of /dev/shm/<name> (e.g. "r--s"), sorted."""
    with open("/proc/self/maps") as maps:
        return sorted(line.split()[1] for line in maps
                      if line.rstrip().endswith(f"/dev/shm/{name}"))


def field_of(excinfo) -> str:
    return excinfo.value.field


# --- system regions -------------------------------------------------------------------------

def test_host_bytes_tensor_views_read_only_bytes_and_pins_a_mapping(shm_objects):
    assert host_bytes_tensor(b"abc").tolist() == [97, 98, 99]
    shm = shm_objects(bytes(4096))
    fd = os.open(f"/dev/shm/{shm.name}", os.O_RDONLY)
    mapping = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
    os.close(fd)
    view = host_bytes_tensor(memoryview(mapping)[10:20])
    shm.buf[10] = 7
    assert view.shape == (10,) and view[0].item() == 7
    with pytest.raises(BufferError):
        mapping.close()
    del view
    mapping.close()


def test_a_system_region_is_mapped_once_read_only_and_shows_later_writes(shm_objects, cpu_regions):
    data = bytes(range(256)) * 48
    shm = shm_objects(data)
    own_maps = shm_maps(shm.name)
    cpu_regions.register_system("logits", "/" + shm.name, 100, 5000, "worker-1")
    assert shm_maps(shm.name) == sorted(own_maps + ["r--s"])
    view = cpu_regions.region_bytes("logits", SYSTEM, "logits.shared_memory.region")
    assert view.dtype == torch.uint8 and view.device.type == "cpu"
    assert bytes(view.numpy()) == data[100:5100]
    shm.buf[100:104] = b"\xff\xfe\xfd\xfc"
    assert bytes(view[:4].numpy()) == b"\xff\xfe\xfd\xfc"
    del view
    assert cpu_regions.unregister("logits", "") == ["logits"]
    assert shm_maps(shm.name) == own_maps
    assert os.path.exists(f"/dev/shm/{shm.name}"), "the service must never unlink the object"


def test_a_key_without_the_leading_slash_names_the_same_object(shm_objects, cpu_regions):
    shm = shm_objects(b"abcdefgh")
    cpu_regions.register_system("r", shm.name, 4, 4, "")
    assert bytes(cpu_regions.region_bytes("r", SYSTEM, "f").numpy()) == b"efgh"


def test_status_lists_regions_in_registration_order(shm_objects, cpu_regions):
    shm = shm_objects(bytes(64))
    cpu_regions.register_system("b", "/" + shm.name, 8, 16, "w1")
    cpu_regions.register_system("a", shm.name, 0, 64, "w2")
    assert cpu_regions.status() == [
        RegionInfo("b", SYSTEM, "/" + shm.name, 8, 16, 0, "w1", 0),
        RegionInfo("a", SYSTEM, shm.name, 0, 64, 0, "w2", 0)]
    assert cpu_regions.status("a") == [RegionInfo("a", SYSTEM, shm.name, 0, 64, 0, "w2", 0)]
    with pytest.raises(NotFound) as excinfo:
        cpu_regions.status("c")
    assert field_of(excinfo) == "name"


@pytest.mark.parametrize("key", ["", "/", "a/b", "/a/b", "../x", "/..", "..", "a..b", "a\0b",
                                 "/dev/shm/x", "//x", "x" * 256, ".", "/."])
def test_a_key_that_is_not_an_object_name_is_invalid(cpu_regions, key):
    with pytest.raises(InvalidArgument) as excinfo:
        cpu_regions.register_system("r", key, 0, 4, "")
    assert field_of(excinfo) == "key"
    assert cpu_regions.status() == []


def test_a_symbolic_link_in_the_shm_directory_is_refused(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    link = f"/dev/shm/{shm.name}-link"
    os.symlink(f"/dev/shm/{shm.name}", link)
    try:
        with pytest.raises(InvalidArgument, match="symbolic link") as excinfo:
            cpu_regions.register_system("r", os.path.basename(link), 0, 4, "")
    finally:
        os.unlink(link)
    assert field_of(excinfo) == "key"


def test_an_unknown_object_is_not_found(cpu_regions):
    with pytest.raises(NotFound, match="no shared-memory object") as excinfo:
        cpu_regions.register_system("r", "/sampler-test-no-such-object", 0, 4, "")
    assert field_of(excinfo) == "key"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every object")
def test_an_unreadable_object_is_a_failed_precondition(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    os.chmod(f"/dev/shm/{shm.name}", 0)
    with pytest.raises(FailedPrecondition, match="readable") as excinfo:
        cpu_regions.register_system("r", shm.name, 0, 4, "")
    assert field_of(excinfo) == "key"


@pytest.mark.parametrize("offset, byte_size", [(0, 4097), (4000, 97), (4096, 1), (10**12, 4)])
def test_a_range_beyond_the_object_is_invalid(shm_objects, cpu_regions, offset, byte_size):
    shm = shm_objects(bytes(4096))
    with pytest.raises(InvalidArgument, match="beyond the 4096-byte") as excinfo:
        cpu_regions.register_system("r", shm.name, offset, byte_size, "")
    assert field_of(excinfo) == "byte_size"


def test_a_range_ending_at_the_object_end_is_fine(shm_objects, cpu_regions):
    shm = shm_objects(bytes(range(256)) * 32)
    cpu_regions.register_system("r", shm.name, 8191, 1, "")
    assert cpu_regions.region_bytes("r", SYSTEM, "f").tolist() == [255]


def test_an_empty_region_is_invalid(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    with pytest.raises(InvalidArgument) as excinfo:
        cpu_regions.register_system("r", shm.name, 0, 0, "")
    assert field_of(excinfo) == "byte_size"


def test_a_missing_or_taken_name_is_invalid(shm_objects, cpu_regions):
    shm = shm_objects(bytes(range(16)))
    with pytest.raises(InvalidArgument) as excinfo:
        cpu_regions.register_system("", shm.name, 0, 4, "")
    assert field_of(excinfo) == "name"
    cpu_regions.register_system("r", shm.name, 0, 4, "")
    with pytest.raises(InvalidArgument, match="already registered") as excinfo:
        cpu_regions.register_system("r", shm.name, 4, 4, "")
    assert field_of(excinfo) == "name"
    assert cpu_regions.region_bytes("r", SYSTEM, "f").tolist() == [0, 1, 2, 3]


def test_the_region_cap_is_resource_exhausted(shm_objects):
    shm = shm_objects(bytes(16))
    registry = RegionRegistry(torch.device("cpu"), max_regions=2)
    try:
        registry.register_system("a", shm.name, 0, 4, "")
        registry.register_system("b", shm.name, 0, 4, "")
        with pytest.raises(ResourceExhausted, match="max_regions = 2"):
            registry.register_system("c", shm.name, 0, 4, "")
        registry.unregister("a", "")
        registry.register_system("c", shm.name, 0, 4, "")
        assert [info.name for info in registry.status()] == ["b", "c"]
    finally:
        registry.close()


def test_a_shrunk_object_is_a_failed_precondition_not_a_crash(shrunk_region):
    with pytest.raises(FailedPrecondition, match="shrank to 4096 bytes") as excinfo:
        shrunk_region.region_bytes("r", SYSTEM, "logits.shared_memory.region")
    assert field_of(excinfo) == "logits.shared_memory.region"


def test_region_bytes_checks_name_and_kind(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with pytest.raises(NotFound) as excinfo:
        cpu_regions.region_bytes("other", SYSTEM, "logits.shared_memory.region")
    assert field_of(excinfo) == "logits.shared_memory.region"
    with pytest.raises(InvalidArgument, match="reference it as shared_memory") as excinfo:
        cpu_regions.region_bytes("r", CUDA, "logits.cuda_ipc.region")
    assert field_of(excinfo) == "logits.cuda_ipc.region"


# --- hold and unregister --------------------------------------------------------------------

def test_a_held_region_cannot_be_unregistered_until_the_step_answers(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with cpu_regions.hold([("r", "logits.shared_memory.region")]):
        assert cpu_regions.status("r")[0].in_use == 1
        with pytest.raises(FailedPrecondition, match="in use by 1 step; retry") as excinfo:
            cpu_regions.unregister("r", "")
        assert field_of(excinfo) == "name"
        with cpu_regions.hold([("r", "logits.shared_memory.region")]):
            with pytest.raises(FailedPrecondition, match="in use by 2 steps"):
                cpu_regions.unregister("r", "")
    assert cpu_regions.status("r")[0].in_use == 0
    assert cpu_regions.unregister("r", "") == ["r"]


def test_one_step_reading_a_region_twice_holds_it_once(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with cpu_regions.hold([("r", "logits.shared_memory.region"),
                           ("r", "reference_logits.shared_memory.region")]):
        assert cpu_regions.status("r")[0].in_use == 1
    assert cpu_regions.status("r")[0].in_use == 0


def test_holding_an_unknown_region_names_the_field_and_holds_nothing(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with pytest.raises(NotFound) as excinfo:
        with cpu_regions.hold([("r", "logits.shared_memory.region"),
                               ("gone", "reference_logits.cuda_ipc.region")]):
            pytest.fail("the block must not run")
    assert field_of(excinfo) == "reference_logits.cuda_ipc.region"
    assert cpu_regions.status("r")[0].in_use == 0


def test_a_step_that_fails_releases_its_hold(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    cpu_regions.register_system("r", shm.name, 0, 16, "")
    with pytest.raises(ValueError):
        with cpu_regions.hold([("r", "logits.shared_memory.region")]):
            raise ValueError("the step failed")
    assert cpu_regions.unregister("r", "") == ["r"]


def test_unregistering_an_unknown_name_is_not_found(cpu_regions):
    with pytest.raises(NotFound) as excinfo:
        cpu_regions.unregister("nope", "w1")
    assert field_of(excinfo) == "name"


def test_an_empty_name_unregisters_every_region_of_the_client(shm_objects, cpu_regions):
    shm = shm_objects(bytes(16))
    for name, client in [("a", "w1"), ("b", "w2"), ("c", "w1"), ("d", "")]:
        cpu_regions.register_system(name, shm.name, 0, 16, client)
    with cpu_regions.hold([("c", "logits.shared_memory.region")]):
        with pytest.raises(FailedPrecondition, match="'c' is in use"):
            cpu_regions.unregister("", "w1")
        assert [info.name for info in cpu_regions.status()] == ["a", "b", "c", "d"]
    assert cpu_regions.unregister("", "w1") == ["a", "c"]
    assert [info.name for info in cpu_regions.status()] == ["b", "d"]
    assert cpu_regions.unregister("", "w1") == []
    assert cpu_regions.unregister("", "w3") == []
    with pytest.raises(InvalidArgument) as excinfo:
        cpu_regions.unregister("", "")
    assert field_of(excinfo) == "name"
    assert cpu_regions.unregister("d", "w2") == ["d"], "a named region ignores client_id"


def test_close_unmaps_every_region(shm_objects):
    shm = shm_objects(bytes(16))
    registry = RegionRegistry(torch.device("cpu"))
    own_maps = shm_maps(shm.name)
    registry.register_system("a", shm.name, 0, 8, "")
    registry.register_system("b", shm.name, 8, 8, "")
    assert shm_maps(shm.name) == sorted(own_maps + ["r--s", "r--s"])
    registry.close()
    assert shm_maps(shm.name) == own_maps
    assert registry.status() == []


def test_concurrent_registration_steps_and_unregistration_stay_consistent(shm_objects,
                                                                          cpu_regions):
    shm = shm_objects(bytes(range(256)) * 16)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(40):
                name = f"w{index}-{round_}"
                cpu_regions.register_system(name, shm.name, index, 256, f"w{index}")
                with cpu_regions.hold([(name, "logits.shared_memory.region")]):
                    view = cpu_regions.region_bytes(name, SYSTEM, "logits.shared_memory.region")
                    assert view[0].item() == index
                    del view
                assert cpu_regions.unregister(name, "") == [name]
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cpu_regions.status() == []


# --- CUDA regions ---------------------------------------------------------------------------

def test_a_handle_that_is_not_64_bytes_is_invalid(cpu_regions):
    with pytest.raises(InvalidArgument, match="has 63 bytes") as excinfo:
        cpu_regions.register_cuda("r", bytes(63), 0, 4, "")
    assert field_of(excinfo) == "raw_handle"


def test_an_empty_cuda_region_is_invalid(cpu_regions):
    with pytest.raises(InvalidArgument) as excinfo:
        cpu_regions.register_cuda("r", bytes(64), 0, 0, "")
    assert field_of(excinfo) == "byte_size"


def test_cuda_regions_on_a_cpu_service_are_a_failed_precondition(cpu_regions):
    with pytest.raises(FailedPrecondition, match="runs on the cpu") as excinfo:
        cpu_regions.register_cuda("r", bytes(64), 0, 4, "")
    assert field_of(excinfo) == "device_id"


def test_cuda_regions_without_cupy_say_how_to_install_it():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed here")
    registry = RegionRegistry(torch.device("cuda", 0))  # no CUDA call before cupy is needed
    with pytest.raises(FailedPrecondition, match=r"pip install 'sampler-sidecar\[gpu\]'"):
        registry.register_cuda("r", bytes(64), 0, 4, "")
    assert registry.status() == []


@pytest.mark.gpu
@requires_cuda
def test_a_device_the_service_does_not_use_is_a_failed_precondition(cuda_regions):
    pytest.importorskip("cupy")
    with pytest.raises(FailedPrecondition, match="not the service's GPU") as excinfo:
        cuda_regions.register_cuda("r", bytes(64), 1, 4, "")
    assert field_of(excinfo) == "device_id"


@pytest.mark.gpu
@requires_cuda
def test_a_handle_the_driver_refuses_is_a_failed_precondition_with_the_cuda_error(cuda_regions):
    pytest.importorskip("cupy")
    with pytest.raises(FailedPrecondition, match="refused the IPC handle: cuda") as excinfo:
        cuda_regions.register_cuda("r", bytes(range(64)), 0, 4, "")
    assert field_of(excinfo) == "raw_handle"
    assert cuda_regions.status() == []


@pytest.mark.gpu
@requires_cuda
def test_a_cuda_region_is_a_view_of_the_other_process_allocation(cuda_exporter, cuda_regions):
    pytest.importorskip("cupy")
    data = torch.randint(0, 256, (2 * 1024 * 1024,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    handle = cuda_exporter(data.numpy().tobytes())
    cuda_regions.register_cuda("r", handle, 0, data.numel(), "w1")
    assert cuda_regions.status() == [RegionInfo("r", CUDA, "", 0, data.numel(), 0, "w1", 0)]
    view = cuda_regions.region_bytes("r", CUDA, "logits.cuda_ipc.region")
    assert view.device == torch.device("cuda", 0)
    assert torch.equal(view.cpu(), data)
    del view
    assert cuda_regions.unregister("", "w1") == ["r"]
    assert cuda_regions.status() == []


@pytest.mark.gpu
@requires_cuda
def test_a_cuda_region_larger_than_the_allocation_is_invalid(cuda_exporter, cuda_regions):
    pytest.importorskip("cupy")
    handle = cuda_exporter(bytes(2 * 1024 * 1024))
    with pytest.raises(InvalidArgument, match="exceeds the") as excinfo:
        cuda_regions.register_cuda("r", handle, 0, 2 * 1024 * 1024 + 1, "")
    assert field_of(excinfo) == "byte_size"
    assert cuda_regions.status() == []
