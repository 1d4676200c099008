"""A worker's latency budget per step (docs/integration.md): one greedy step of 1 x 49152 and
64 x 49152 fp32 logits (SmolLM2's vocabulary) through the SDK on one StepStream, as
`hf.generate` and examples/worker_loop.py send them, by inline bytes over TCP and over a Unix
socket and by shared memory, against a local service of its own process.

    python benchmarks/step_budget.py [--steps 1000] [--wide-steps 200]

Prints p50 / p99 of the round trip the worker sees and the p50 of the service's own time
(`service_micros`), per transport and shape.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from common import spawn_service
from sampler_client import SamplerClient
from transport import percentile, stream_latencies

VOCAB = 49152
CASES = [("inline, TCP", "tcp", "inline"), ("inline, Unix socket", "uds", "inline"),
         ("shared memory", "tcp", "shm")]


def measure(target: str, transport: str, rows: int, steps: int) -> tuple[float, float, float]:
    """(p50, p99 of the round trip, p50 of the service's own time), ms, over `steps` steps
    of `rows` greedy sequences on one StepStream."""
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows)) * 3
    with SamplerClient(target, transport=transport) as client:
        sequences = client.create_sequences([dict(policy="greedy")] * rows)
        service: list[float] = []
        with client.stream() as stream:
            def step():
                for sequence in sequences:
                    sequence.next_step = None  # no step numbers: every call is a new step
                stream.step(sequences, logits)
                service.append(stream.last_service_micros / 1e3)
            samples = stream_latencies(step, steps)
        client.release(sequences)
    return percentile(samples, 0.5), percentile(samples, 0.99), statistics.median(service)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps of 1 x 49152")
    parser.add_argument("--wide-steps", type=int, default=200, help="steps of 64 x 49152")
    args = parser.parse_args()
    torch.set_num_threads(2)
    socket = os.path.join(tempfile.mkdtemp(), "sampler.sock")
    process, address = spawn_service(["--uds", socket])
    targets = {"tcp": address, "uds": f"unix://{socket}"}
    try:
        for rows, steps in ((1, args.steps), (64, args.wide_steps)):
            print(f"\n{rows} x {VOCAB} fp32, greedy, one StepStream, {steps} steps "
                  f"({rows * VOCAB * 4 / 1e6:.2f} MB of logits per step)")
            for label, target, transport in CASES:
                p50, p99, own = measure(targets[target], transport, rows, steps)
                print(f"  {label:<20} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   "
                      f"service p50 {own:6.2f} ms")
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
