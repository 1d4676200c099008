"""The engine's thread: a one-worker executor that knows whether it is idle.

Every call that reads or changes sequences or the engine runs here, one at a time. The
micro-batcher may instead run a small step batch on the event loop itself while this thread
is idle (`StepBatcher`'s `inline`): the hop to this thread and back costs ~0.2 ms, more than
half of a one-row step's own work. Only the event loop submits work here, so a thread found
idle by the loop stays idle until the loop submits again.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class EngineExecutor(ThreadPoolExecutor):
    """`ThreadPoolExecutor(max_workers=1)` whose `idle` says that nothing it was given is
    waiting or running."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="sampler-engine")
        self._unfinished = 0
        self._count_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._count_lock:
            self._unfinished += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        # registered before any other callback (asyncio's): counted off once `fn` returned
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future | None) -> None:
        with self._count_lock:
            self._unfinished -= 1

    @property
    def idle(self) -> bool:
        """Nothing submitted is waiting or running."""
        return self._unfinished == 0
