"""sampler_client.calls: the sync and asyncio drivers run one exchange alike."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import Rpc, run_async, run_sync
from sampler_client.errors import NotFoundError, SamplerError

CLEANED: list[str] = []


def exchange():
    """Calls A (whose NotFoundError it catches), then B; returns both outcomes."""
    try:
        try:
            first = yield Rpc("A", pb.RegionStatusRequest(name="a"))
        except NotFoundError as error:
            first = f"caught {error.message}"
        second = yield Rpc("B", pb.RegionStatusRequest(name="b"))
        return first, second
    finally:
        CLEANED.append("done")


def answer(rpc: Rpc):
    if rpc.method == "A":
        raise NotFoundError(grpc.StatusCode.NOT_FOUND, "no a")
    return f"reply to {rpc.request.name}"


async def answer_async(rpc: Rpc):
    return answer(rpc)


def test_sync_and_async_drivers_give_the_same_result():
    CLEANED.clear()
    assert run_sync(exchange(), answer) == ("caught no a", "reply to b")
    assert asyncio.run(run_async(exchange(), answer_async)) == ("caught no a", "reply to b")
    assert CLEANED == ["done", "done"]


def test_an_error_the_exchange_does_not_catch_reaches_the_caller():
    def refuse(rpc):
        raise SamplerError(grpc.StatusCode.UNAVAILABLE, f"{rpc.method} unreachable")

    with pytest.raises(SamplerError, match="A unreachable"):
        run_sync(exchange(), refuse)


def test_an_interrupted_call_closes_the_exchange():
    """A failure that is no SamplerError (a cancelled task, a KeyboardInterrupt) is not thrown
    in, but the exchange is closed, so its `finally` runs at once."""
    CLEANED.clear()

    async def cancelled(rpc):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run_async(exchange(), cancelled))
    assert CLEANED == ["done"]
