"""Command line (also `python -m sampler_service ...`):

- `sampler-service serve ...` runs the gRPC service;
- `sampler-service health [--target ...]` asks a running service's grpc.health.v1 whether it
  is SERVING (the image's HEALTHCHECK; light: no torch);
- `sampler-service policies validate FILE` checks a policy file or directory offline;
- `sampler-service policies list|show|put|delete ... --target HOST:PORT` administers a running
  service's policies through its PolicyAdmin API (started with an admin token).

Exit codes: 0 done, 1 the policy file is invalid or the service refused the call (the gRPC
status and message are printed), 2 bad usage or the server could not start. `health`: 0
SERVING, 1 any other status (NOT_SERVING, UNKNOWN, or a service the server does not know),
2 unreachable, timed out or any other error. The server and the policy parser (torch) are
imported only by the commands that need them, so that `health` and
`policies list|show|put|delete` start fast.

A client-only install (`pip install .`, no `server` extra) runs `health` and
`policies list|delete`; `serve` and `policies validate|show|put` exit 2 naming the missing
module and `pip install 'sampler-sidecar[server]'`, and every --help ends with that note.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


#: The `server` extra (pyproject.toml): the modules `serve` imports when it starts, by
#: importable name, each with the distribution that provides it. `health` and
#: `policies list|delete` need none of them (a client-only `pip install .` runs them).
SERVER_EXTRA = "sampler-sidecar[server]"
SERVER_MODULES = {"torch": "torch", "yaml": "pyyaml", "grpc_health": "grpcio-health-checking",
                  "grpc_reflection": "grpcio-reflection", "prometheus_client": "prometheus-client"}
#: Modules of the extra `serve` starts without: imported when a feature needs them (structured
#: outputs, text), or with a fallback (numba's CPU kernels have torch paths).
SERVER_LAZY_MODULES = {"xgrammar": "xgrammar", "tokenizers": "tokenizers", "numba": "numba"}


def missing_server_modules() -> list[str]:
    """The modules of the `server` extra that are not installed ([] when it is). Looks them
    up without importing them (a few milliseconds)."""
    from importlib.util import find_spec

    def absent(name: str) -> bool:
        try:
            return find_spec(name) is None
        except (ImportError, ValueError):
            return True

    return [name for name in SERVER_MODULES if absent(name)]


def server_extra_message(missing: list[str]) -> str:
    """What to install when the `missing` modules of the server extra are not there."""
    dists = {**SERVER_MODULES, **SERVER_LAZY_MODULES}
    names = ", ".join(repr(name) + (f" ({dists[name]})" if dists.get(name, name) != name else "")
                      for name in missing)
    modules = "module" if len(missing) == 1 else "modules"
    return (f"the server is not installed: no {modules} named {names}. It is the `server` extra: "
            f"pip install '{SERVER_EXTRA}' (in a clone of the repository: pip install "
            "'.[server]'; for the CPU-only torch, run first: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)")


def _server_module_of(exc: ModuleNotFoundError) -> str | None:
    """The server extra's module `exc` failed to find, or None for any other module."""
    top = (exc.name or "").partition(".")[0]
    return top if top in SERVER_MODULES or top in SERVER_LAZY_MODULES else None


def build_parser() -> argparse.ArgumentParser:
    """The command line. Where the server extra is missing, every --help ends with a note
    naming the missing module and what to install."""
    missing = missing_server_modules()
    epilog = None if not missing else (
        f"Note: {server_extra_message(missing)}. Without it `serve` and `policies "
        "validate|show|put` exit 2; `health` and `policies list|delete` work.")
    parser = argparse.ArgumentParser(
        prog="sampler-service", epilog=epilog,
        description="Sampler Sidecar: LLM decoding policies over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands, epilog)
    _add_health(commands, epilog)
    _add_policies(commands, epilog)
    return parser


def _add_serve(commands, epilog: str | None = None) -> None:
    serve = commands.add_parser("serve", help="run the gRPC service", epilog=epilog)
    serve.add_argument("--host", default="127.0.0.1",
                       help="IP address or host name to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=50051, help="TCP port (0: any free port)")
    serve.add_argument("--no-tcp", action="store_true",
                       help="serve on --uds only, with no TCP port")
    serve.add_argument("--uds", type=Path, metavar="PATH",
                       help="also serve on this Unix domain socket (clients: unix:///PATH)")
    serve.add_argument("--uds-mode", type=lambda text: int(text, 8), default=0o600,
                       metavar="OCTAL", help="permissions of the socket file (default: 0600)")
    serve.add_argument("--policies", type=Path,
                       help="YAML policy file (or directory of them) added to the shipped ones; "
                            "watched and reloaded when it changes")
    serve.add_argument("--no-default-policies", action="store_true",
                       help="serve only the policies of --policies")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: CUDA if present)")
    serve.add_argument("--max-message-bytes", type=int,
                       help="largest request or response (default: 64 MiB)")
    serve.add_argument("--max-sequences", type=int, default=100_000, help="cap on live sequences")
    serve.add_argument("--idle-ttl", type=float, default=3600.0,
                       help="seconds before an idle sequence is evicted (0: never)")
    serve.add_argument("--max-group-rows", type=int, default=64,
                       help="cap on a group's rows: beam width, forks (best_of), CoT branches")
    serve.add_argument("--max-prompt-tokens", type=int, default=1 << 20,  # service.py's default
                       help="cap on one sequence's prompt tokens (default: 2^20)")
    serve.add_argument("--max-state-bytes", type=int, default=4 << 30,
                       help="new sequences are refused while all sequences' state holds about "
                            "this many bytes (default: 4 GiB; 0: no cap)")
    serve.add_argument("--tokenizer", action="append", type=_tokenizer_flag, default=[],
                       metavar="NAME=PATH",
                       help="load a model's vocabulary at start (a tokenizer.json, a Hugging "
                            "Face tokenizer directory or a GGUF file) for sequences to name; "
                            "repeatable")
    serve.add_argument("--max-tokenizers", type=int, default=16,
                       help="cap on vocabularies kept (--tokenizer and RegisterTokenizer)")
    serve.add_argument("--policy-reload-interval", type=float, default=2.0,
                       help="seconds between checks of --policies for changes (0: never reload)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    serve.add_argument("--metrics-host", default=None,
                       help="address of --metrics-port (default: --host; 0.0.0.0 lets a "
                            "Prometheus scrape the pod IP while the data path stays local)")
    serve.add_argument("--max-streams", type=int, default=1024,
                       help="cap on open StepStream calls (default: 1024)")
    serve.add_argument("--batch-window-us", type=float, default=200.0,
                       help="an idle engine waits this long for other callers' rows before a "
                            "step (default: 200; 0: never waits)")
    serve.add_argument("--max-batch-rows", type=int, default=256,
                       help="rows of one engine call; a larger request runs alone (default: 256)")
    serve.add_argument("--health-port", type=int, default=None,
                       help="also serve grpc.health.v1 alone on --health-host:PORT (kubelet probes)")
    serve.add_argument("--health-host", default="0.0.0.0",
                       help="address of --health-port (default: all interfaces)")
    serve.add_argument("--allow-shared-memory", action=argparse.BooleanOptionalAction,
                       default=None, help="serve the SharedMemory service (shared-memory and CUDA "
                       "IPC tensors); default: on when bound to loopback or --uds only")
    tls = serve.add_argument_group("TLS", "the TCP port (with PolicyAdmin) speaks TLS; the "
                                   "Unix socket and --health-port stay plaintext")
    tls.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="PEM certificate chain of the service (needs --tls-key)")
    tls.add_argument("--tls-key", type=Path, metavar="FILE",
                     help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                     help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    state = serve.add_argument_group("state", "keep the sequences across restarts "
                                     "(docs/state-dir.md)")
    state.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="journal every committed change and snapshot the sequences here; "
                            "restore them on start (default: in memory only)")
    state.add_argument("--snapshot-interval", type=float, default=30.0, metavar="SECONDS",
                       help="seconds between snapshots of --state-dir (default: 30; 0: only at "
                            "start and stop)")
    state.add_argument("--journal-fsync", action="store_true",
                       help="fsync each journal append: changes survive a node crash too, at "
                            "an fsync per step")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight calls get on SIGTERM")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                       help="least severe level logged (default: INFO; nothing is logged per "
                            "step or token at INFO)")
    serve.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                       help="text (default) or json: one JSON object per line on stderr (ts, "
                            "level, logger, msg and structured fields such as `event`); json "
                            "prints no plain `listening on` line on stdout")
    token = serve.add_mutually_exclusive_group()
    token.add_argument("--admin-token", help="serve the PolicyAdmin API to callers bearing this "
                       "token (visible in `ps`: prefer --admin-token-file)")
    token.add_argument("--admin-token-file", type=Path,
                       help="read the admin token from this file (e.g. a Kubernetes Secret "
                       "mount), read once at start; default: no admin API")


#: The service `health` asks about by default: SERVING once every port is bound and the
#: kernels are warm (sampler_service.server.app.SAMPLER_SERVICE, not imported: it needs torch).
HEALTH_SERVICE = "sampler.v1.Sampler"
#: The health-only port of the image (`--health-port 8081`) on loopback.
HEALTH_TARGET = "127.0.0.1:8081"
#: The values of --log-level and --log-format (sampler_service.logs: kept in step by a test;
#: not imported here so that the other commands load no more than they need).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


def _add_health(commands, epilog: str | None = None) -> None:
    health = commands.add_parser(
        "health", epilog=epilog,
        help="check a running service's grpc.health.v1 status (exit 0 when SERVING)",
        description="Asks grpc.health.v1 Check of a running service; prints the status. Exit "
                    "0 SERVING, 1 any other status (NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN), 2 "
                    "unreachable, timed out or another error.")
    health.add_argument("--target", default=HEALTH_TARGET, metavar="HOST:PORT | unix:PATH",
                        help=f"the service's health port, data port or Unix socket, plaintext "
                             f"(default: {HEALTH_TARGET}, the image's health port)")
    health.add_argument("--service", default=HEALTH_SERVICE, metavar="NAME",
                        help=f"the service name to check ('' for the server as a whole; "
                             f"default: {HEALTH_SERVICE})")
    health.add_argument("--timeout", type=_positive_seconds, default=3.0, metavar="S",
                        help="seconds to wait for the answer (default: 3)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


#: grpc.health.v1 HealthCheckResponse.ServingStatus by number.
HEALTH_STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def check_health(target: str, service: str = HEALTH_SERVICE, timeout: float = 3.0) -> int:
    """grpc.health.v1 Check of `service` at `target` over a plaintext channel: prints the
    status and returns 0 for SERVING, 1 for another status (a service the server does not
    know: SERVICE_UNKNOWN), or 2 with a one-line message on stderr when there is no answer.
    Imports grpc and the health messages alone (~0.1 s): it runs as a container HEALTHCHECK."""
    import grpc
    try:
        from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
    except ImportError:  # a client-only install (no `server` extra): the SDK's own messages
        from sampler_client.health import HealthCheckRequest, HealthCheckResponse
    try:
        with grpc.insecure_channel(target) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=HealthCheckRequest.SerializeToString,
                                        response_deserializer=HealthCheckResponse.FromString)
            status = check(HealthCheckRequest(service=service), timeout=timeout).status
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code == grpc.StatusCode.NOT_FOUND:  # the server answers, and does not know `service`
            print(f"SERVICE_UNKNOWN ({service!r} is not known to {target})")
            return 1
        details = exc.details() if callable(getattr(exc, "details", None)) else exc
        what = "no answer within the timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED \
            else f"{getattr(code, 'name', 'error')}: {' '.join(str(details).split())}"
        print(f"sampler-service health: {target}: {what}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a target grpc cannot parse
        print(f"sampler-service health: {target}: {exc}", file=sys.stderr)
        return 2
    print(HEALTH_STATUSES.get(status, f"status {status}"))
    return 0 if status == 1 else 1


def _add_policies(commands, epilog: str | None = None) -> None:
    policies = commands.add_parser("policies", epilog=epilog, help="validate policy files; "
                                   "administer a running service's policies")
    actions = policies.add_subparsers(dest="action", required=True)
    validate = actions.add_parser("validate", epilog=epilog,
                                  help="check a policy file or directory offline")
    validate.add_argument("path", type=Path, metavar="FILE",
                          help="a YAML policy file, or a directory of *.yaml / *.yml files")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--target", required=True, metavar="HOST:PORT", help="the service")
    token = remote.add_mutually_exclusive_group()
    token.add_argument("--token", help="the service's admin token")
    token.add_argument("--token-file", type=Path, help="read the admin token from this file")
    remote.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    remote.add_argument("--tls-ca", type=Path, metavar="FILE",
                        help="connect with TLS, verifying the service against this PEM CA")
    remote.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="client certificate for mutual TLS (with --tls-key; implies TLS)")
    remote.add_argument("--tls-key", type=Path, metavar="FILE", help="key of --tls-cert")
    actions.add_parser("list", parents=[remote], epilog=epilog, help="the policies in force")
    show = actions.add_parser("show", parents=[remote], epilog=epilog,
                              help="one policy as YAML, with its version")
    show.add_argument("name")
    put = actions.add_parser("put", parents=[remote], epilog=epilog,
                             help="add or replace a policy from a YAML file: a bare spec, or a "
                                  "document with `policies: {NAME: spec}`")
    put.add_argument("name")
    put.add_argument("path", type=Path, metavar="FILE")
    delete = actions.add_parser("delete", parents=[remote], epilog=epilog,
                                help="delete a policy (refused while live sequences pin it, "
                                     "unless --force)")
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true",
                        help="delete even if live sequences pin it (they keep their version)")


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


# -- policies validate ------------------------------------------------------------------------
def validate_policies(path: Path) -> int:
    """Parses every policy file `path` names, then checks that each split names a policy
    defined there or shipped. Prints `FILE: names` per file, or `FILE: field: message` on stderr."""
    import sampler_service.groups  # noqa: F401  (registers the group selectors)
    from sampler_service.errors import InvalidArgument
    from sampler_service.policy.plugins import load_plugins
    from sampler_service.policy.registry import (PolicyRegistry, load_policy_file,
                                                 policy_files, shipped_policies)
    load_plugins()  # a policy may name an installed plug-in's stage, as the server allows
    files = policy_files(path)
    if not files:
        print(f"{path}: policies: no policy files (*.yaml, *.yml) in the directory",
              file=sys.stderr)
        return 1
    specs, defined_in, names = shipped_policies(), {}, []
    for file in files:
        try:
            found = load_policy_file(file)
        except OSError as exc:
            print(f"{file}: policies: cannot read: {exc.strerror}", file=sys.stderr)
            return 1
        except InvalidArgument as exc:
            print(f"{file}: {exc.field}: {exc.message.removeprefix(f'{file}: ')}",
                  file=sys.stderr)
            return 1
        specs.update(found)
        defined_in.update(dict.fromkeys(found, file))
        names.append(f"{file}: {', '.join(found) or '(no policies)'}")
    try:
        PolicyRegistry(specs)
    except InvalidArgument as exc:
        split = exc.field.split(".")[1]  # the field is policies.<split>.split.<variant>
        print(f"{defined_in.get(split, path)}: {exc.field}: {exc.message}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


# -- policies list | show | put | delete ------------------------------------------------------
def _spec_from_file(name: str, path: Path) -> Any:
    """One spec from a YAML file: a bare spec, or `policies: {name: spec, ...}`. Read and
    parsed within the bounds the service applies (size cap, UTF-8, bounded aliases)."""
    from sampler_service.errors import InvalidArgument
    from sampler_service.policy.files import load_yaml_file
    try:
        document = load_yaml_file(path)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from exc
    if isinstance(document, dict) and set(document) == {"policies"}:
        if not isinstance(document["policies"], dict) or name not in document["policies"]:
            raise ValueError(f"{path}: `policies:` does not define {name!r}")
        return document["policies"][name]
    return document


def _admin_tls(args: argparse.Namespace):
    """The TLSConfig when any --tls-* flag is given, else None (a plaintext channel)."""
    from sampler_client import TLSConfig
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")

    def read(path: Path | None, flag: str) -> bytes | None:
        try:
            return None if path is None else path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None

    return TLSConfig(root_ca=read(args.tls_ca, "--tls-ca"), cert=read(args.tls_cert, "--tls-cert"),
                     key=read(args.tls_key, "--tls-key"))


def administer(args: argparse.Namespace) -> int:
    from sampler_client import PolicyAdminClient, SamplerError
    if args.action in ("show", "put"):
        import yaml  # the server extra's pyyaml: missing, main() says what to install
    token = _read_token(args.token_file) if args.token_file else args.token
    with PolicyAdminClient(args.target, token=token, timeout=args.timeout,
                           tls=_admin_tls(args)) as admin:
        try:
            if args.action == "list":
                policies = admin.list_policies()
                print(f"{'NAME':<16} {'KIND':<7} {'VERSION':>7}  {'HASH':<16}  {'ORIGIN':<6} LIVE")
                for p in policies:
                    print(f"{p.name:<16} {p.kind:<7} {p.version.number:>7}  {p.version.hash:<16}  "
                          f"{p.origin:<6} {p.live_sequences}")
            elif args.action == "show":
                p = admin.get_policy(args.name)
                print(f"# version {p.version.number} ({p.version.hash}), origin {p.origin}, "
                      f"{p.live_sequences} live sequence(s)")
                print(yaml.safe_dump({"policies": {p.name: p.spec}}, sort_keys=False), end="")
            elif args.action == "put":
                version = admin.put_policy(args.name, _spec_from_file(args.name, args.path))
                print(f"{args.name}: version {version.number} ({version.hash})")
            else:
                p = admin.delete_policy(args.name, args.force)
                print(f"deleted {p.name} (version {p.version.number}); {p.live_sequences} live "
                      "sequence(s) keep running on it")
        except SamplerError as exc:
            print(f"sampler-service policies {args.action}: {exc}", file=sys.stderr)
            return 1
    return 0


#: OpenMP threads that spin after each parallel region would burn the cores (and the CPU
#: quota) a sidecar shares with its model worker, and slow both: 2-core p99 of a one-row step
#: 5.0 -> 1.9 ms. Set before torch loads; an explicit setting wins.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def _tokenizer_flag(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def serve(args: argparse.Namespace) -> int:
    for name, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from sampler_service import logs
    if missing := missing_server_modules():  # a client-only install: no `server` extra
        logs.configure(args.log_level, args.log_format)
        return _cannot_start(args, server_extra_message(missing))
    from sampler_service.errors import SamplerServiceError
    from sampler_service.server.app import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig, serve_forever
    logs.configure(args.log_level, args.log_format)
    try:
        token = _read_token(args.admin_token_file) if args.admin_token_file else args.admin_token
        config = ServerConfig(host=args.host, port=None if args.no_tcp else args.port,
                              uds=args.uds, uds_mode=args.uds_mode, policies=args.policies,
                              default_policies=not args.no_default_policies, device=args.device,
                              max_message_bytes=args.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                              max_sequences=args.max_sequences, idle_ttl_s=args.idle_ttl,
                              max_group_rows=args.max_group_rows,
                              max_prompt_tokens=args.max_prompt_tokens,
                              max_state_bytes=args.max_state_bytes or None,
                              metrics_port=args.metrics_port, metrics_host=args.metrics_host,
                              policy_reload_s=args.policy_reload_interval, grace_s=args.grace,
                              admin_token=token, max_streams=args.max_streams,
                              batch_window_us=args.batch_window_us,
                              max_batch_rows=args.max_batch_rows, health_port=args.health_port,
                              health_host=args.health_host,
                              allow_shared_memory=args.allow_shared_memory,
                              tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_client_ca=args.tls_client_ca, state_dir=args.state_dir,
                              snapshot_interval_s=args.snapshot_interval,
                              journal_fsync=args.journal_fsync,
                              tokenizers=tuple(args.tokenizer),
                              max_tokenizers=args.max_tokenizers)
        serve_forever(config, announce=args.log_format == "text")
    except (SamplerServiceError, OSError, ValueError) as exc:
        field = getattr(exc, "field", None)
        return _cannot_start(args, f"{exc}" + (f" (at {field})" if field else ""))
    except ModuleNotFoundError as exc:  # e.g. --tokenizer without the extra's `tokenizers`
        if (module := _server_module_of(exc)) is None:
            raise
        return _cannot_start(args, server_extra_message([module]))
    return 0


def _cannot_start(args: argparse.Namespace, message: str) -> int:
    """Reports why `serve` cannot start (one JSON line under --log-format json); exit 2."""
    if args.log_format == "json":  # every line of the stream stays JSON
        logging.getLogger("sampler_service.cli").error(
            "cannot start: %s", message, extra={"event": "start_failed", "reason": message})
    else:
        print(f"sampler-service: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command if args.command != "policies" else f"policies {args.action}"
    try:
        return _run(args)
    except ModuleNotFoundError as exc:  # a client-only install: no `server` extra
        if (module := _server_module_of(exc)) is None:
            raise
        print(f"sampler-service {command}: {server_extra_message([module])}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve(args)
    if args.command == "health":
        return check_health(args.target, args.service, args.timeout)
    if args.action == "validate":
        return validate_policies(args.path)
    try:
        return administer(args)
    except (OSError, ValueError, *_yaml_errors()) as exc:
        print(f"sampler-service policies {args.action}: {exc}", file=sys.stderr)
        return 2


def _yaml_errors() -> tuple[type[Exception], ...]:
    """yaml.YAMLError where yaml is loaded (show and put use it; list and delete run without
    the server extra, which brings pyyaml)."""
    yaml = sys.modules.get("yaml")
    return (yaml.YAMLError,) if yaml is not None else ()


if __name__ == "__main__":
    sys.exit(main())
