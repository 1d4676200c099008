"""Domain errors of the service, independent of gRPC.

The core raises these; the gRPC edge (`sampler_service.server.status`) maps each to its status
code and, for invalid arguments, a google.rpc.BadRequest field violation naming the field.
"""
from __future__ import annotations


class SamplerServiceError(Exception):
    """Base class. `field` names the offending request field where there is one."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def with_field_prefix(self, prefix: str) -> "SamplerServiceError":
        """The same error with `prefix` prepended to its field path (e.g. `sequences[2].`)."""
        field = f"{prefix}.{self.field}" if self.field else prefix
        return type(self)(self.message, field)


class InvalidArgument(SamplerServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(SamplerServiceError):
    code = "NOT_FOUND"


class AlreadyExists(SamplerServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SamplerServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(SamplerServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(SamplerServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(SamplerServiceError):
    code = "PERMISSION_DENIED"
