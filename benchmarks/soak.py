"""Soak: N concurrent StepStreams for T seconds, sequences created, stepped, killed mid-way
and released continuously, against the service as a process of its own on loopback.

Each of the N stream workers (asyncio tasks over a few `AsyncSamplerClient` channels) loops
for the whole run: it creates a sequence, steps it on its stream a random number of times
(one row of a Zipf-shaped logits row, `--vocab` wide, per step) and ends it one of these ways:
  - complete:      steps to its target, then is released;
  - release-early: a ReleaseSequences is sent while one of its steps is in flight (that step
                   answers either with its token or NOT_FOUND, both expected);
  - cancel-resume: its stream is cancelled while a step is in flight; the step is resent with
                   the same step number on a new stream (the service answers a resend of a
                   committed step with the recorded answer, else chooses it) and it goes on;
  - cancel-kill:   the same cancel, then the sequence is abandoned and released;
  - close-stream:  between two steps its stream is closed (half the time gracefully, half
                   cancelled while idle), and it goes on on a new stream.
Bounded: every stream and sequence is the worker's own (at most N live); each sequence takes at
most `--max-steps` steps; after T seconds the workers finish their sequence and stop, and a
worker still running `--drain` seconds later is cancelled.

Checked and printed (exit status 1 when lost or duplicated steps > 0 or RSS growth >= 5%):
  - total steps (every answered step, warm-up included) and steps/s (over the T seconds after
    the warm-up); every step sent must be accounted for (answered, refused, cancelled or lost);
  - errors by status code, split into expected (the NOT_FOUND of a step racing its release,
    the CANCELLED of a step whose stream the client cancelled) and unexpected;
  - lost steps: a step sent that got neither an answer nor an error within `--step-timeout`
    (or whose stream ended without one), other than those whose stream the client cancelled;
  - duplicated steps: an answer naming a step number the sequence already had answered, or
    another number than the one sent, or a sequence whose `GetSequence` output length (checked
    before release: every cancel-resume / close-stream sequence and a `--check-fraction`
    sample of the complete ones; cancel-kill ones may hold one more, the cancelled step) is not
    the client's count of accepted steps;
  - the service's VmRSS (/proc/PID/status): "start" idle after the warm-up (the same load for
    `--warmup` s, default 30, then drained: long enough for the allocator's high-water mark
    under this load to be reached; after 10 s, 256 streams still added ~10% by the end with no
    growth under load), every 10 s under load, and "end" idle after the T seconds,
    every sequence released and every stream closed; growth = end against start, in %. (Under
    load RSS swings with what is in flight; idle against idle compares like with like.)

    python benchmarks/soak.py [--streams 256] [--seconds 120] [--vocab 32000] [--policy default]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from sampler_client import AsyncSamplerClient
from sampler_client.errors import SamplerError

from common import spawn_service, zipf_logits

MODES = ("complete", "release-early", "cancel-resume", "cancel-kill", "close-stream")
WEIGHTS = (0.55, 0.12, 0.12, 0.08, 0.13)


def rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS) in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Stats:
    sent: int = 0
    answered: int = 0
    accepted: int = 0
    lost: int = 0
    cancelled_by_client: int = 0
    duplicated_step: int = 0
    mismatched_step: int = 0
    length_mismatch: int = 0
    sequences_checked: int = 0
    resends: int = 0
    streams_opened: int = 0
    created: collections.Counter = field(default_factory=collections.Counter)
    expected_errors: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    samples: list = field(default_factory=list)  # first few problems, for the report

    def problem(self, text: str) -> None:
        if len(self.samples) < 10:
            self.samples.append(text)


class Lost(Exception):
    """A step that got no answer: timed out, or its stream ended without one."""


class Tracked:
    """A sequence as the client counts it: its handle, accepted steps and answered step numbers."""

    def __init__(self, handle):
        self.handle = handle
        self.accepted = 0
        self.answered: set[int] = set()


class Worker:
    def __init__(self, index: int, client: AsyncSamplerClient, args, stats: Stats,
                 rows: list[np.ndarray], stop_at: float):
        self.index = index
        self.client = client
        self.args = args
        self.stats = stats
        self.rows = rows
        self.stop_at = stop_at
        self.rng = random.Random(args.seed * 100_003 + index)
        self.stream = None
        self.count = 0

    # -- streams ----------------------------------------------------------------------------
    def _open(self):
        if self.stream is None:
            self.stream = self.client.stream()
            self.stats.streams_opened += 1
        return self.stream

    def _cancel_stream(self) -> None:
        """Ends the stream abruptly: the RPC is cancelled (no half-close)."""
        if self.stream is not None:
            self.stream._call.cancel()  # AsyncStepStream has no public cancel: the raw call
            self.stream = None

    async def _close_stream(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                await asyncio.wait_for(stream.close(), 10)
            except (Exception, asyncio.TimeoutError):
                stream._call.cancel()

    # -- one step ---------------------------------------------------------------------------
    async def _send(self, seq: Tracked):
        """Writes one step of `seq` on the stream and awaits its answer (the raw outcome)."""
        stream = self._open()
        row = self.rows[self.rng.randrange(len(self.rows))]
        try:
            return await asyncio.wait_for(stream.step([seq.handle], row), self.args.step_timeout)
        except asyncio.TimeoutError:
            raise Lost("no answer within --step-timeout") from None
        except AttributeError as error:  # read() gave EOF: the stream ended with no answer
            raise Lost(f"stream ended without an answer ({error})") from None

    def _accept(self, seq: Tracked, sent: int, choices) -> None:
        self.stats.answered += 1
        step = choices[0].step
        if step != sent:
            self.stats.mismatched_step += 1
            self.stats.problem(f"{seq.handle.sequence_id}: sent step {sent}, answer names {step}")
        if step in seq.answered:
            self.stats.duplicated_step += 1
            self.stats.problem(f"{seq.handle.sequence_id}: step {step} answered twice")
        seq.answered.add(step)
        seq.accepted += 1
        self.stats.accepted += 1

    def _error(self, error: SamplerError, expected: bool) -> None:
        self.stats.answered += 1
        (self.stats.expected_errors if expected else self.stats.errors)[error.code.name] += 1
        if not expected:
            self.stats.problem(f"worker {self.index}: {str(error)[:200]}")

    async def step(self, seq: Tracked) -> bool:
        """One plain step; False when it failed (the stream is dropped, the sequence abandoned)."""
        sent = seq.handle.next_step
        self.stats.sent += 1
        try:
            self._accept(seq, sent, await self._send(seq))
            return True
        except Lost as lost:
            self.stats.lost += 1
            self.stats.problem(f"{seq.handle.sequence_id} step {sent}: lost: {lost}")
        except SamplerError as error:
            self._error(error, expected=False)
        self._cancel_stream()
        return False

    async def step_racing(self, seq: Tracked, kill) -> str:
        """One step with `kill` (a coroutine function) run while it is in flight: "answered",
        "refused" (NOT_FOUND after a release), "cancelled" (no answer: its stream was
        cancelled) or "failed"."""
        sent = seq.handle.next_step
        self.stats.sent += 1
        task = asyncio.ensure_future(self._send(seq))
        await asyncio.sleep(self.rng.random() * 0.004)
        cancelled = await kill()
        try:
            choices = await task
        except asyncio.CancelledError:
            if not cancelled:
                raise
            self.stats.cancelled_by_client += 1
            return "cancelled"
        except Lost as lost:
            if cancelled:
                self.stats.cancelled_by_client += 1
                return "cancelled"
            self.stats.lost += 1
            self.stats.problem(f"{seq.handle.sequence_id} step {sent}: lost: {lost}")
            self._cancel_stream()
            return "failed"
        except SamplerError as error:
            if cancelled and error.code == grpc.StatusCode.CANCELLED:
                self.stats.cancelled_by_client += 1
                self.stats.expected_errors["CANCELLED"] += 1
                return "cancelled"
            if not cancelled and error.code == grpc.StatusCode.NOT_FOUND:
                self._error(error, expected=True)
                return "refused"
            self._error(error, expected=False)
            self._cancel_stream()
            return "failed"
        self._accept(seq, sent, choices)
        return "answered"

    # -- one sequence -----------------------------------------------------------------------
    async def check(self, seq: Tracked, slack: int = 0) -> None:
        """GetSequence: its output length must be the accepted steps (+ up to `slack`)."""
        try:
            info = await seq.handle.info()
        except SamplerError as error:
            self._error(error, expected=False)
            return
        self.stats.sequences_checked += 1
        length = len(info.output_ids)
        if not seq.accepted <= length <= seq.accepted + slack:
            self.stats.length_mismatch += 1
            self.stats.problem(f"{seq.handle.sequence_id}: {length} output ids, client accepted "
                               f"{seq.accepted}" + (f" (+{slack} allowed)" if slack else ""))

    async def release(self, seq: Tracked) -> None:
        try:
            await seq.handle.release()
        except SamplerError as error:
            self._error(error, expected=False)

    async def run_sequence(self) -> None:
        args = self.args
        mode = self.rng.choices(MODES, WEIGHTS)[0]
        self.count += 1
        try:
            handle = await self.client.create_sequence(
                policy=args.policy, seed=self.rng.randrange(2**31),
                sequence_id=f"soak-{self.index}-{self.count}",
                prompt_ids=[self.rng.randrange(args.vocab) for _ in range(self.rng.randint(1, 16))])
        except SamplerError as error:
            self._error(error, expected=False)
            await asyncio.sleep(0.1)
            return
        self.stats.created[mode] += 1
        seq = Tracked(handle)
        target = self.rng.randint(args.min_steps, args.max_steps)
        kill_at = self.rng.randint(1, target - 1)
        for position in range(target):
            if position == kill_at and mode != "complete":
                ended = await self.kill(seq, mode)
                if ended:
                    return
                continue
            if not await self.step(seq):
                await self.release(seq)
                return
        if mode in ("cancel-resume", "close-stream") or self.rng.random() < args.check_fraction:
            await self.check(seq)
        await self.release(seq)

    async def kill(self, seq: Tracked, mode: str) -> bool:
        """Kills `seq`'s step or stream mid-way; True when the sequence is over (released)."""
        if mode == "release-early":
            async def release():
                await self.release(seq)
                return False
            await self.step_racing(seq, release)
            return True
        if mode == "close-stream":
            if self.rng.random() < 0.5:
                await self._close_stream()
            else:
                self._cancel_stream()
            if await self.step(seq):
                return False
            await self.release(seq)
            return True
        # cancel-resume / cancel-kill: cancel the stream while a step is in flight
        async def cancel():
            self._cancel_stream()
            return True
        outcome = await self.step_racing(seq, cancel)
        self.stream = None  # cancelled: the next step opens a new stream
        if outcome == "failed":
            await self.release(seq)
            return True
        if mode == "cancel-kill":
            # The cancelled step may or may not have been committed before the cancel.
            await self.check(seq, slack=1 if outcome == "cancelled" else 0)
            await self.release(seq)
            return True
        if outcome == "cancelled":  # resend the same step number on a new stream
            self.stats.resends += 1
            if not await self.step(seq):
                await self.release(seq)
                return True
        return False

    async def run(self) -> None:
        try:
            while time.monotonic() < self.stop_at:
                await self.run_sequence()
        finally:
            await self._close_stream()


async def run_workers(args, clients, stats: Stats, rows, seconds: float, first: int,
                      pid: int, trend: list, marks: dict) -> tuple[list, int]:
    """N workers for `seconds` (RSS sampled every 10 s into `trend`), then drained: the
    exceptions of crashed workers and how many were still running after `--drain` s."""
    stop_at = time.monotonic() + seconds
    workers = [Worker(first + i, clients[i % len(clients)], args, stats, rows, stop_at)
               for i in range(args.streams)]
    tasks = [asyncio.ensure_future(w.run()) for w in workers]
    while time.monotonic() < stop_at - 0.01:
        await asyncio.sleep(min(10.0, stop_at - time.monotonic()))
        trend.append(rss_kib(pid))
    marks.update(accepted=stats.accepted, at=time.monotonic())
    done, pending = await asyncio.wait(tasks, timeout=args.drain)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [t.exception() for t in done if not t.cancelled() and t.exception() is not None], \
        len(pending)


async def soak(args, address: str, pid: int) -> tuple[Stats, dict]:
    """Warm-up (the same load for `--warmup` s, drained), RSS "start" while idle, the measured
    run, RSS at its end (under load), then drained and idle again ("end")."""
    stats = Stats()
    rows = [row.numpy().astype(np.float32) for row in zipf_logits(16, args.vocab, seed=args.seed)]
    clients = [AsyncSamplerClient(address, transport=args.transport)
               for _ in range(args.channels)]
    report: dict = {"trend": []}
    crashed, pending = await run_workers(args, clients, stats, rows, args.warmup, 0, pid, [], {})
    await asyncio.sleep(args.settle)
    report["start"] = rss_kib(pid)
    accepted_from, started = stats.accepted, time.monotonic()
    trend = [report["start"]]
    marks: dict = {}
    crashed2, pending2 = await run_workers(args, clients, stats, rows, args.seconds,
                                           args.streams, pid, trend, marks)
    report["steps_per_s"] = (marks["accepted"] - accepted_from) / (marks["at"] - started)
    report["measured_s"] = marks["at"] - started
    await asyncio.sleep(args.settle)
    report["end"] = rss_kib(pid)
    for client in clients:
        await client.close()
    await asyncio.sleep(args.settle)
    report["end_closed"] = rss_kib(pid)
    report["trend"] = trend
    report["unfinished_workers"] = pending + pending2
    report["crashed_workers"] = crashed + crashed2
    return stats, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=120.0, help="measured time, after warm-up")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--policy", default="default")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS 'start'")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="idle seconds before each idle RSS reading")
    parser.add_argument("--channels", type=int, default=8, help="client channels the streams share")
    parser.add_argument("--transport", default="inline", choices=("inline", "auto", "shm"))
    parser.add_argument("--min-steps", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=64)
    parser.add_argument("--check-fraction", type=float, default=0.25,
                        help="share of completed sequences checked with GetSequence")
    parser.add_argument("--step-timeout", type=float, default=30.0)
    parser.add_argument("--drain", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.min_steps < 2 or args.max_steps < args.min_steps:
        parser.error("need 2 <= --min-steps <= --max-steps")

    service, address = spawn_service()
    try:
        stats, rss = asyncio.run(soak(args, address, service.pid))
        alive = service.poll() is None
    finally:
        service.terminate()
        service.wait()

    duplicated = stats.duplicated_step + stats.mismatched_step + stats.length_mismatch
    growth = (rss["end"] - rss["start"]) / rss["start"] * 100
    mib = lambda kib: f"{kib / 1024:.1f} MiB"
    print(f"\nsoak: {args.streams} StepStreams x {args.seconds:.0f} s (after {args.warmup:.0f} s "
          f"warm-up), 1 x {args.vocab} fp32 row per step, policy {args.policy}, "
          f"transport {args.transport}, {args.channels} channels, loopback")
    print(f"  sequences created      {sum(stats.created.values())} "
          f"({', '.join(f'{m} {stats.created[m]}' for m in MODES)})")
    print(f"  streams opened         {stats.streams_opened}")
    print(f"  steps sent             {stats.sent}")
    print(f"  total steps (answered) {stats.accepted}   ({stats.resends} resent after a cancel)")
    print(f"  steps/s                {rss['steps_per_s']:.0f} (over {rss['measured_s']:.1f} s)")
    print(f"  errors, unexpected     {dict(stats.errors) or 0}")
    print(f"  errors, expected       {dict(stats.expected_errors) or 0} "
          "(NOT_FOUND: step racing its release; CANCELLED: stream cancelled by the client)")
    print(f"  cancelled by client    {stats.cancelled_by_client} steps (no answer expected)")
    unaccounted = (stats.sent - stats.accepted - sum(stats.errors.values())
                   - sum(stats.expected_errors.values()) - stats.lost
                   - (stats.cancelled_by_client - stats.expected_errors["CANCELLED"]))
    print(f"  lost steps             {stats.lost}" +
          (f"  (and {unaccounted} sent steps unaccounted for)" if unaccounted else ""))
    print(f"  duplicated steps       {duplicated} (step answered twice {stats.duplicated_step}, "
          f"other step number {stats.mismatched_step}, output length != accepted "
          f"{stats.length_mismatch} of {stats.sequences_checked} sequences checked)")
    print(f"  service RSS            start {mib(rss['start'])} (idle, after warm-up), end "
          f"{mib(rss['end'])} (idle, every sequence released and stream closed, client channels "
          f"still open): growth {growth:+.2f}%; {mib(rss['end_closed'])} once the client's "
          f"channels closed")
    print(f"  RSS under load         every 10 s: "
          f"{', '.join(f'{k / 1024:.0f}' for k in rss['trend'][1:])} MiB "
          f"(peak {max(rss['trend']) / 1024:.0f} MiB)")
    if rss["unfinished_workers"] or rss["crashed_workers"]:
        print(f"  workers cancelled at drain: {rss['unfinished_workers']}; crashed: "
              f"{[repr(e)[:200] for e in rss['crashed_workers']]}")
    if not alive:
        print("  the service exited during the run")
    for sample in stats.samples:
        print(f"  problem: {sample}")
    failed = (stats.lost > 0 or unaccounted != 0 or duplicated > 0 or growth >= 5.0 or not alive
              or bool(rss["crashed_workers"]))
    print("  result                 " + ("FAIL" if failed else "PASS") +
          " (lost = 0, duplicated = 0, RSS growth < 5%)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
