"""The data path's cost: a step's round trip by each transport, against a bare gRPC echo of the
same bytes and the in-process engine alone, all measured in this run.

The service and the echo server run as processes of their own (as in a pod); the client runs
here. For 64 x 128256 Zipf-shaped logits (fp32 and bf16) it prints the median round trip of
one `Step` by inline bytes over TCP and over a Unix socket, by shared memory, and as sparse
rows with K = 64 and 1024 (through the SDK, which computes the top-K on this CPU, and with the
rows built beforehand, as a GPU worker would hand them over), next to the echo of the inline
request and the in-process engine (decode + step). For 1 x 49152 greedy over one StepStream
it prints p50 / p99 next to a bare bidirectional echo.

    python benchmarks/transport.py [--policy creative] [--repeats 15] [--stream-steps 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import grpc
import torch

from common import median_ms, print_table, spawn, spawn_service, zipf_logits
from sampler_client import SamplerClient
from sampler_client.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from sampler_client.errors import from_rpc_error
from sampler_client.requests import step_request
from sampler_client.sparse import top_k_with_tail
from sampler_client.tensors import inline_tensor, wire_tensor
from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore
from sampler_service.transport.codec import decode_tensor

ECHO_SERVICE = "bench.Echo"


def serve_echo() -> None:
    """The echo server (`transport.py --serve-echo`): unary and bidi methods that return the
    request bytes; prints its address, serves until killed."""
    async def stream_echo(requests, context):
        async for request in requests:
            yield request

    async def main():
        server = grpc.aio.server(options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "StreamEcho": grpc.stream_stream_rpc_method_handler(stream_echo)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    import asyncio
    asyncio.run(main())


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_latencies(step, steps: int) -> list[float]:
    """Milliseconds of each of `steps` calls of `step()` after a warm-up."""
    for _ in range(50):
        step()
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


def bidi_echo_latencies(channel: grpc.Channel, payload: bytes, steps: int) -> list[float]:
    """A bare bidirectional echo of `payload`, one message at a time, as a stream step does."""
    import queue
    outgoing: queue.Queue = queue.Queue()
    end = object()
    call = channel.stream_stream(f"/{ECHO_SERVICE}/StreamEcho")(iter(outgoing.get, end))

    def step():
        outgoing.put(payload)
        next(call)

    samples = stream_latencies(step, steps)
    outgoing.put(end)
    return samples


def step_ms(address: str, policy: str, logits: torch.Tensor, repeats: int, **client_options) -> float:
    """Median Step round trip of `logits` [rows, vocab] through the SDK."""
    with SamplerClient(address, **client_options) as client:
        sequences = client.create_sequences([dict(policy=policy, seed=i)
                                             for i in range(logits.shape[0])])

        def step():
            for sequence in sequences:
                sequence.next_step = None  # no step numbers: every call is a new step
            client.step(sequences, logits)

        return median_ms(step, repeats=repeats)


def prebuilt_sparse_ms(address: str, policy: str, logits: torch.Tensor, k: int,
                       repeats: int) -> tuple[float, float, int]:
    """(round trip of a Step whose sparse rows were built beforehand, as a GPU worker hands
    them over: its device's top-K costs ~0.1 ms; the SDK's top-K + tail on this CPU, ms; rows
    the service refused over all steps, resent in full as the SDK does)."""
    wire = wire_tensor(logits)
    worker_ms = median_ms(lambda: top_k_with_tail(wire, k), repeats=repeats)
    rows = top_k_with_tail(wire, k)
    with SamplerClient(address, transport="inline") as client:
        sequences = client.create_sequences([dict(policy=policy, seed=i)
                                             for i in range(logits.shape[0])])
        ids = [(s.sequence_id, None, None) for s in sequences]
        step = client._stub.Step  # the SDK's own call, minus the worker's top-K

        def request(dense: list[int]) -> pb.StepRequest:
            sent = [r for r in range(len(ids)) if r not in dense]
            return step_request(ids, logits[dense] if dense else None, sparse=rows.take(
                sent).message(sent, logits.shape[1], inline_tensor(rows.values.take_rows(sent))))

        prepared, refused = request([]), [0]

        def sparse_step():
            try:
                step(prepared)
            except grpc.RpcError as error:  # resend the refused rows in full, as the SDK does
                dense = sorted({int(f[5:].split("]")[0]) for f in from_rpc_error(error).fields})
                refused[0] += len(dense)
                step(request(dense))

        return median_ms(sparse_step, repeats=repeats), worker_ms, refused[0]


def engine_ms(policy: str, logits: torch.Tensor, repeats: int) -> float:
    """The in-process engine: decode the inline request, then the core's step."""
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    ids = [f"s{i}" for i in range(logits.shape[0])]
    core.create_sequences([SequenceRequest(sid, policy=policy, params={"seed": i})
                           for i, sid in enumerate(ids)])
    request = step_request([(sid, None, None) for sid in ids], logits)
    rows = [StepRow(sid) for sid in ids]
    return median_ms(lambda: core.step(rows, decode_tensor(request.logits, "logits", core.device)),
                     repeats=repeats)


def large_table(args, service: str, uds: str, echo: grpc.Channel, dtype: torch.dtype) -> None:
    logits = zipf_logits(64, 128256).to(dtype)  # shaped like a model's: top-p closes early
    payload = step_request([(f"s{i}", None, None) for i in range(64)], logits).SerializeToString()
    echo_call = echo.unary_unary(f"/{ECHO_SERVICE}/Echo")
    echo_ms = median_ms(lambda: echo_call(payload), repeats=args.repeats)
    engine = engine_ms(args.policy, logits, args.repeats)
    inline = step_ms(service, args.policy, logits, args.repeats, transport="inline")
    cases = [("bare gRPC echo of the inline request", echo_ms),
             ("in-process engine (decode + step)", engine),
             ("Step, inline bytes, TCP", inline),
             ("Step, inline bytes, Unix socket", step_ms(uds, args.policy, logits, args.repeats,
                                                         transport="inline")),
             ("Step, shared memory", step_ms(service, args.policy, logits, args.repeats,
                                             transport="shm"))]
    worker = []
    for k in (64, 1024):
        cases.append((f"Step, sparse K = {k} (SDK, top-K on this CPU)", step_ms(
            service, args.policy, logits, args.repeats, transport="inline", sparse_top_k=k)))
        prebuilt, worker_ms, refused = prebuilt_sparse_ms(service, args.policy, logits, k,
                                                          args.repeats)
        cases.append((f"Step, sparse K = {k} (rows prebuilt; {refused} rows resent)", prebuilt))
        worker.append(f"K = {k}: {worker_ms:.1f} ms")
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    print_table(f"64 x 128256 {name} ({len(payload) / 1e6:.1f} MB inline), policy {args.policy}",
                [(label, ms, f"{ms / engine:.2f}x engine, {inline / ms:.1f}x faster than inline")
                 for label, ms in cases])
    print(f"  (the SDK's top-K + tail statistics on this CPU: {', '.join(worker)})")


def stream_table(args, service: str, uds: str, echo: grpc.Channel) -> None:
    logits = torch.randn(1, 49152, generator=torch.Generator().manual_seed(1)) * 3
    payload = step_request([("s", None, None)], logits).SerializeToString()
    echo_samples = bidi_echo_latencies(echo, payload, args.stream_steps)
    rows = [("bare bidi echo of the same bytes", echo_samples)]
    for label, target, transport in (("StepStream, inline, TCP", service, "inline"),
                                     ("StepStream, inline, Unix socket", uds, "inline"),
                                     ("StepStream, shared memory", service, "shm")):
        with SamplerClient(target, transport=transport) as client:
            sequence = client.create_sequence(policy="greedy")
            with client.stream() as stream:
                def step():
                    sequence.next_step = None
                    stream.step([sequence], logits)
                rows.append((label, stream_latencies(step, args.stream_steps)))
    base50, base99 = percentile(echo_samples, 0.5), percentile(echo_samples, 0.99)
    print(f"\n1 x 49152 fp32, greedy, one StepStream, {args.stream_steps} steps")
    for label, samples in rows:
        p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
        print(f"  {label:<34} p50 {p50:6.3f} ms ({p50 / base50:.2f}x echo)   "
              f"p99 {p99:6.3f} ms ({p99 / base99:.2f}x echo)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="creative")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stream-steps", type=int, default=2000)
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        return serve_echo()
    torch.set_num_threads(2)
    socket = os.path.join(tempfile.mkdtemp(), "sampler.sock")
    service, address = spawn_service(["--uds", socket])
    echo, echo_address = spawn([sys.executable, __file__, "--serve-echo"])
    try:
        with grpc.insecure_channel(echo_address,
                                   options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
            stream_table(args, address, f"unix://{socket}", channel)
            for dtype in (torch.float32, torch.bfloat16):
                large_table(args, address, f"unix://{socket}", channel, dtype)
    finally:
        for process in (service, echo):
            process.terminate()
            process.wait()


if __name__ == "__main__":
    main()
