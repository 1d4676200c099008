"""Command line: `sampler-service serve ...` (also `python -m sampler_service serve ...`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sampler_service.server.app import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sampler-service",
                                     description="Sampler Sidecar: LLM decoding policies over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    serve.add_argument("--policies", type=Path, help="YAML policy file added to the shipped ones")
    serve.add_argument("--no-default-policies", action="store_true",
                       help="serve only the policies of --policies")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: CUDA if present)")
    serve.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help="largest request or response (default: 64 MiB)")
    serve.add_argument("--max-sequences", type=int, default=100_000, help="cap on live sequences")
    serve.add_argument("--idle-ttl", type=float, default=3600.0,
                       help="seconds before an idle sequence is evicted (0: never)")
    serve.add_argument("--max-group-rows", type=int, default=64,
                       help="cap on a group's rows: beam width, forks (best_of), CoT branches")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    serve.add_argument("--workers", type=int, default=8, help="gRPC worker threads")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight calls get on SIGTERM")
    serve.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from sampler_service.errors import SamplerServiceError
        from sampler_service.server.app import serve_forever
        config = ServerConfig(host=args.host, port=args.port, policies=args.policies,
                              default_policies=not args.no_default_policies, device=args.device,
                              max_message_bytes=args.max_message_bytes,
                              max_sequences=args.max_sequences, idle_ttl_s=args.idle_ttl,
                              max_group_rows=args.max_group_rows,
                              metrics_port=args.metrics_port, workers=args.workers, grace_s=args.grace)
        try:
            serve_forever(config)
        except (SamplerServiceError, OSError, ValueError) as exc:
            field = getattr(exc, "field", None)
            print(f"sampler-service: {exc}" + (f" (at {field})" if field else ""), file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
