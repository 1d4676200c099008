"""Micro-batching: step requests of concurrent callers run as one engine call.

Callers (unary `Step` calls and `StepStream` messages, from any number of workers) `submit`
their requests on the event loop. One task feeds the engine's executor: whenever the engine
is free it takes the waiting requests, in arrival order, up to `max_rows` rows (a single
larger request runs alone), and runs them as one batch. Requests that arrive while the
engine is busy therefore join the next batch. When the engine is idle, the first request
waits up to `window_s` for others, but only while some caller that is not yet waiting may
still send (an open stream or call that has nothing queued): a lone caller never waits.
Two requests that step the same sequence never share a batch (the later one waits for the
next), so each sees the other's effect exactly as if they had come one after the other.

Each caller gets exactly its own result; `run` returns one result (or exception) per request,
so a bad request fails alone. `on_batch`, when set, is called with the rows of each batch as
it goes to the engine (the `sampler_batch_rows` histogram).

`inline`, when set, picks batches that run on the event loop itself instead of the executor
(the server's: a small CPU batch while the engine thread is idle, `StepRunner.runs_inline`):
the hop to the executor and back costs more than such a batch's own work. A lone caller's
request that would be taken at once (nothing queued, no batch running, no other caller that
could join it) runs inline straight from `submit`, without a turn of the feed task.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from sampler_service.errors import detached

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    rows: int
    keys: frozenset[str]
    future: asyncio.Future
    #: Called once the item was run (or dropped at close), even if its caller went away.
    release: Callable[[], None] | None = None
    arrived: float = field(default_factory=time.perf_counter)

    def done(self, result: Any) -> None:
        if self.release is not None:
            self.release()
        if not self.future.done():  # the caller may have gone away
            self.future.set_result(result)


class StepBatcher(Generic[Item]):
    """Feeds `run(items) -> results` (called in `executor`) with batches of submitted items."""

    def __init__(self, run: Callable[[Sequence[Item]], Sequence[Any]], executor: Executor,
                 window_s: float = 200e-6, max_rows: int = 256,
                 on_batch: Callable[[int], None] | None = None,
                 inline: Callable[[Sequence[Item]], bool] | None = None):
        if max_rows < 1:
            raise ValueError("--max-batch-rows must be at least 1")
        if window_s < 0:
            raise ValueError("--batch-window-us must be >= 0")
        self._run = run
        self._executor = executor
        self.window_s = window_s
        self.max_rows = max_rows
        self._queue: deque[_Pending[Item]] = deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None
        #: Callers that may send a request now or soon: open streams and calls in flight.
        self.callers = 0
        #: Batches run and requests answered (for tests and metrics).
        self.batches = 0
        self.requests = 0
        #: Called with the rows of each batch before it runs (metrics); None: nothing.
        self.on_batch = on_batch
        #: Whether a batch (its items) runs on the event loop; None: never.
        self.inline = inline
        #: A batch is in the executor (the feed task awaits it).
        self._running = False

    @contextlib.contextmanager
    def caller(self) -> Iterator[None]:
        """Counts a stream or call as a caller that may submit while it is open."""
        self.callers += 1
        try:
            yield
        finally:
            self.callers -= 1

    async def submit(self, item: Item, rows: int, keys: frozenset[str],
                     release: Callable[[], None] | None = None) -> Any:
        """Queues `item` (`rows` rows of sequences `keys`) and returns its result. `release`
        is called once the item has run, whether or not its caller still waits: what the
        item reads (a shared-memory region) must outlive a caller that went away."""
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, rows, keys, future, release)
        if (self.inline is not None and not self._queue and not self._running
                and self.callers <= 1 and self.inline([item])):
            self._finish([pending], self._run_inline([pending], [item]))
            return future.result()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._feed())
        self._queue.append(pending)
        self._arrival.set()
        return await future

    async def close(self) -> None:
        """Stops feeding; requests still queued get CancelledError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pending in self._queue:
            pending.future.cancel()
            pending.done(None)
        self._queue.clear()

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            await self._wait_for_others()
            batch = self._take()
            items = [p.item for p in batch]
            if self.inline is not None and self.inline(items):
                self._finish(batch, self._run_inline(batch, items))
                await asyncio.sleep(0)  # the loop's other work (health, arrivals) goes first
                continue
            self._observe(batch)
            self._running = True
            try:
                results = await loop.run_in_executor(self._executor, self._run, items)
            except Exception as exc:  # `run` answers per item; this is a bug: fail the batch
                results = self._failed(batch, exc)
            finally:
                self._running = False
            self._finish(batch, results)

    def _run_inline(self, batch: list[_Pending[Item]], items: list[Item]) -> Sequence[Any]:
        """Runs `batch` (its `items`) on the event loop, now."""
        self._observe(batch)
        try:
            return self._run(items)
        except Exception as exc:
            return self._failed(batch, exc)

    @staticmethod
    def _failed(batch: list[_Pending[Item]], exc: Exception) -> list[Exception]:
        """Every item's result when `run` raised: it answers per item, so this is a bug."""
        log.exception("a step batch failed as a whole")
        return [detached(exc)] * len(batch)

    def _observe(self, batch: list[_Pending[Item]]) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(sum(p.rows for p in batch))
            except Exception:  # an observer must never stop the feed
                log.exception("the batch observer failed")

    def _finish(self, batch: list[_Pending[Item]], results: Sequence[Any]) -> None:
        self.batches += 1
        self.requests += len(batch)
        for pending, result in zip(batch, results):
            pending.done(result)

    async def _wait_for_others(self) -> None:
        """Waits up to the window while a caller with nothing queued may still send."""
        deadline = self._queue[0].arrived + self.window_s
        while len(self._queue) < self.callers and self._queued_rows() < self.max_rows:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), remaining)

    def _queued_rows(self) -> int:
        return sum(p.rows for p in self._queue)

    def _take(self) -> list[_Pending[Item]]:
        """The first request, then later ones in order while rows fit and no sequence repeats."""
        first = self._queue.popleft()
        batch, rows, keys, waiting = [first], first.rows, set(first.keys), deque()
        while self._queue:
            pending = self._queue.popleft()
            if rows + pending.rows <= self.max_rows and keys.isdisjoint(pending.keys):
                batch.append(pending)
                rows += pending.rows
                keys |= pending.keys
            else:
                waiting.append(pending)
        self._queue = waiting
        return batch
