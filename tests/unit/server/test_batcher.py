"""StepBatcher on a real event loop and executor, with a `run` that records its batches."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sampler_service.server.batcher import StepBatcher


class Recorder:
    """A `run` that answers item * 10 (or raises for "boom") and remembers each batch."""

    def __init__(self):
        self.batches: list[list] = []
        self.threads: list[str] = []  # the thread each batch ran on

    def __call__(self, items):
        self.batches.append(list(items))
        self.threads.append(threading.current_thread().name)
        if "boom" in items:
            raise RuntimeError("boom")
        return [ValueError(item) if item == "bad" else item * 10 for item in items]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_a_lone_caller_does_not_wait_for_the_window(executor):
    recorder = Recorder()

    async def main():
        batcher = StepBatcher(recorder, executor, window_s=60.0)
        with batcher.caller():
            answer = await batcher.submit(3, 1, frozenset({"a"}))
        await batcher.close()
        return answer

    assert run(main()) == 30
    assert recorder.batches == [[3]]


def test_callers_that_may_still_send_are_waited_for(executor):
    recorder = Recorder()

    async def main():
        batcher = StepBatcher(recorder, executor, window_s=60.0)

        async def caller(item, delay):
            with batcher.caller():
                await asyncio.sleep(delay)
                return await batcher.submit(item, 1, frozenset({str(item)}))

        answers = await asyncio.gather(caller(1, 0.0), caller(2, 0.05), caller(3, 0.1))
        await batcher.close()
        return answers

    assert run(main()) == [10, 20, 30]
    assert recorder.batches == [[1, 2, 3]]


def test_rows_and_sequences_split_batches(executor):
    recorder = Recorder()

    async def main():
        batcher = StepBatcher(recorder, executor, window_s=60.0, max_rows=4)
        with batcher.caller(), batcher.caller(), batcher.caller(), batcher.caller():
            return await asyncio.gather(
                batcher.submit(1, 3, frozenset({"a"})),
                batcher.submit(2, 1, frozenset({"a"})),   # same sequence as 1: next batch
                batcher.submit(3, 1, frozenset({"b"})),   # fits beside 1
                batcher.submit(4, 9, frozenset({"c"})))   # larger than max_rows: alone

    assert run(main()) == [10, 20, 30, 40]
    assert recorder.batches == [[1, 3], [2], [4]]


def test_each_caller_gets_its_own_result_or_error(executor):
    async def main():
        batcher = StepBatcher(Recorder(), executor, window_s=0)
        return await asyncio.gather(batcher.submit("bad", 1, frozenset({"x"})),
                                    batcher.submit(5, 1, frozenset({"y"})))

    bad, good = run(main())
    assert isinstance(bad, ValueError) and good == 50


def test_a_failing_run_fails_its_batch_and_the_batcher_goes_on(executor):
    async def main():
        batcher = StepBatcher(Recorder(), executor, window_s=0)
        failed = await batcher.submit("boom", 1, frozenset({"x"}))
        return failed, await batcher.submit(2, 1, frozenset({"x"}))

    failed, answer = run(main())
    assert isinstance(failed, RuntimeError) and answer == 20


@pytest.mark.parametrize("window, rows", [(-1.0, 1), (0.0, 0)])
def test_bad_settings_are_refused(executor, window, rows):
    with pytest.raises(ValueError):
        StepBatcher(Recorder(), executor, window_s=window, max_rows=rows)


def test_inline_batches_run_on_the_event_loop_and_others_in_the_executor(executor):
    recorder = Recorder()

    async def main():
        batcher = StepBatcher(recorder, executor, window_s=60.0,
                              inline=lambda items: all(item < 5 for item in items))
        with batcher.caller():
            small = await batcher.submit(3, 1, frozenset({"a"}))   # lone caller: from submit
            large = await batcher.submit(7, 1, frozenset({"a"}))
        with batcher.caller(), batcher.caller():  # two callers: through the feed task
            both = await asyncio.gather(batcher.submit(1, 1, frozenset({"a"})),
                                        batcher.submit(2, 1, frozenset({"b"})))
        await batcher.close()
        return small, large, both, threading.current_thread().name

    small, large, both, loop_thread = run(main())
    assert (small, large, both) == (30, 70, [10, 20])
    assert recorder.batches == [[3], [7], [1, 2]]
    executor_thread = recorder.threads[1]
    assert recorder.threads == [loop_thread, executor_thread, loop_thread]
    assert executor_thread != loop_thread


def test_a_lone_request_waits_for_the_batch_in_the_executor(executor):
    """While a batch runs in the executor, a request that could run inline queues behind it
    (the engine runs one batch at a time)."""
    recorder, release = Recorder(), threading.Event()

    def slow(items):
        if items == [7]:
            release.wait(10)
        return recorder(items)

    async def main():
        batcher = StepBatcher(slow, executor, window_s=0, inline=lambda items: items != [7])
        with batcher.caller():
            first = asyncio.ensure_future(batcher.submit(7, 1, frozenset({"a"})))
            await asyncio.sleep(0.05)  # 7 is in the executor now
            second = asyncio.ensure_future(batcher.submit(3, 1, frozenset({"b"})))
            await asyncio.sleep(0.05)
            assert not second.done()
            release.set()
            answers = await asyncio.gather(first, second)
        await batcher.close()
        return answers

    assert run(main()) == [70, 30]
    assert recorder.batches == [[7], [3]]


def test_a_failing_inline_run_fails_its_batch_and_the_batcher_goes_on(executor):
    async def main():
        batcher = StepBatcher(Recorder(), executor, window_s=0, inline=lambda items: True)
        failed = await batcher.submit("boom", 1, frozenset({"x"}))
        return failed, await batcher.submit(2, 1, frozenset({"x"}))

    failed, answer = run(main())
    assert isinstance(failed, RuntimeError) and answer == 20


def test_the_loop_runs_other_work_between_inline_batches(executor):
    """Queued requests run inline one batch at a time, each followed by a turn of the loop,
    so health checks and arrivals never wait behind a whole queue."""
    log = []

    def run_batch(items):
        log.append(tuple(items))
        return [item * 10 for item in items]

    async def main():
        batcher = StepBatcher(run_batch, executor, window_s=0, max_rows=1,
                              inline=lambda items: True)
        ticking = True

        async def ticker():
            while ticking:
                log.append("tick")
                await asyncio.sleep(0)

        with batcher.caller(), batcher.caller(), batcher.caller():
            tick = asyncio.ensure_future(ticker())
            answers = await asyncio.gather(*(batcher.submit(i, 1, frozenset({str(i)}))
                                             for i in (1, 2, 3)))
            ticking = False
            await tick
        await batcher.close()
        return answers

    assert run(main()) == [10, 20, 30]
    batches = [i for i, entry in enumerate(log) if entry != "tick"]
    assert len(batches) == 3
    assert all(log[i + 1] == "tick" for i in batches[:-1])  # a turn of the loop after each
