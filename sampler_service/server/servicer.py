"""The `sampler.v1.Sampler` servicer: decode, call the core, encode; map errors to statuses."""
from __future__ import annotations

import functools
import logging
import time
from typing import Iterator

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_service.errors import SamplerServiceError
from sampler_service.groups import Group
from sampler_service.server import convert
from sampler_service.server.metrics import ServiceMetrics
from sampler_service.server.status import abort, to_rpc_status
from sampler_service.service import SamplerCore
from sampler_service.transport.codec import decode_tensor

log = logging.getLogger(__name__)


class InternalError(SamplerServiceError):
    code = "INTERNAL"


def _unexpected(exc: Exception) -> InternalError:
    log.exception("unexpected error")
    return InternalError(f"internal error: {type(exc).__name__}: {exc}")


def map_errors(method):
    """Turns domain errors into gRPC statuses (counted); any other exception becomes INTERNAL,
    logged."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SamplerServiceError as exc:
            self.metrics.errors.labels(method.__name__, exc.code).inc()
            abort(context, exc)
        except Exception as exc:  # the server must survive any request
            error = _unexpected(exc)
            self.metrics.errors.labels(method.__name__, error.code).inc()
            abort(context, error)
    return wrapper


class SamplerServicer(sampler_pb2_grpc.SamplerServicer):
    def __init__(self, core: SamplerCore, metrics: ServiceMetrics):
        self.core = core
        self.metrics = metrics

    @map_errors
    def CreateSequences(self, request, context):
        states = self.core.create_sequences(
            [convert.sequence_request_from_pb(c) for c in request.sequences])
        for entry in states:
            policy = (entry.root if isinstance(entry, Group) else entry).policy
            self.metrics.observe_created(policy.name, policy.split)
        return pb.CreateSequencesResponse(sequences=[convert.created_pb(s) for s in states])

    @map_errors
    def ReleaseSequences(self, request, context):
        released, missing = self.core.release(list(request.sequence_ids))
        return pb.ReleaseSequencesResponse(released=released, not_found=missing)

    @map_errors
    def GetSequence(self, request, context):
        return self.core.read(request.sequence_id, convert.sequence_info_pb)

    def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        started = time.perf_counter()
        logits = decode_tensor(request.logits, "logits", self.core.device)
        rows = convert.step_rows_from_pb(request.rows)
        reference = (decode_tensor(request.reference_logits, "reference_logits", self.core.device)
                     if request.HasField("reference_logits") else None)
        answers = self.core.step(rows, logits, request.processed_logprobs, reference,
                                 convert.signals_from_pb(request, self.core.device))
        response = pb.StepResponse(request_id=request.request_id)
        for answer in answers:
            convert.answer_pb(response, rows[answer[0]].sequence_id, answer)
        elapsed = time.perf_counter() - started
        response.service_micros = int(elapsed * 1e6)
        self.metrics.step_seconds.observe(elapsed)
        return response

    @map_errors
    def Step(self, request, context):
        return self._step(request)

    def StepStream(self, request_iterator, context) -> Iterator[pb.StepResponse]:
        for request in request_iterator:
            try:
                yield self._step(request)
            except Exception as exc:  # answered in-band; the stream goes on
                error = exc if isinstance(exc, SamplerServiceError) else _unexpected(exc)
                self.metrics.errors.labels("StepStream", error.code).inc()
                yield pb.StepResponse(error=to_rpc_status(error), request_id=request.request_id)

    @map_errors
    def Preview(self, request, context):
        which = request.WhichOneof("policy_source")
        ids, probs = self.core.preview(
            policy=request.policy if which == "policy" else "",
            policy_spec=convert.struct_to_dict(request.policy_spec) if which == "policy_spec" else None,
            params=convert.params_from_pb(request.params),
            logits=decode_tensor(request.logits, "logits", self.core.device),
            history=list(request.history), prompt_ids=list(request.prompt_ids),
            eos_token_ids=list(request.eos_token_ids),
            reference=(decode_tensor(request.reference_logits, "reference_logits", self.core.device)
                       if request.HasField("reference_logits") else None))
        limit = request.max_candidates or len(ids)
        return pb.PreviewResponse(
            candidates=[pb.Candidate(token_id=t, probability=p) for t, p in zip(ids[:limit], probs[:limit])],
            survivors=len(ids))
