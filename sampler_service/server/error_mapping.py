"""Turns domain errors raised by grpc.aio servicer methods into gRPC statuses (counted).

A `SamplerServiceError` ends the call with its status (and a BadRequest detail naming the
field); any other exception is logged and becomes INTERNAL, so a request can never take the
server down. Every error leaves `clipped` (`SamplerServiceError.clipped`): a status whose
message repeats a long id or name would otherwise pass the callers' metadata limit and reach
them as RESOURCE_EXHAUSTED. The servicer must have a `metrics` attribute (`ServiceMetrics`).
"""
from __future__ import annotations

import functools
import logging

import grpc
from grpc_status import rpc_status

from sampler_service.errors import SamplerServiceError
from sampler_service.server.status import to_rpc_status

log = logging.getLogger(__name__)


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


def map_errors(method):
    """Decorates an `async def` unary servicer method (see the module docstring)."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:  # the method ended the call itself
            raise
        except Exception as exc:  # the server must survive any request
            error = as_service_error(exc)
            self.metrics.errors.labels(method.__name__, error.code).inc()
            await abort(context, error)
    return wrapper
