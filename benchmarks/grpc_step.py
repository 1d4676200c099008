"""A Step over gRPC against a bare gRPC echo of the same payload, and the in-process engine.

The service and the echo server run as processes of their own, as in a pod; the client and
the in-process engine run here. Three numbers for the same [rows, vocab] fp32 request on
loopback:
  - echo: a generic gRPC method that returns the request bytes (transport cost alone);
  - engine: SamplerCore.step in process (no transport);
  - service: SamplerClient.step through the real server (transport + decode + engine).
The ratios say how much of a step is the wire and how much is sampling.

    python benchmarks/grpc_step.py [--rows 64] [--vocab 128256]
"""
from __future__ import annotations

import argparse
import sys
from concurrent import futures

import grpc
import torch

from common import median_ms, print_table, spawn, spawn_service
from sampler_client import SamplerClient
from sampler_client.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from sampler_client.requests import step_request
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore
from sampler_service.transport.codec import decode_tensor

ECHO_METHOD = "/bench.Echo/Echo"


def serve_echo() -> None:
    """The echo server (run as `grpc_step.py --serve-echo`): prints its address, serves."""
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--policy", default="creative")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        return serve_echo()
    torch.set_num_threads(2)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3

    service, service_address = spawn_service()
    echo, echo_address = spawn([sys.executable, __file__, "--serve-echo"])
    try:
        with SamplerClient(service_address) as client, grpc.insecure_channel(
                echo_address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
            sequences = client.create_sequences([dict(policy=args.policy, seed=i)
                                                 for i in range(args.rows)])
            request = step_request([(s.sequence_id, None) for s in sequences], logits)
            payload = request.SerializeToString()
            echo_call = channel.unary_unary(ECHO_METHOD)
            echo_ms = median_ms(lambda: echo_call(payload))

            def service_step():
                for sequence in sequences:
                    sequence.next_step = None  # no step numbers: every call is a new step
                client.step(sequences, logits)

            service_ms = median_ms(service_step)
    finally:
        for process in (service, echo):
            process.terminate()
            process.wait()
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    core.create_sequences([SequenceRequest(s.sequence_id, policy=args.policy, params={"seed": i})
                           for i, s in enumerate(sequences)])
    rows = [StepRow(s.sequence_id) for s in sequences]
    engine_ms = median_ms(lambda: core.step(rows, decode_tensor(request.logits, "logits", core.device)))
    print_table(f"{args.rows} x {args.vocab} fp32 ({len(payload) / 1e6:.1f} MB per request), "
                f"policy {args.policy}, loopback", [
                    ("bare gRPC echo of the same bytes", echo_ms, "1.0x"),
                    ("in-process engine (decode + step)", engine_ms, f"{engine_ms / echo_ms:.2f}x echo"),
                    ("Step through the service (SDK)", service_ms,
                     f"{service_ms / echo_ms:.2f}x echo = echo + {service_ms - echo_ms:.1f} ms"),
                ])


if __name__ == "__main__":
    main()
