"""Runs a batch of StepRequests in the engine's thread: decode every request, step them all as
one batch (`SamplerCore.step_calls`), encode each answer. A request that cannot be decoded or
stepped gets its exception; the others are answered."""
from __future__ import annotations

from typing import Sequence

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.server import convert
from sampler_service.service import SamplerCore, StepCall
from sampler_service.step_logits import StepLogits
from sampler_service.transport.codec import decode_tensor


class StepRunner:
    """`runner(requests)` -> one StepResponse or exception per request, in order."""

    def __init__(self, core: SamplerCore):
        self.core = core

    def decode(self, request: pb.StepRequest) -> StepCall:
        """The request out of its proto, its tensors on the engine's device."""
        device = self.core.device
        rows = convert.step_rows_from_pb(request.rows)
        logits = StepLogits.of_dense(decode_tensor(request.logits, "logits", device))
        reference = (decode_tensor(request.reference_logits, "reference_logits", device)
                     if request.HasField("reference_logits") else None)
        return StepCall(rows, logits, request.processed_logprobs, reference,
                        convert.signals_from_pb(request, device))

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
