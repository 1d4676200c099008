"""Sans-I/O calls: the SDK's step logic is written once, as generators that yield the RPCs they
need, and run by the synchronous client (`run_sync`) and the asyncio client (`run_async`).

An exchange is a generator that yields `Rpc`s and finally returns its result. The driver
performs each RPC with its own stubs and sends the response back in, or throws the call's
`SamplerError` in (the exchange may catch it: a refused registration, a step to resend). An
exchange may also yield a `Pause` (a wait before trying again), which the driver sleeps
(`time.sleep`, `asyncio.sleep`) before resuming it with None.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, TypeVar

from google.protobuf.message import Message

from sampler_client.errors import SamplerError

T = TypeVar("T")
Exchange = Generator["Rpc | Pause", Any, T]


@dataclass(frozen=True)
class Rpc:
    """One call an exchange needs: `method` is the RPC's name (the Sampler service's "Step",
    "CreateSequences", "ReleaseSequences"; the SharedMemory service's "RegisterSystemRegion",
    "RegisterCudaRegion", "UnregisterRegion", "RegionStatus"; grpc.health.v1's "Check"),
    `request` its request message, `timeout` its deadline in seconds (None: the client's)."""

    method: str
    request: Message
    timeout: float | None = None


@dataclass(frozen=True)
class Pause:
    """A wait of `seconds` the exchange asks of its driver (a backoff before trying again)."""

    seconds: float


def _resume(exchange: Exchange[T], reply: Any, error: SamplerError | None) -> tuple[bool, Any]:
    """Sends the last call's reply (or throws its error) in: (True, the exchange's result) when
    it finished, else (False, the next Rpc)."""
    try:
        return False, exchange.send(reply) if error is None else exchange.throw(error)
    except StopIteration as done:
        return True, done.value


def run_sync(exchange: Exchange[T], perform: Callable[[Rpc], Any]) -> T:
    """Runs an exchange to its result; `perform` makes one call or raises its SamplerError;
    a Pause sleeps."""
    try:
        reply, error = None, None
        while True:
            finished, value = _resume(exchange, reply, error)
            if finished:
                return value
            if isinstance(value, Pause):
                time.sleep(value.seconds)
                reply, error = None, None
                continue
            try:
                reply, error = perform(value), None
            except SamplerError as failure:
                reply, error = None, failure
    finally:
        exchange.close()  # an exchange left mid-call (interrupted, cancelled) cleans up


async def run_async(exchange: Exchange[T], perform: Callable[[Rpc], Awaitable[Any]]) -> T:
    """`run_sync` for the asyncio client: `perform` is awaited."""
    try:
        reply, error = None, None
        while True:
            finished, value = _resume(exchange, reply, error)
            if finished:
                return value
            if isinstance(value, Pause):
                await asyncio.sleep(value.seconds)
                reply, error = None, None
                continue
            try:
                reply, error = await perform(value), None
            except SamplerError as failure:
                reply, error = None, failure
    finally:
        exchange.close()
