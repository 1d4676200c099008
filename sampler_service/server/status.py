"""Maps domain errors to google.rpc.Status with BadRequest field violations."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sampler_service.errors import SamplerServiceError


def to_rpc_status(error: SamplerServiceError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error; its violations (field, description) go into
    one BadRequest detail, in order."""
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message)
    if error.violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in error.violations]))
        status.details.append(detail)
    return status


def abort(context: grpc.ServicerContext, error: SamplerServiceError):
    """Ends the RPC with the error's status (raises, as `context.abort` does)."""
    context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))
