"""The `sampler.v1.SharedMemory` servicer: registers, unregisters and lists the regions a
worker shares with the service (`RegionRegistry`).

Served only with --allow-shared-memory; otherwise every call answers FAILED_PRECONDITION
naming the flag. Calls that may wait on the GPU (opening or closing a CUDA handle) run in a
worker thread, never on the event loop. Registrations are logged with the caller's address.
"""
from __future__ import annotations

import asyncio
import logging

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_service.errors import FailedPrecondition
from sampler_service.server.error_mapping import map_errors
from sampler_service.server.metrics import ServiceMetrics
from sampler_service.transport.regions import SHARED_MEMORY_OFF, RegionInfo, RegionRegistry

log = logging.getLogger(__name__)


def region_info_pb(info: RegionInfo) -> pb.RegionInfo:
    return pb.RegionInfo(name=info.name, kind=info.kind, key=info.key, offset=info.offset,
                         byte_size=info.byte_size, device_id=info.device_id,
                         client_id=info.client_id, in_use=info.in_use)


class SharedMemoryServicer(sampler_pb2_grpc.SharedMemoryServicer):
    def __init__(self, regions: RegionRegistry, metrics: ServiceMetrics, allowed: bool):
        self.regions = regions
        self.metrics = metrics
        self.allowed = allowed

    def _check_allowed(self) -> None:
        if not self.allowed:
            raise FailedPrecondition(SHARED_MEMORY_OFF, "--allow-shared-memory")

    @map_errors
    async def RegisterSystemRegion(self, request, context):
        self._check_allowed()
        self.regions.register_system(request.name, request.key, request.offset,
                                     request.byte_size, request.client_id)
        log.info("RegisterSystemRegion %r from %s: %d bytes at offset %d of %r (client %r)",
                 request.name, context.peer(), request.byte_size, request.offset, request.key,
                 request.client_id)
        return pb.RegisterRegionResponse()

    @map_errors
    async def RegisterCudaRegion(self, request, context):
        self._check_allowed()
        await asyncio.to_thread(self.regions.register_cuda, request.name, request.raw_handle,
                                request.device_id, request.byte_size, request.client_id)
        log.info("RegisterCudaRegion %r from %s: %d bytes on cuda:%d (client %r)",
                 request.name, context.peer(), request.byte_size, request.device_id,
                 request.client_id)
        return pb.RegisterRegionResponse()

    @map_errors
    async def UnregisterRegion(self, request, context):
        self._check_allowed()
        names = await asyncio.to_thread(self.regions.unregister, request.name, request.client_id)
        log.info("UnregisterRegion %r (client %r) from %s: %s", request.name, request.client_id,
                 context.peer(), names)
        return pb.UnregisterRegionResponse(unregistered=names)

    @map_errors
    async def RegionStatus(self, request, context):
        self._check_allowed()
        return pb.RegionStatusResponse(
            regions=[region_info_pb(info) for info in self.regions.status(request.name)])
