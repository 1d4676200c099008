"""Sans-I/O calls: the SDK's step logic is written once, as generators that yield the RPCs they
need, and run by the synchronous client (`run_sync`) and the asyncio client (`run_async`).

An exchange is a generator that yields `Rpc`s and finally returns its result. The driver
performs each RPC with its own stubs and sends the response back in, or throws the call's
`SamplerError` in (the exchange may catch it: a refused registration, a step to resend).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, TypeVar

from google.protobuf.message import Message

from sampler_client.errors import SamplerError

T = TypeVar("T")
Exchange = Generator["Rpc", Any, T]


@dataclass(frozen=True)
class Rpc:
    """One call an exchange needs: `method` is the RPC's name ("Step", or one of the
    SharedMemory service's: "RegisterSystemRegion", "RegisterCudaRegion", "UnregisterRegion",
    "RegionStatus"), `request` its request message."""

    method: str
    request: Message


def _resume(exchange: Exchange[T], reply: Any, error: SamplerError | None) -> tuple[bool, Any]:
    """Sends the last call's reply (or throws its error) in: (True, the exchange's result) when
    it finished, else (False, the next Rpc)."""
    try:
        return False, exchange.send(reply) if error is None else exchange.throw(error)
    except StopIteration as done:
        return True, done.value


def run_sync(exchange: Exchange[T], perform: Callable[[Rpc], Any]) -> T:
    """Runs an exchange to its result; `perform` makes one call or raises its SamplerError."""
    try:
        reply, error = None, None
        while True:
            finished, value = _resume(exchange, reply, error)
            if finished:
                return value
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
            try:
                reply, error = await perform(value), None
            except SamplerError as failure:
                reply, error = None, failure
    finally:
        exchange.close()
