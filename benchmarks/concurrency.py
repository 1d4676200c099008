"""Many callers at once: 64 concurrent StepStreams of one row each, with micro-batching
against the same service with it off, plus health latency under load and idle streams.

Each service runs as a process of its own (as in a pod); the callers are 64 threads of this
process, or 4 processes of 16 threads. Printed, all measured in this run:
  - total steps/s with micro-batching (defaults) and without (`--batch-window-us 0
    --max-batch-rows 1`), and their ratio;
  - health check latency (p50 / max) while the batched run is going on;
  - how long a CreateSequences takes while 1024 idle streams are open.

    python benchmarks/concurrency.py [--streams 64] [--vocab 49152] [--seconds 4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sampler_client import SamplerClient

from common import spawn_service


def stream_worker(address: str, seed: int, vocab: int, policy: str, start: float,
                  stop: float, counts: list, index: int) -> None:
    """One stream stepping one sequence until `stop` (perf_counter); counts its steps."""
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed))
    with SamplerClient(address) as client:
        sequence = client.create_sequence(policy=policy, seed=seed)
        with client.stream() as stream:
            stream.step([sequence], logits)  # connected and warm
            while time.perf_counter() < start:
                time.sleep(0.001)
            steps = 0
            while time.perf_counter() < stop:
                sequence.next_step = None  # a new step each time, whatever the finish
                stream.step([sequence], logits)
                steps += 1
        counts[index] = steps
        client.release([sequence])


def run_threads(address: str, threads: int, seed0: int, vocab: int, policy: str,
                start: float, stop: float) -> int:
    counts = [0] * threads
    workers = [threading.Thread(target=stream_worker, args=(address, seed0 + i, vocab, policy,
                                                            start, stop, counts, i))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts)


def _process_entry(args) -> int:
    return run_threads(*args)


def steps_per_second(address: str, streams: int, processes: int, vocab: int, policy: str,
                     seconds: float) -> float:
    start = time.perf_counter() + 2.0  # every stream open and warm before the clock starts
    stop = start + seconds
    if processes == 1:
        total = run_threads(address, streams, 0, vocab, policy, start, stop)
    else:
        per = streams // processes
        # perf_counter is CLOCK_MONOTONIC on Linux: the same clock in every process.
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            total = sum(pool.map(_process_entry, [(address, per, i * per, vocab, policy, start, stop)
                                                  for i in range(processes)]))
    return total / seconds


def health_latencies(address: str, until: float) -> list[float]:
    latencies = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        while time.perf_counter() < until:
            started = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append((time.perf_counter() - started) * 1e3)
            time.sleep(0.05)
    return latencies


def idle_streams_create_ms(address: str, idle: int) -> float:
    with SamplerClient(address) as client:
        streams = [client.stream() for _ in range(idle)]
        time.sleep(1.0)
        started = time.perf_counter()
        client.create_sequence(policy="greedy")
        elapsed = (time.perf_counter() - started) * 1e3
        for stream in streams:
            stream.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--policy", default="greedy")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for label, extra in (("micro-batching (defaults)", []),
                         ("no batching (--batch-window-us 0 --max-batch-rows 1)",
                          ["--batch-window-us", "0", "--max-batch-rows", "1"])):
        service, address = spawn_service(extra)
        try:
            threads = steps_per_second(address, args.streams, 1, args.vocab, args.policy, args.seconds)
            health = []
            probe = threading.Thread(target=lambda: health.extend(
                health_latencies(address, time.perf_counter() + 2.0 + args.seconds)))
            probe.start()
            procs = steps_per_second(address, args.streams, args.processes, args.vocab,
                                     args.policy, args.seconds)
            probe.join()
            rows.append((label, threads, procs, health))
            if not extra:
                idle_ms = idle_streams_create_ms(address, 1024)
        finally:
            service.terminate()
            service.wait()
    print(f"\n{args.streams} concurrent StepStreams, one 1 x {args.vocab} fp32 row each, "
          f"policy {args.policy}, loopback")
    for label, threads, procs, health in rows:
        print(f"  {label:<52} {threads:8.0f} steps/s (64 threads)  {procs:8.0f} steps/s "
              f"({args.processes} processes)  health p50 {statistics.median(health):.1f} ms, "
              f"max {max(health):.1f} ms")
    (_, t_on, p_on, _), (_, t_off, p_off, _) = rows
    print(f"  ratio batched / unbatched: {t_on / t_off:.2f}x (threads), {p_on / p_off:.2f}x "
          "(processes)")
    print(f"  CreateSequences with 1024 idle streams open: {idle_ms:.1f} ms")


if __name__ == "__main__":
    main()
