"""Turns domain errors raised by grpc.aio servicer methods into gRPC statuses, and counts and
logs every request's outcome.

A `SamplerServiceError` ends the call with its status (and a BadRequest detail naming the
field); any other exception is logged and becomes INTERNAL, so a request can never take the
server down. Every error leaves `clipped` (`SamplerServiceError.clipped`): a status whose
message repeats a long id or name would otherwise pass the callers' metadata limit and reach
them as RESOURCE_EXHAUSTED. The servicer must have a `metrics` attribute (`ServiceMetrics`).

`map_errors` also keeps the request metrics: `sampler_inflight_requests` while the call runs,
and one `sampler_rpc_total{method, code}` when it ends, OK included. Each failed request is
logged once (`request_failed`) on the logger `sampler_service.requests`, with the method, the
code, the field at fault and the sequence when the request names one, as `extra` fields of the
record (a JSON log formatter renders them): at INFO for what the caller got wrong
(`CALLER_CODES`: bad arguments, unknown ids, preconditions, a cancelled call), at WARNING for
everything else (refused credentials, exhausted limits, deadlines, internal errors).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re

import grpc
from grpc_status import rpc_status

from sampler_service.errors import MAX_FIELD_BYTES, SamplerServiceError, clip
from sampler_service.server.status import to_rpc_status

log = logging.getLogger(__name__)
#: One record per failed request (`record_failure`).
requests_log = logging.getLogger("sampler_service.requests")

#: Codes of requests the caller got wrong: logged at INFO, every other failure at WARNING.
CALLER_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS",
                          "FAILED_PRECONDITION", "OUT_OF_RANGE", "CANCELLED"})
_INDEXED = re.compile(r"^(rows|sequences)\[(\d+)\]")


class InternalError(SamplerServiceError):
    code = "INTERNAL"


def unexpected(exc: BaseException) -> InternalError:
    """An unexpected exception as an INTERNAL error, logged with its traceback."""
    log.error("unexpected error", exc_info=exc)
    return InternalError(f"internal error: {type(exc).__name__}: {exc}")


def as_service_error(exc: BaseException) -> SamplerServiceError:
    """The domain error itself, or an INTERNAL one for anything else, clipped to what a
    status may carry (StepStream sends it in-band, the unary calls by `abort`)."""
    error = exc if isinstance(exc, SamplerServiceError) else unexpected(exc)
    return error.clipped()


async def abort(context: grpc.aio.ServicerContext, error: SamplerServiceError):
    """Ends the RPC with the error's status, clipped (raises, as `context.abort` does)."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error.clipped())))


def sequence_of(request, field: str | None) -> str | None:
    """The sequence a failed request concerns, where it says: the one its field's row or
    sequence entry names (`rows[2].logits`, `sequences[0].policy`), the request's own
    `sequence_id`, or the one sequence all its rows step; None otherwise. A long id is
    clipped as error fields are (`MAX_FIELD_BYTES`)."""
    found = _sequence_of(request, field)
    return None if not found else clip(found, MAX_FIELD_BYTES)


def _sequence_of(request, field: str | None) -> str | None:
    if request is None:
        return None
    fields = request.DESCRIPTOR.fields_by_name
    match = _INDEXED.match(field or "")
    if match and match.group(1) in fields:
        entries, index = getattr(request, match.group(1)), int(match.group(2))
        if index < len(entries) and "sequence_id" in entries[index].DESCRIPTOR.fields_by_name:
            return entries[index].sequence_id or None
    if "sequence_id" in fields:
        return request.sequence_id or None
    if "rows" in fields:
        ids = {row.sequence_id for row in request.rows}
        if len(ids) == 1:
            return ids.pop() or None
    return None


def record_failure(metrics, method: str, error: SamplerServiceError, request=None) -> None:
    """Counts a failed request of `method` and logs it once (see the module docstring)."""
    metrics.observe_rpc(method, error.code)
    _log_failure(method, error.code, error.field, sequence_of(request, error.field),
                 error.message)


def _log_failure(method: str, code: str, field: str | None, sequence_id: str | None,
                 message: str) -> None:
    level = logging.INFO if code in CALLER_CODES else logging.WARNING
    requests_log.log(level, "%s failed: %s%s: %s", method, code,
                     f" (field {field})" if field else "", message,
                     extra={"event": "request_failed", "method": method, "code": code,
                            "field": field, "sequence_id": sequence_id})


def _code_name(context) -> str:
    """The status code a method that aborted the call itself set, by name."""
    try:
        code = context.code()
    except Exception:  # an older grpc without ServicerContext.code()
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def map_errors(method):
    """Decorates an `async def` unary servicer method (see the module docstring)."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, request, context):
        metrics = self.metrics
        metrics.inflight.inc()
        try:
            response = await method(self, request, context)
        except grpc.aio.AbortError:  # the method ended the call itself
            code = _code_name(context)
            metrics.observe_rpc(name, code)
            _log_failure(name, code, None, sequence_of(request, None), "aborted by the method")
            raise
        except asyncio.CancelledError:  # the client went away or its deadline passed
            metrics.observe_rpc(name, "CANCELLED")
            _log_failure(name, "CANCELLED", None, sequence_of(request, None),
                         "the call was cancelled")
            raise
        except Exception as exc:  # the server must survive any request
            error = as_service_error(exc)
            record_failure(metrics, name, error, request)
            await abort(context, error)
        else:
            metrics.observe_rpc(name, "OK")
            return response
        finally:
            metrics.inflight.dec()
    return wrapper
