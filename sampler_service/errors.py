"""Domain errors of the service, independent of gRPC.

The core raises these; the gRPC edge (`sampler_service.server.status`) maps each to its status
code and a google.rpc.BadRequest with one field violation per offending field.
"""
from __future__ import annotations


def _prefixed(prefix: str, field: str | None) -> str:
    return f"{prefix}.{field}" if field else prefix


class SamplerServiceError(Exception):
    """Base class. `field` names the offending request field where there is one;
    `violations` lists (field, description) of every offending field (default: `field` with
    the message), for errors that report several at once (e.g. every sparse row refused)."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None,
                 violations: tuple[tuple[str, str], ...] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.violations = violations if violations is not None else (
            ((field, message),) if field else ())

    def with_field_prefix(self, prefix: str) -> "SamplerServiceError":
        """The same error with `prefix` prepended to its field paths (e.g. `sequences[2].`)."""
        violations = tuple((_prefixed(prefix, f), d) for f, d in self.violations)
        return type(self)(self.message, _prefixed(prefix, self.field), violations or None)


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
