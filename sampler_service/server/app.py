"""Builds and runs the gRPC server: Sampler, grpc.health.v1, reflection, graceful stop."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
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
from sampler_service.policy.watcher import PolicyWatcher
from sampler_service.policy_admin import PolicyAdministration
from sampler_service.server.admin import ADMIN_SERVICE, PolicyAdminServicer
from sampler_service.server.metrics import ServiceMetrics
from sampler_service.server.servicer import SamplerServicer
from sampler_service.service import SamplerCore
from sampler_service.state import SequenceStore

log = logging.getLogger(__name__)

SAMPLER_SERVICE = sampler_pb2.DESCRIPTOR.services_by_name["Sampler"].full_name
#: Room for 64 rows of a 128256-token vocabulary in fp32 (32.8 MB) with headroom.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                 # 0 picks a free port
    policies: Path | None = None      # user policy file, added to the shipped ones
    default_policies: bool = True
    device: str = "auto"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_sequences: int = 100_000
    idle_ttl_s: float = 3600.0
    max_group_rows: int = 64          # widest beam group / most forks or CoT branches
    metrics_port: int | None = None   # Prometheus /metrics on host:port (0: a free port); None: off
    policy_reload_s: float = 2.0      # poll `policies` for changes this often; 0: never reload
    workers: int = 8
    grace_s: float = 10.0
    admin_token: str | None = None    # serve PolicyAdmin to callers bearing it; None: no admin API


class SamplerServer:
    """A started server. `port` is the bound port; `stop()` drains in-flight calls."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.plugins = load_plugins()  # before the policies: they may name plug-in stages
        registry = PolicyRegistry.from_files(config.policies, config.default_policies)
        store = SequenceStore(config.max_sequences, config.idle_ttl_s)
        self.metrics = ServiceMetrics(live_sequences=lambda: len(store))
        self.core = SamplerCore(registry, store, Engine(resolve_device(config.device)),
                                config.max_group_rows,
                                on_row=lambda policy, record: self.metrics.observe_row(
                                    policy, record.explanation))
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                                   options=options)
        sampler_pb2_grpc.add_SamplerServicer_to_server(SamplerServicer(self.core, self.metrics),
                                                       self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        services = [SAMPLER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if config.admin_token is not None:
            sampler_pb2_grpc.add_PolicyAdminServicer_to_server(PolicyAdminServicer(
                PolicyAdministration(self.core.registry, self.core.store), config.admin_token,
                self.metrics), self._server)
            services.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(services, self._server)
        self.port = self._server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
        self._server.start()
        self.metrics_port = (None if config.metrics_port is None
                             else self.metrics.serve(config.host, config.metrics_port))
        self.watcher = None
        if config.policies is not None and config.policy_reload_s > 0:
            self.watcher = PolicyWatcher(registry, config.policies, config.default_policies,
                                         config.policy_reload_s, self.metrics.observe_reload)
            self.watcher.start()
        for service in ("", SAMPLER_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s:%d (device %s)", config.host, self.port, self.core.device)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def stop(self, grace_s: float | None = None) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get `grace_s`."""
        self.health.enter_graceful_shutdown()
        if self.watcher is not None:
            self.watcher.stop()
        self._server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        self.metrics.stop()

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve_forever(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully."""
    server = SamplerServer(config)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: draining for up to %.1fs", signum, config.grace_s)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"sampler-service listening on {server.address} (device {server.core.device})", flush=True)
    stopping.wait()
    server.stop()
