"""EngineExecutor: one worker that knows whether it is idle."""
from __future__ import annotations

import threading

from sampler_service.server.engine_thread import EngineExecutor


def test_idle_only_when_nothing_submitted_waits_or_runs():
    started, release = threading.Event(), threading.Event()
    executor = EngineExecutor()
    try:
        assert executor.idle
        running = executor.submit(lambda: (started.set(), release.wait(10)))
        queued = executor.submit(lambda: threading.current_thread().name)
        seen = threading.Event()  # a callback added later runs later, as asyncio's does
        queued.add_done_callback(lambda _: seen.set())
        started.wait(10)
        assert not executor.idle
        release.set()
        running.result(10)
        assert queued.result(10).startswith("sampler-engine")
        assert seen.wait(10) and executor.idle
    finally:
        executor.shutdown()


def test_a_failing_call_is_counted_off_too():
    executor = EngineExecutor()
    try:
        failed, seen = executor.submit(lambda: 1 / 0), threading.Event()
        failed.add_done_callback(lambda _: seen.set())
        assert isinstance(failed.exception(10), ZeroDivisionError)
        assert seen.wait(10) and executor.idle
    finally:
        executor.shutdown()
