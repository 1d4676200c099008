"""Domain errors of the service, independent of gRPC.

The core raises these; the gRPC edge (`sampler_service.server.status`) maps each to its status
code and a google.rpc.BadRequest with one field violation per offending field.

A message repeats what the caller sent (an id, a name, a key, a value) through `echo`, which
keeps the first `ECHO_CHARS` characters of a long one. The edge sends every error `clipped`:
a status travels in the response's trailers, which gRPC clients cap (8 KiB soft, 16 KiB hard
by default); a longer one would reach the caller as RESOURCE_EXHAUSTED instead of its status.
"""
from __future__ import annotations

import copy
import reprlib
import traceback
from typing import Any, TypeVar

E = TypeVar("E", bound=BaseException)

#: Characters of a caller's value an error message repeats (`echo`).
ECHO_CHARS = 64
#: UTF-8 bytes of an error's message, and of each violation's description, as sent
#: (`SamplerServiceError.clipped`): the message travels twice in the trailers (grpc-message,
#: percent-encoded, and the status details), so one error stays well inside 8 KiB.
MAX_MESSAGE_BYTES = 1024
#: UTF-8 bytes of each violation's field path, as sent.
MAX_FIELD_BYTES = 256

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = ECHO_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """`repr(value)` for an error message, bounded: a string longer than `limit` characters
    shows its first `limit` and its length (`'abc…'…(20000 chars)`); any other value shows
    a bounded repr (at most 8 items a level, `limit` characters)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}…({len(value)} chars)"
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…"


def clip(text: str, limit: int) -> str:
    """`text` if its UTF-8 form fits `limit` bytes; else its start and its end around a
    marker saying how long it was, within `limit` bytes."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    marker = f" …({len(text)} chars)… "
    keep = max(limit - len(marker.encode()), 0)
    head = data[:keep - keep // 4].decode("utf-8", "ignore")
    tail = data[len(data) - keep // 4:].decode("utf-8", "ignore") if keep // 4 else ""
    return head + marker + tail


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

    def clipped(self) -> "SamplerServiceError":
        """The error as the edge sends it: itself, or where its message, a description or a
        field is too long for a status (`MAX_MESSAGE_BYTES`, `MAX_FIELD_BYTES`), a copy of
        the same type with each clipped (start and end kept, see `clip`)."""
        message = clip(self.message, MAX_MESSAGE_BYTES)
        violations = tuple((clip(f, MAX_FIELD_BYTES), clip(d, MAX_MESSAGE_BYTES))
                           for f, d in self.violations)
        if message == self.message and violations == self.violations and (
                self.field is None or len(self.field.encode()) <= MAX_FIELD_BYTES):
            return self
        error = copy.copy(self)
        error.args = (message,)
        error.message = message
        error.field = None if self.field is None else clip(self.field, MAX_FIELD_BYTES)
        error.violations = violations
        return error


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


class DeadlineExceeded(SamplerServiceError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(SamplerServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(SamplerServiceError):
    code = "PERMISSION_DENIED"


def detached(exc: E) -> E:
    """`exc`, to be handed back as a value (one request's answer in a batch) rather than
    raised on: its traceback, and those of the exceptions it chains, dropped. A traceback keeps
    the frames it passed through alive, and theirs hold the whole batch (every request's
    logits and the batch buffer); the exception, stored in the batch's list of results that
    one of those frames holds, closes a cycle that only the cyclic garbage collector frees,
    late (the soak grew the service by gigabytes). A domain error needs no traceback; any
    other exception (a bug) keeps its traceback as text, in a note that logs print."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            if not isinstance(current, SamplerServiceError):
                current.add_note("".join(traceback.format_tb(current.__traceback__)).rstrip())
            current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return exc
