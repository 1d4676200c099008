"""Runs a batch of StepRequests in the engine's thread: decode every request, step them all as
one batch (`SamplerCore.step_calls`), encode each answer. A request that cannot be decoded or
stepped gets its exception; the others are answered. The caller holds the shared-memory and
CUDA IPC regions a request reads (`hold`) from its arrival until it is answered."""
from __future__ import annotations

import contextlib
from typing import Sequence

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.server import convert
from sampler_service.service import SamplerCore, StepCall
from sampler_service.step_logits import StepLogits
from sampler_service.transport.codec import decode_tensor, region_refs
from sampler_service.transport.regions import RegionRegistry
from sampler_service.transport.sparse import decode_sparse


class StepRunner:
    """`runner(requests)` -> one StepResponse or exception per request, in order."""

    def __init__(self, core: SamplerCore, regions: RegionRegistry | None):
        self.core = core
        #: None when shared memory is off: a region reference is then FAILED_PRECONDITION.
        self.regions = regions

    def decode_tensor(self, tensor: pb.Tensor, field: str):
        return decode_tensor(tensor, field, self.core.device, self.regions)

    def hold(self, request) -> contextlib.AbstractContextManager:
        """Keeps the regions `request` reads registered (NOT_FOUND for an unknown one)."""
        if self.regions is None:
            return contextlib.nullcontext()
        return self.regions.hold(region_refs(request))

    def decode(self, request: pb.StepRequest) -> StepCall:
        """The request out of its proto, its tensors on the engine's device."""
        rows = convert.step_rows_from_pb(request.rows)
        sparse_rows, sparse = ((), None)
        if request.HasField("sparse"):
            sparse_rows, sparse = decode_sparse(request.sparse, len(rows), self.core.device,
                                                self.decode_tensor)
        dense = (self.decode_tensor(request.logits, "logits")
                 if request.HasField("logits") or sparse is None else None)
        listed = set(sparse_rows)
        logits = StepLogits(dense, tuple(r for r in range(len(rows)) if r not in listed),
                            sparse, tuple(sparse_rows))
        reference = (self.decode_tensor(request.reference_logits, "reference_logits")
                     if request.HasField("reference_logits") else None)
        return StepCall(rows, logits, request.processed_logprobs, reference,
                        convert.signals_from_pb(request, self.core.device))

    def __call__(self, requests: Sequence[pb.StepRequest]) -> list[pb.StepResponse | Exception]:
        results: list[pb.StepResponse | Exception | None] = [None] * len(requests)
        calls: dict[int, StepCall] = {}
        for index, request in enumerate(requests):
            try:
                calls[index] = self.decode(request)
            except Exception as exc:
                results[index] = exc
        stepped = self.core.step_calls(list(calls.values()))
        for (index, call), answers in zip(calls.items(), stepped):
            results[index] = answers if isinstance(answers, Exception) else self.encode(
                requests[index], call, answers)
        return results  # type: ignore[return-value]

    @staticmethod
    def encode(request: pb.StepRequest, call: StepCall, answers) -> pb.StepResponse:
        response = pb.StepResponse(request_id=request.request_id)
        for answer in answers:
            convert.answer_pb(response, call.rows[answer[0]].sequence_id, answer)
        return response
