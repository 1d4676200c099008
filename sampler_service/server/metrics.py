"""Prometheus metrics of the service: steps, step latency, errors, live sequences, policy
reloads (and whether the last one failed), and the decisions adaptive policies report in their
explanations, per policy.

Each server has its own registry (several servers can run in one process, as the tests do),
exposed over HTTP at `/metrics` when `--metrics-port` is given.
"""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Flat-parameter sequences have no policy name; their metrics use this label.
FLAT_POLICY = "(flat)"


class ServiceMetrics:
    """The service's counters. `decision` counts every categorical field (text or true/false)
    of a choice's explanation as `stage`, `decision` = "field=value", e.g. entropix
    quadrant=explore or sed chaotic=true; numeric fields (temperatures) are not counted."""

    def __init__(self, live_sequences: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.rows = Counter("sampler_rows", "Rows stepped (one token chosen each)", ["policy"],
                            registry=self.registry)
        self.decisions = Counter("sampler_decisions", "Decisions reported by adaptive stages",
                                 ["policy", "stage", "decision"], registry=self.registry)
        self.errors = Counter("sampler_errors", "Failed requests by gRPC status code",
                              ["method", "code"], registry=self.registry)
        self.step_seconds = Histogram("sampler_step_seconds",
                                      "Time a step request spends in the service",
                                      registry=self.registry,
                                      buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1))
        self.reloads = Counter("sampler_policy_reloads", "Policy file reloads by result (ok: swapped "
                               "in; error: rejected, the old policies kept serving)", ["result"],
                               registry=self.registry)
        self.reload_failing = Gauge("sampler_policy_reload_failing",
                                    "1 while the last policy reload failed (the old policies keep "
                                    "serving), 0 once one succeeds", registry=self.registry)
        self.split_assignments = Counter("sampler_split_assignments",
                                         "Sequences an A/B split assigned, by variant",
                                         ["split", "variant"], registry=self.registry)
        live = Gauge("sampler_live_sequences", "Live sequences and groups", registry=self.registry)
        live.set_function(live_sequences)
        self._http = None

    def observe_row(self, policy: str, explanation: dict[str, dict[str, Any]]) -> None:
        """Counts one stepped row of `policy` and the categorical decisions it explains."""
        policy = policy or FLAT_POLICY
        self.rows.labels(policy).inc()
        for stage, fields in explanation.items():
            for name, value in fields.items():
                if isinstance(value, (str, bool)):
                    word = str(value).lower() if isinstance(value, bool) else value
                    self.decisions.labels(policy, stage, f"{name}={word}").inc()

    def observe_reload(self, change: Any, error: str | None) -> None:
        """Counts a policy reload attempt; `error` is its message when it failed."""
        self.reloads.labels("error" if error else "ok").inc()
        self.reload_failing.set(1 if error else 0)

    def observe_created(self, policy_name: str, split: str) -> None:
        """Counts a sequence a split assigned to its variant `policy_name`."""
        if split:
            self.split_assignments.labels(split, policy_name).inc()

    def serve(self, host: str, port: int) -> int:
        """Starts `/metrics` on host:port (0 = a free port); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
