"""SDK exceptions: one class per gRPC status the service uses, with the offending fields."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class SamplerError(Exception):
    """A call failed. `code` is the grpc.StatusCode, `field_violations` name bad fields."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 field_violations: tuple[FieldViolation, ...] = ()):
        fields = ", ".join(v.field for v in field_violations)
        super().__init__(f"{code.name}: {message}" + (f" (field: {fields})" if fields else ""))
        self.code = code
        self.message = message
        self.field_violations = field_violations

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.field_violations]


class InvalidArgumentError(SamplerError): ...
class NotFoundError(SamplerError): ...
class AlreadyExistsError(SamplerError): ...
class FailedPreconditionError(SamplerError): ...
class ResourceExhaustedError(SamplerError): ...
class UnavailableError(SamplerError): ...
class UnauthenticatedError(SamplerError): ...
class PermissionDeniedError(SamplerError): ...


class MessageTooLargeError(ResourceExhaustedError):
    """A request the client refused to send: `size` bytes, over the channel's max send size
    `limit` (the client's `max_message_bytes`). Nothing was sent: on a StepStream the stream
    and every sequence on it go on (gRPC would have ended the whole stream)."""

    def __init__(self, size: int, limit: int, what: str = "StepRequest"):
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} of {size} bytes exceeds the client's max send size of {limit} bytes "
            "(max_message_bytes); it was not sent. Send the logits through shared memory "
            "(transport='shm', or 'auto' to a local service) or as sparse rows "
            "(sparse_top_k=K), send fewer rows per step, or raise max_message_bytes (with "
            "the service's --max-message-bytes)")
        self.size = size
        self.limit = limit


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def from_status(status: status_pb2.Status) -> SamplerError:
    """The exception for a google.rpc.Status (as carried in-band by StepStream)."""
    code = _CODE_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN)
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return _BY_CODE.get(code, SamplerError)(code, status.message, tuple(violations))


def from_rpc_error(error: grpc.RpcError) -> SamplerError:
    """The exception for a failed call (sync or aio)."""
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    if status is not None:
        return from_status(status)
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _BY_CODE.get(code, SamplerError)(code, details or "")
