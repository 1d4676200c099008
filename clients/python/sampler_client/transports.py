"""Which transport carries a request's tensors, and placing them there.

Transports (`SamplerClient(transport=...)`):
- "inline": the bytes travel in the message (`Tensor.raw`); works everywhere.
- "shm": every tensor is copied into a POSIX shared-memory region the client created and
  registered (`Tensor.shared_memory`); a CUDA tensor is copied to the host on the way.
- "cuda_ipc": every tensor is copied into a CUDA allocation the client exported and registered
  (`Tensor.cuda_ipc`), on the tensor's own GPU (a host tensor is uploaded to the current one).
- "auto" (the default): on a local service (`is_local_target`) CUDA IPC for CUDA tensors and
  shared memory for the others; inline for a remote one. A region kind whose creation or
  registration fails (the service has shared memory off, CUDA IPC is not permitted, no cupy)
  is given up for the client's life, logged once at INFO: CUDA tensors then go through shared
  memory, and without it everything goes inline. An explicit "shm" or "cuda_ipc" raises the
  failure instead. A registration that could not reach the service (UNAVAILABLE) is no
  refusal: it is raised, for the client's replay to retry once the service is back.

All tensors of one request that go to one kind of region (and one GPU) share one region, at
`regions.ALIGNMENT`-aligned offsets. The regions come from rings of `ring_slots` regions per
kind (and GPU): a region is lent to one request and reused only after the service answered it;
a region too small is replaced by a larger one (unregistered, freed, a new one registered).
When every region of a ring is lent (more requests in flight than `ring_slots`), the tensor
travels inline: slower, never different. A restarted service has forgotten every region:
`renew_regions` frees the client's idle ones, so each slot registers a new one when next lent.
"""
from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import Exchange, Rpc
from sampler_client.errors import SamplerError
from sampler_client.regions import (CudaRegion, Region, RegionRing, RingSlot, SystemRegion,
                                    aligned, region_capacity)
from sampler_client.tensors import WireTensor, inline_tensor

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "inline", "shm", "cuda_ipc")
INLINE, SYSTEM, CUDA = "inline", "system", "cuda"
_REGION_NAMES = {SYSTEM: "shared memory", CUDA: "CUDA IPC"}
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def _host_of(address: str) -> str:
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") > 1:  # a bare IPv6 address, no port
        return address
    return address.partition(":")[0]


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def is_local_target(target: str) -> bool:
    """Whether a gRPC target names a service on this machine: a Unix socket (`unix:path`,
    `unix:///path`, `unix-abstract:name`) or loopback hosts only (localhost, 127.0.0.0/8,
    ::1), with or without a `dns:`, `ipv4:` or `ipv6:` scheme and a port."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith("dns:"):
        rest = target[len("dns:"):]
        addresses = [rest[2:].partition("/")[2] if rest.startswith("//") else rest]
    elif target.startswith(("ipv4:", "ipv6:")):
        addresses = target[len("ipv4:"):].split(",")
    else:
        addresses = [target]
    return all(_is_loopback(_host_of(address)) for address in addresses)


def _unreachable(error: BaseException) -> bool:
    """A call that could not reach the service (it is away): no refusal to give up on."""
    return isinstance(error, SamplerError) and error.code == grpc.StatusCode.UNAVAILABLE


@dataclass
class Placement:
    """A request's tensors as placed (None where none was given) and the ring slots lent to
    them. `finish(answered)` gives the slots back once: to be reused when the service answered
    the request, retired when it may still be reading them."""

    tensors: list[pb.Tensor | None]
    lent: list[tuple[RegionRing, RingSlot]] = field(default_factory=list)

    def finish(self, answered: bool) -> None:
        lent, self.lent = self.lent, []
        for ring, slot in lent:
            (ring.release if answered else ring.retire)(slot)


class TensorPlacer:
    """Places a client's tensors on its transport; one per client, shared by its streams and
    safe to use from several threads or tasks at once.

    `client_id` (random unless given) is sent with every registration; `close()` unregisters
    them all (UnregisterRegion with an empty name and this id) and frees the regions.
    """

    def __init__(self, target: str, transport: str = "auto", *, ring_slots: int = 4,
                 client_id: str | None = None):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {list(TRANSPORTS)}")
        if ring_slots < 1:
            raise ValueError(f"ring_slots must be >= 1, got {ring_slots}")
        self.transport = transport
        self.local = is_local_target(target)
        self.ring_slots = ring_slots
        self.client_id = client_id or uuid.uuid4().hex
        self._rings: dict[tuple[str, int | None], RegionRing] = {}
        self._given_up: set[str] = set()
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._registered = False

    # -- where a tensor goes --------------------------------------------------------------------
    def _usable(self, kind: str) -> bool:
        return kind not in self._given_up

    def _kind_of(self, wire: WireTensor) -> str:
        """INLINE, SYSTEM or CUDA: where `wire` goes now."""
        if self.transport != "auto":
            return {"inline": INLINE, "shm": SYSTEM, "cuda_ipc": CUDA}[self.transport]
        if not self.local:
            return INLINE
        if wire.cuda_device is not None and self._usable(CUDA):
            return CUDA
        return SYSTEM if self._usable(SYSTEM) else INLINE

    def _fallback(self, kind: str) -> str:
        """Where a tensor goes when its region kind cannot take it now."""
        if self.transport == "auto" and kind == CUDA and self._usable(SYSTEM):
            return SYSTEM
        return INLINE

    def _give_up(self, kind: str, error: BaseException) -> None:
        with self._lock:
            if kind in self._given_up:
                return
            self._given_up.add(kind)
        then = "shared memory" if kind == CUDA and self._usable(SYSTEM) else "inline bytes"
        log.info("transport auto: %s unavailable (%s); tensors go as %s for this client's life",
                 _REGION_NAMES[kind], error, then)

    @staticmethod
    def _device_of(kind: str, wire: WireTensor) -> int | None:
        if kind != CUDA:
            return None
        if wire.cuda_device is not None:
            return wire.cuda_device
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("transport 'cuda_ipc' needs a CUDA device, and this process sees "
                               "none: use transport='shm' or 'auto'")
        return torch.cuda.current_device()

    # -- placing ------------------------------------------------------------------------------
    def place(self, wires: Sequence[WireTensor | None]) -> Exchange[Placement]:
        """Places the tensors of one request (None entries stay None), registering regions as
        needed; the caller sends the request, then calls `Placement.finish`."""
        kinds = [None if w is None else (self._kind_of(w) if w.nbytes else INLINE) for w in wires]
        placement = Placement([None] * len(wires))
        try:
            for kind in (CUDA, SYSTEM):  # CUDA first: what it cannot take may go to SYSTEM
                groups: dict[int | None, list[int]] = {}
                for i, (wire, wire_kind) in enumerate(zip(wires, kinds)):
                    if wire_kind == kind:
                        groups.setdefault(self._device_of(kind, wire), []).append(i)
                for device, members in groups.items():
                    if not (yield from self._place_group(kind, device, wires, members, placement)):
                        for i in members:
                            kinds[i] = self._fallback(kind)
            for i, (wire, kind) in enumerate(zip(wires, kinds)):
                if kind == INLINE:
                    placement.tensors[i] = inline_tensor(wire)
        except BaseException:
            placement.finish(answered=True)  # nothing was sent: the slots are free again
            raise
        return placement

    def _place_group(self, kind: str, device: int | None, wires: Sequence[WireTensor | None],
                     members: list[int], placement: Placement) -> Exchange[bool]:
        """Writes `members` into one region of `kind`; False when none could be lent."""
        offsets = list(itertools.accumulate((aligned(wires[i].nbytes) for i in members), initial=0))
        ring = self._ring(kind, device)
        slot = yield from self._lend(ring, kind, device, offsets[-1])
        if slot is None:
            return False
        placement.lent.append((ring, slot))
        region = slot.region
        for i, offset in zip(members, offsets):
            wire = wires[i]
            region.write(wire, offset)
            placement.tensors[i] = pb.Tensor(dtype=wire.dtype, shape=list(wire.shape), **{
                region.tensor_field: pb.RegionRef(region=region.name, offset=offset,
                                                  byte_size=wire.nbytes)})
        region.finish_writes()
        return True

    def _ring(self, kind: str, device: int | None) -> RegionRing:
        with self._lock:
            return self._rings.setdefault((kind, device), RegionRing(self.ring_slots))

    def _lend(self, ring: RegionRing, kind: str, device: int | None,
              byte_size: int) -> Exchange[RingSlot | None]:
        """A slot whose region holds `byte_size` bytes, registered; None when the ring is all
        lent, or (auto) when the kind just failed and was given up."""
        slot = ring.acquire(byte_size)
        if slot is None:
            log.debug("all %d %s regions are in flight: this tensor goes inline",
                      ring.size, _REGION_NAMES[kind])
            return None
        if slot.region is not None and slot.region.byte_size >= byte_size:
            return slot
        try:
            yield from self._replace_region(slot, kind, device, byte_size)
        except (SamplerError, OSError, ImportError, RuntimeError) as error:
            ring.release(slot)
            if self.transport != "auto" or _unreachable(error):
                raise
            self._give_up(kind, error)
            return None
        return slot

    def _replace_region(self, slot: RingSlot, kind: str, device: int | None,
                        byte_size: int) -> Exchange[None]:
        old, slot.region = slot.region, None
        if old is not None:
            try:
                yield Rpc("UnregisterRegion", pb.UnregisterRegionRequest(
                    name=old.name, client_id=self.client_id))
            except SamplerError as error:  # e.g. NOT_FOUND after a restart of the service
                log.debug("unregistering %s: %s", old.name, error)
            old.free()
        region = self._new_region(kind, device, region_capacity(byte_size))
        try:
            yield region.registration(self.client_id)
        except BaseException:
            region.free()
            raise
        self._registered = True
        slot.region = region

    def _new_region(self, kind: str, device: int | None, byte_size: int) -> Region:
        name = f"sp{kind[0]}_{self.client_id[:12]}_{next(self._names)}"
        if kind == CUDA:
            return CudaRegion(name, byte_size, device)
        return SystemRegion(name, byte_size)

    def renew_regions(self) -> None:
        """Frees every region not lent now, for a service that restarted and forgot them: each
        of their slots makes and registers a new region when next lent, under a new name
        (so it cannot clash with a region the service still has, nor with another thread
        doing the same)."""
        with self._lock:
            rings = list(self._rings.values())
        for ring in rings:
            for region in ring.renew():
                region.free()

    # -- closing ------------------------------------------------------------------------------
    def close(self) -> Exchange[None]:
        """Unregisters every region of this client and frees them (idempotent)."""
        with self._lock:
            regions = [region for ring in self._rings.values() for region in ring.drain()]
            registered, self._registered = self._registered, False
        try:
            if registered:
                try:
                    yield Rpc("UnregisterRegion", pb.UnregisterRegionRequest(
                        name="", client_id=self.client_id))
                except SamplerError as error:
                    log.info("could not unregister the regions of client %s: %s",
                             self.client_id, error)
        finally:
            for region in regions:
                region.free()
