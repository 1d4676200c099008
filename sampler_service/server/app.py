"""Builds and runs the gRPC server on grpc.aio: Sampler, SharedMemory, grpc.health.v1,
reflection, an optional PolicyAdmin, and a graceful stop.

One asyncio event loop (in a thread of its own, so `SamplerServer` can be started and stopped
from ordinary code) serves every RPC; no call holds a thread while it waits. The engine runs
in one executor thread: steps reach it through the micro-batcher, every other call that
touches sequences or the engine is queued to the same thread. On a CPU engine without a
`state_dir` a small step batch runs on the event loop itself while that thread is idle, never
beside it (`engine_thread`). Health and reflection
run on the loop and answer whatever the load; `health_port` serves grpc.health.v1 on a port
of its own (the kubelet probes the pod IP while the data path stays on loopback or a socket).
With `tls_cert` and `tls_key` the TCP port (and so the PolicyAdmin service on it) speaks TLS,
mutual TLS with `tls_client_ca`; the Unix socket and the health port stay plaintext
(docs/security.md).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sampler_proto.sampler.v1 import sampler_pb2, sampler_pb2_grpc
from sampler_service.device import resolve_device
from sampler_service.engine import Engine
from sampler_service.policy.plugins import load_plugins
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.text.registry import DEFAULT_MAX_TOKENIZERS, TokenizerRegistry
from sampler_client.vocabulary import load_vocabulary
from sampler_service.policy.watcher import PolicyWatcher
from sampler_service.policy_admin import PolicyAdministration
from sampler_service.server.admin import ADMIN_SERVICE, PolicyAdminServicer
from sampler_service.server.batcher import StepBatcher
from sampler_service.server.engine_thread import EngineExecutor
from sampler_service.server.metrics import ServiceMetrics
from sampler_service.server.servicer import SamplerServicer
from sampler_service.server.shared_memory import SharedMemoryServicer
from sampler_service.server.state_keeper import DEFAULT_SNAPSHOT_INTERVAL_S, StateKeeper
from sampler_service.server.steps import StepRunner
from sampler_service.service import DEFAULT_MAX_PROMPT_TOKENS, SamplerCore
from sampler_service.state import SequenceStore
from sampler_service.transport.regions import RegionRegistry

log = logging.getLogger(__name__)

SAMPLER_SERVICE = sampler_pb2.DESCRIPTOR.services_by_name["Sampler"].full_name
SHARED_MEMORY_SERVICE = sampler_pb2.DESCRIPTOR.services_by_name["SharedMemory"].full_name
#: Room for 64 rows of a 128256-token vocabulary in fp32 (32.8 MB) with headroom.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_host(host: str, option: str = "--host") -> str:
    """`host` if it is an IP address or a host name (IPv6 may come in brackets), else
    ValueError: a Unix socket is `--uds PATH`, never a host."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        if _HOST_NAME.match(bare):
            return bare
    raise ValueError(f"{option} {host!r} is not an IP address or host name"
                     + (" (for a Unix socket use --uds PATH)" if "/" in host or host.startswith("unix") else ""))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int | None = 50051          # 0 picks a free port; None: no TCP port (--uds alone)
    uds: Path | None = None           # also serve on this Unix socket
    uds_mode: int = 0o600             # the socket file's permissions
    policies: Path | None = None      # user policy file, added to the shipped ones
    default_policies: bool = True
    device: str = "auto"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_sequences: int = 100_000
    idle_ttl_s: float = 3600.0
    max_group_rows: int = 64          # widest beam group / most forks or CoT branches
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # prompt tokens one sequence may bring
    #: Admission control on the memory all sequences' state holds (an estimate); None: off.
    max_state_bytes: int | None = 4 << 30
    metrics_port: int | None = None   # Prometheus /metrics on metrics_host:port (0: free); None: off
    metrics_host: str | None = None   # None: the same address as `host`
    policy_reload_s: float = 2.0      # poll `policies` for changes this often; 0: never reload
    grace_s: float = 10.0
    admin_token: str | None = None    # serve PolicyAdmin to callers bearing it; None: no admin API
    max_streams: int = 1024           # open StepStream calls; more: RESOURCE_EXHAUSTED
    batch_window_us: float = 200.0    # an idle engine waits this long for other callers' rows
    max_batch_rows: int = 256         # rows of one engine call (a larger request runs alone)
    health_port: int | None = None    # grpc.health.v1 alone on health_host:health_port
    health_host: str = "0.0.0.0"
    #: Serve the SharedMemory service and accept region references. None: on when every
    #: address the server binds is local (loopback or the Unix socket), off otherwise.
    allow_shared_memory: bool | None = None
    #: PEM files: the TCP port speaks TLS with this certificate chain and key (both or
    #: neither); with `tls_client_ca` it requires client certificates signed by that CA.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    #: Keep the sequences here across restarts (docs/state-dir.md): a journal of every
    #: committed change, a snapshot every `snapshot_interval_s` (0: only at start and stop)
    #: and at stop; `journal_fsync` fsyncs each journal append. None: in memory only.
    state_dir: Path | None = None
    snapshot_interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S
    journal_fsync: bool = False
    #: (name, path) of vocabularies to load at start (`--tokenizer NAME=PATH`): a
    #: tokenizer.json, a Hugging Face tokenizer directory or a GGUF file.
    tokenizers: tuple[tuple[str, Path], ...] = ()
    max_tokenizers: int = DEFAULT_MAX_TOKENIZERS

    def shared_memory_allowed(self) -> bool:
        if self.allow_shared_memory is not None:
            return self.allow_shared_memory
        return self.port is None or is_loopback(self.host)


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the TCP port from the config's PEM files, None without TLS.
    ValueError, naming the flag, for a lone cert or key, a client CA without them, or a file
    that cannot be read."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        given, missing = (("--tls-cert", "--tls-key") if config.tls_key is None
                          else ("--tls-key", "--tls-cert"))
        raise ValueError(f"{given} needs {missing}: give both or neither")
    cert = _read_pem(config.tls_cert, "--tls-cert")
    key = _read_pem(config.tls_key, "--tls-key")
    client_ca = (None if config.tls_client_ca is None
                 else _read_pem(config.tls_client_ca, "--tls-client-ca"))
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def loaded_tokenizers(config: ServerConfig) -> TokenizerRegistry:
    """A registry holding the `--tokenizer` vocabularies (before any state is restored: the
    restored sequences name them). ValueError naming the flag for one that does not load."""
    tokenizers = TokenizerRegistry(config.max_tokenizers)
    for name, path in config.tokenizers:
        try:
            vocabulary = load_vocabulary(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--tokenizer {name}={path}: {exc}") from None
        log.info("tokenizer %s: %d tokens from %s (%s)", name, vocabulary.size, path,
                 tokenizers.register(vocabulary, name))
    return tokenizers


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by an earlier run would make the bind fail; anything else is kept."""
    if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
        path.unlink()
    elif path.exists():
        raise OSError(f"--uds {path}: exists and is not a socket")


class SamplerServer:
    """A started server. `port` is the bound TCP port; `stop()` drains in-flight calls."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.host = check_host(config.host)
        if config.port is None and config.uds is None:
            raise ValueError("no address to serve: give a TCP port or --uds PATH")
        self._credentials = server_credentials(config)  # bad TLS files fail before anything starts
        self.tls = "off" if self._credentials is None else (
            "mutual TLS" if config.tls_client_ca is not None else "TLS")
        self.plugins = load_plugins()  # before the policies: they may name plug-in stages
        registry = PolicyRegistry.from_files(config.policies, config.default_policies)
        store = SequenceStore(config.max_sequences, config.idle_ttl_s,
                              max_state_bytes=config.max_state_bytes)
        self.metrics = ServiceMetrics(live_sequences=lambda: len(store))
        self.core = SamplerCore(registry, store, Engine(resolve_device(config.device)),
                                config.max_group_rows,
                                on_row=lambda policy, record: self.metrics.observe_row(
                                    policy, record.explanation),
                                max_prompt_tokens=config.max_prompt_tokens,
                                tokenizers=loaded_tokenizers(config))
        self.state = None  # restored before the ports are bound: health turns SERVING after
        if config.state_dir is not None:
            self.state = StateKeeper(config.state_dir, self.core, config.snapshot_interval_s,
                                     config.journal_fsync)
            try:
                self.state.restore()
                self.state.start()
            except BaseException:
                self.state.close()
                raise
        self.shared_memory = config.shared_memory_allowed()
        self.regions = RegionRegistry(self.core.device)
        self.engine_executor = EngineExecutor()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sampler-grpc",
                                        daemon=True)
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self._close_loop()
            self.engine_executor.shutdown()
            if self.state is not None:
                self.state.close()
            raise
        self.metrics_host = (None if config.metrics_port is None
                             else check_host(config.metrics_host or self.host, "--metrics-host"))
        self.metrics_port = (None if config.metrics_port is None
                             else self.metrics.serve(self.metrics_host, config.metrics_port))
        self.watcher = None
        if config.policies is not None and config.policy_reload_s > 0:
            self.watcher = PolicyWatcher(registry, config.policies, config.default_policies,
                                         config.policy_reload_s, self.metrics.observe_reload)
            self.watcher.start()
        self._log_start()

    @property
    def health_address(self) -> str | None:
        """host:port of the health-only port (the bound port), None without one."""
        if self.health_port is None:
            return None
        return host_port(check_host(self.config.health_host, "--health-host"), self.health_port)

    @property
    def metrics_url(self) -> str | None:
        """The Prometheus endpoint (with the bound port, also for --metrics-port 0), or None."""
        if self.metrics_port is None:
            return None
        return f"http://{host_port(self.metrics_host, self.metrics_port)}/metrics"

    def _log_start(self) -> None:
        """The `start` line: every address bound, whichever the config left off as null."""
        data = None if self.port is None else host_port(self.host, self.port)
        uds = None if self.config.uds is None else str(self.config.uds)
        fields = {"data": data, "uds": uds, "health": self.health_address,
                  "metrics": self.metrics_url, "device": str(self.core.device),
                  "shared_memory": self.shared_memory, "tls": self.tls}
        log.info("started: data port %s, Unix socket %s, health port %s, metrics %s (device %s, "
                 "shared memory %s, TLS on the data port: %s)", data or "off", uds or "off",
                 self.health_address or "off", self.metrics_url or "off", self.core.device,
                 "on" if self.shared_memory else "off", self.tls,
                 extra={"event": "start", **fields})

    def _call(self, coroutine):
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _start(self) -> None:
        config = self.config
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        # never with a state dir: the loop would wait on its journal's disk, or on the core's
        # lock while the snapshot thread copies every sequence
        inline = self.core.device.type == "cpu" and self.state is None
        runner = StepRunner(self.core, self.regions if self.shared_memory else None,
                            engine_idle=(lambda: self.engine_executor.idle) if inline else None)
        self.batcher = StepBatcher(runner, self.engine_executor, config.batch_window_us * 1e-6,
                                   config.max_batch_rows, inline=runner.runs_inline)
        self.servicer = SamplerServicer(self.core, self.metrics, runner, self.batcher,
                                        self.engine_executor, config.max_streams)
        self._server = grpc.aio.server(options=options)
        sampler_pb2_grpc.add_SamplerServicer_to_server(self.servicer, self._server)
        sampler_pb2_grpc.add_SharedMemoryServicer_to_server(
            SharedMemoryServicer(self.regions, self.metrics, self.shared_memory), self._server)
        self.health = health.aio.HealthServicer()
        for service in ("", SAMPLER_SERVICE):  # SERVING only once every port is bound
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        services = [SAMPLER_SERVICE, SHARED_MEMORY_SERVICE, health.SERVICE_NAME,
                    reflection.SERVICE_NAME]
        if config.admin_token is not None:
            sampler_pb2_grpc.add_PolicyAdminServicer_to_server(PolicyAdminServicer(
                PolicyAdministration(self.core.registry, self.core.store), config.admin_token,
                self.metrics), self._server)
            services.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(services, self._server)
        self.port = None
        if config.port is not None:
            address = host_port(self.host, config.port)
            self.port = (self._server.add_insecure_port(address) if self._credentials is None
                         else self._server.add_secure_port(address, self._credentials))
            if self.port == 0:
                raise OSError(f"could not bind {host_port(self.host, config.port)}")
        if config.uds is not None:
            _remove_stale_socket(config.uds)
            if not self._server.add_insecure_port(f"unix:{config.uds}"):
                raise OSError(f"could not bind the Unix socket {config.uds}")
        self._health_server = None
        self.health_port = None
        if config.health_port is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(
                host_port(check_host(config.health_host, "--health-host"), config.health_port))
            if self.health_port == 0:
                raise OSError(f"could not bind the health port {config.health_port}")
            await self._health_server.start()
        await self._server.start()
        if config.uds is not None:
            os.chmod(config.uds, config.uds_mode)
        if self.core.engine.device.type == "cpu":  # the first step must not pay for compiling
            await asyncio.get_running_loop().run_in_executor(self.engine_executor, _warm_kernels)
        for service in ("", SAMPLER_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    @property
    def address(self) -> str:
        """A target for clients: host:port, or unix:PATH when there is no TCP port."""
        if self.port is not None:
            return host_port(self.host, self.port)
        return f"unix:{self.config.uds}"

    async def _stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self.batcher.close()
        if self._health_server is not None:
            await self._health_server.stop(0)

    def stop(self, grace_s: float | None = None) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get `grace_s`.
        Stopping a stopped server does nothing."""
        if self._loop.is_closed():
            return
        started = time.monotonic()
        if self.watcher is not None:
            self.watcher.stop()
        self._call(self._stop(self.config.grace_s if grace_s is None else grace_s))
        self._close_loop()
        self.engine_executor.shutdown(wait=True)
        if self.state is not None:  # after the drain: no change can come any more
            self.state.close()
        self.regions.close()
        self.metrics.stop()
        if self.config.uds is not None and self.config.uds.exists():
            self.config.uds.unlink()
        took = time.monotonic() - started
        log.info("stopped (in %.2fs)", took, extra={"event": "stop", "took_s": round(took, 3)})

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _warm_kernels() -> None:
    """Compiles or loads the CPU kernels (`sampler_service.kernels.warm`); without numba (the
    `server` extra not installed) the engine runs its torch paths and there is nothing to do."""
    try:
        from sampler_service.kernels import warm
    except ImportError:
        return
    warm()


#: How often the main thread wakes to run a signal handler another thread received.
SIGNAL_POLL_S = 0.2


def serve_forever(config: ServerConfig, announce: bool = True) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully (draining for `config.grace_s`).
    `announce` prints the addresses on stdout (`sampler-service listening on ...`), the line
    scripts wait for; the `start` log line carries them in any case."""
    server = SamplerServer(config)
    received: list[int] = []
    stopping = threading.Event()

    def on_signal(signum, _frame):
        received.append(signum)  # logged by the main loop: a handler must not take log locks
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if announce:
        print(listening_line(server), flush=True)
    # Waits in short slices: the kernel may hand SIGTERM to any of the process's threads
    # (gRPC's, the engine's), and then only a main thread that wakes up runs the handler; a
    # wait without a timeout could sleep through it for good.
    while not stopping.wait(SIGNAL_POLL_S):
        pass
    name = signal.Signals(received[0]).name
    log.info("%s received: draining for up to %.1fs", name, config.grace_s,
             extra={"event": "drain", "signal": name, "grace_s": config.grace_s})
    server.stop()


def listening_line(server: SamplerServer) -> str:
    """`sampler-service listening on ADDRESS[ and unix:PATH] (device D[, TLS])`, then the
    health and metrics addresses when served (the bound ports, also for port 0)."""
    config = server.config
    where = server.address if config.uds is None or server.port is None else \
        f"{server.address} and unix:{config.uds}"
    tls = "" if server.tls == "off" or server.port is None else f", {server.tls} on the TCP port"
    line = f"sampler-service listening on {where} (device {server.core.device}{tls})"
    if server.health_address is not None:
        line += f"; health {server.health_address}"
    if server.metrics_url is not None:
        line += f"; metrics {server.metrics_url}"
    return line
