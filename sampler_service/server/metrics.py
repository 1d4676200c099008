"""Prometheus metrics of the service, served over HTTP at `/metrics` with `--metrics-port`.

Each server has its own registry (several servers can run in one process, as the tests do),
which also holds the standard process (`process_*`: CPU, memory, file descriptors), platform
(`python_info`) and garbage-collector (`python_gc_*`) collectors. No `_created` series are
exposed: the registry drops them at collection (`_Registry`), for this registry alone, so
nothing else in the process changes.

Metrics (every label value comes from a bounded set):

- `sampler_rpc_total{method, code}`: RPC completions by method and gRPC status code name
  (OK, INVALID_ARGUMENT, ...), every service (Sampler, SharedMemory, PolicyAdmin). A
  StepStream counts each message it answers (OK or its in-band error), plus one for a stream
  refused when it opens (RESOURCE_EXHAUSTED); a call the client cancels counts CANCELLED.
- `sampler_errors_total{method, code}`: the failed ones alone (the non-OK part of
  `sampler_rpc_total`, kept for existing alerts).
- `sampler_inflight_requests`: requests inside the service now: each unary call while it
  runs and each StepStream message from its arrival to its answer (an open stream waiting for
  its next message is not one).
- `sampler_open_streams`: StepStream calls open now.
- `sampler_step_duration_seconds{policy, transport}`: time a successful step request spends in
  the service (queueing in the micro-batcher included). `policy`: the policy of the request's
  sequences (`policy_label`: a registered name, "inline" for an inline spec, "(flat)" for flat
  parameters, "(mixed)" for a request whose sequences have different ones). `transport`: how
  its logits arrived (`transport_of`: inline, shm, cuda_ipc, sparse, or none). Whether they
  came on Step or StepStream is the method of `sampler_rpc_total`, not a transport.
- `sampler_payload_bytes_total{transport}`: bytes of logits received by step and preview
  requests, failed ones included (`payload_of`): each dense tensor (`logits`,
  `reference_logits`) under its own carriage (inline, shm, cuda_ipc; a region's byte_size),
  sparse rows (token ids, logits and tail statistics) under sparse.
- `sampler_batch_rows`: rows of each engine call of the micro-batcher.
- `sampler_rows_total{policy}`: rows stepped (one token chosen each).
- `sampler_decisions_total{policy, stage, decision}`: the categorical decisions adaptive
  stages report in their explanations, per row. `stage` is a registered stage key and
  `decision` is "field=value" where the stage declares that field and value in its
  `decisions` class attribute (e.g. entropix quadrant=flowing, sed chaotic=true); any other
  categorical field or value (text or true/false) of a registered stage counts as
  decision="other", and an explanation under a key that names no registered stage as
  stage="other", decision="other": a plug-in cannot create series without bound. Numeric fields
  (temperatures, entropies) are not counted.
- `sampler_live_sequences`, `sampler_policy_reloads_total{result}`,
  `sampler_policy_reload_failing`, `sampler_split_assignments_total{split, variant}`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram,
                               PlatformCollector, ProcessCollector, start_http_server)
from prometheus_client.metrics_core import Metric

from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.selectors import SELECTORS

#: Flat-parameter sequences have no policy name; their metrics use this label.
FLAT_POLICY = "(flat)"
#: The policy label of a step request whose sequences have different policies.
MIXED_POLICY = "(mixed)"
#: The stage or decision label of whatever a stage did not declare.
OTHER = "other"
#: Bytes of one `TailStats` (float max, three doubles).
TAIL_STATS_BYTES = 4 + 3 * 8
_CARRIAGE = {"raw": "inline", "shared_memory": "shm", "cuda_ipc": "cuda_ipc"}
_SUFFIXED = {"counter", "histogram", "summary"}

STEP_SECONDS_BUCKETS = (.00025, .0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2.5)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def policy_label(name: str) -> str:
    """A policy's metrics label: its name ("inline" for an inline spec), "(flat)" for none."""
    return name or FLAT_POLICY


def _tensor_carriage(tensor) -> tuple[str, int] | None:
    """(transport, bytes) of a `sampler.v1.Tensor`, None when it holds nothing."""
    which = tensor.WhichOneof("data")
    if which is None:
        return None
    size = len(tensor.raw) if which == "raw" else getattr(tensor, which).byte_size
    return _CARRIAGE[which], size


def transport_of(request) -> str:
    """How a step request's logits arrived: sparse (some or every row sent as its K best
    entries), else the carriage of `logits` (inline, shm, cuda_ipc), none without any."""
    if request.HasField("sparse"):
        return "sparse"
    carriage = _tensor_carriage(request.logits) if request.HasField("logits") else None
    return "none" if carriage is None else carriage[0]


def payload_of(request) -> list[tuple[str, int]]:
    """(transport, bytes) of every logits tensor of a step or preview request."""
    out = []
    for name in ("logits", "reference_logits"):
        if request.HasField(name):
            carriage = _tensor_carriage(getattr(request, name))
            if carriage is not None:
                out.append(carriage)
    if "sparse" in request.DESCRIPTOR.fields_by_name and request.HasField("sparse"):
        sparse = request.sparse
        logits = _tensor_carriage(sparse.logits) if sparse.HasField("logits") else None
        out.append(("sparse", len(sparse.token_ids) + (0 if logits is None else logits[1])
                    + TAIL_STATS_BYTES * len(sparse.tails)))
    return out


def decision_labels(stage: str, field: str, value: str | bool) -> tuple[str, str]:
    """(stage, decision) labels of one categorical explanation field (see the module
    docstring): "field=value" only where the registered stage declares it, else "other"."""
    cls = PROCESSORS.get(stage) or SELECTORS.get(stage)
    if cls is None:
        return OTHER, OTHER
    word = str(value).lower() if isinstance(value, bool) else value
    declared = getattr(cls, "decisions", None)
    allowed = declared.get(field, ()) if isinstance(declared, Mapping) else ()
    return stage, (f"{field}={word}" if word in allowed else OTHER)


class _Registry(CollectorRegistry):
    """A registry whose counters, histograms and summaries expose no `_created` sample."""

    def collect(self) -> Iterable[Metric]:
        return _without_created(super().collect())

    def restricted_registry(self, names: Iterable[str]):
        restricted = super().restricted_registry(names)

        class Restricted:
            def collect(self) -> Iterable[Metric]:
                return _without_created(restricted.collect())

        return Restricted()


def _without_created(metrics: Iterable[Metric]) -> Iterable[Metric]:
    for metric in metrics:
        if metric.type in _SUFFIXED:
            created = metric.name + "_created"
            metric = copy.copy(metric)
            metric.samples = [s for s in metric.samples if s.name != created]
        yield metric


class ServiceMetrics:
    """The service's metrics (see the module docstring), in a registry of their own."""

    def __init__(self, live_sequences: Callable[[], int]):
        self.registry = registry = _Registry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.rpcs = Counter("sampler_rpc", "RPC completions by method and gRPC status code "
                            "(a StepStream counts each message it answers)", ["method", "code"],
                            registry=registry)
        self.errors = Counter("sampler_errors", "Failed requests by method and gRPC status code",
                              ["method", "code"], registry=registry)
        self.inflight = Gauge("sampler_inflight_requests", "Requests being processed now (unary "
                              "calls and StepStream messages)", registry=registry)
        self.open_streams = Gauge("sampler_open_streams", "StepStream calls open now",
                                  registry=registry)
        self.step_duration = Histogram("sampler_step_duration_seconds",
                                       "Time a successful step request spends in the service, by "
                                       "policy and how its logits arrived",
                                       ["policy", "transport"], registry=registry,
                                       buckets=STEP_SECONDS_BUCKETS)
        self.payload_bytes = Counter("sampler_payload_bytes", "Bytes of logits received, by how "
                                     "they arrived", ["transport"], registry=registry)
        self.batch_rows = Histogram("sampler_batch_rows", "Rows of each micro-batched engine call",
                                    registry=registry, buckets=BATCH_ROWS_BUCKETS)
        self.rows = Counter("sampler_rows", "Rows stepped (one token chosen each)", ["policy"],
                            registry=registry)
        self.decisions = Counter("sampler_decisions", "Declared decisions adaptive stages report "
                                 "(decision=\"other\": anything undeclared)",
                                 ["policy", "stage", "decision"], registry=registry)
        self.reloads = Counter("sampler_policy_reloads", "Policy file reloads by result (ok: "
                               "swapped in; error: rejected, the old policies kept serving)",
                               ["result"], registry=registry)
        self.reload_failing = Gauge("sampler_policy_reload_failing",
                                    "1 while the last policy reload failed (the old policies keep "
                                    "serving), 0 once one succeeds", registry=registry)
        self.split_assignments = Counter("sampler_split_assignments",
                                         "Sequences an A/B split assigned, by variant",
                                         ["split", "variant"], registry=registry)
        live = Gauge("sampler_live_sequences", "Live sequences and groups", registry=registry)
        live.set_function(live_sequences)
        self._http = None

    def observe_rpc(self, method: str, code: str) -> None:
        """Counts one completed request of `method` with status `code` (a gRPC code name)."""
        self.rpcs.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()

    def observe_step(self, policy: str, transport: str, seconds: float) -> None:
        """One successful step request: `policy` is already a label (`policy_label`)."""
        self.step_duration.labels(policy, transport).observe(seconds)

    def observe_payload(self, request) -> None:
        """Counts the logits bytes a step or preview request brings (`payload_of`)."""
        for transport, size in payload_of(request):
            self.payload_bytes.labels(transport).inc(size)

    def observe_batch(self, rows: int) -> None:
        """One engine call of the micro-batcher over `rows` rows."""
        self.batch_rows.observe(rows)

    def observe_row(self, policy: str, explanation: dict[str, dict[str, Any]]) -> None:
        """Counts one stepped row of `policy` and the categorical decisions it explains."""
        policy = policy_label(policy)
        self.rows.labels(policy).inc()
        for stage, fields in explanation.items():
            for name, value in fields.items():
                if isinstance(value, (str, bool)):
                    self.decisions.labels(policy, *decision_labels(stage, name, value)).inc()

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
