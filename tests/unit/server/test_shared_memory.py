"""SharedMemoryServicer on a real grpc.aio server (port 0): statuses and fields of every RPC."""
from __future__ import annotations

import asyncio
from multiprocessing import shared_memory

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_service.server.metrics import ServiceMetrics
from sampler_service.server.shared_memory import SharedMemoryServicer
from sampler_service.transport.regions import RegionRegistry


def fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    out = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [v.field for v in bad.field_violations]
    return out


async def serve_and(allowed: bool, body):
    regions = RegionRegistry(torch.device("cpu"))
    metrics = ServiceMetrics(lambda: 0)
    server = grpc.aio.server()
    sampler_pb2_grpc.add_SharedMemoryServicer_to_server(
        SharedMemoryServicer(regions, metrics, allowed), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(sampler_pb2_grpc.SharedMemoryStub(channel), regions, metrics)
    finally:
        await server.stop(0)
        regions.close()


def test_register_status_unregister():
    shm = shared_memory.SharedMemory(create=True, size=64)
    async def body(stub, regions, metrics):
        await stub.RegisterSystemRegion(pb.RegisterSystemRegionRequest(
            name="a", key=shm.name, offset=0, byte_size=64, client_id="c"))
        await stub.RegisterSystemRegion(pb.RegisterSystemRegionRequest(
            name="b", key="/" + shm.name, offset=8, byte_size=8, client_id="c"))
        status = await stub.RegionStatus(pb.RegionStatusRequest())
        assert [(r.name, r.kind, r.offset, r.byte_size, r.client_id) for r in status.regions] == \
            [("a", "system", 0, 64, "c"), ("b", "system", 8, 8, "c")]
        with regions.hold([("a", "logits.shared_memory.region")]):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.UnregisterRegion(pb.UnregisterRegionRequest(client_id="c"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and fields(e.value) == ["name"]
            assert "in use by 1 step" in e.value.details()
        answer = await stub.UnregisterRegion(pb.UnregisterRegionRequest(client_id="c"))
        assert list(answer.unregistered) == ["a", "b"]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.RegionStatus(pb.RegionStatusRequest(name="a"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and fields(e.value) == ["name"]
        for request, code, field in [
            (pb.RegisterSystemRegionRequest(name="x", key="../etc", byte_size=4),
             grpc.StatusCode.INVALID_ARGUMENT, "key"),
            (pb.RegisterSystemRegionRequest(name="x", key="nope-sampler-test", byte_size=4),
             grpc.StatusCode.NOT_FOUND, "key"),
            (pb.RegisterSystemRegionRequest(name="x", key=shm.name, byte_size=65),
             grpc.StatusCode.INVALID_ARGUMENT, "byte_size"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.RegisterSystemRegion(request)
            assert e.value.code() == code and fields(e.value) == [field], e.value
        for request, code, field in [
            (pb.RegisterCudaRegionRequest(name="x", raw_handle=bytes(3), byte_size=4),
             grpc.StatusCode.INVALID_ARGUMENT, "raw_handle"),
            (pb.RegisterCudaRegionRequest(name="x", raw_handle=bytes(64), byte_size=4),
             grpc.StatusCode.FAILED_PRECONDITION, "device_id"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.RegisterCudaRegion(request)
            assert e.value.code() == code and fields(e.value) == [field], e.value
        assert metrics.errors.labels("RegisterCudaRegion", "FAILED_PRECONDITION")._value.get() == 1
    try:
        asyncio.run(serve_and(True, body))
    finally:
        shm.close()
        shm.unlink()


def test_every_rpc_is_refused_while_shared_memory_is_off():
    async def body(stub, regions, metrics):
        for call, request in [
                (stub.RegisterSystemRegion, pb.RegisterSystemRegionRequest(name="a")),
                (stub.RegisterCudaRegion, pb.RegisterCudaRegionRequest(name="a")),
                (stub.UnregisterRegion, pb.UnregisterRegionRequest(name="a")),
                (stub.RegionStatus, pb.RegionStatusRequest())]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(request)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--allow-shared-memory" in e.value.details()
            assert fields(e.value) == ["--allow-shared-memory"]
    asyncio.run(serve_and(False, body))
