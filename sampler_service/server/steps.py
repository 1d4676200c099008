"""Runs a batch of StepRequests in the engine's thread (or, a small CPU batch, on the event loop
while that thread is idle: never beside it): decode every request, step them all as one batch
(`SamplerCore.step_calls`), encode each answer. A request that cannot be decoded or stepped
gets its exception; the others are answered. The caller holds the shared-memory and
CUDA IPC regions a request reads (`hold`) from its arrival until it is answered."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import SamplerServiceError, detached
from sampler_service.policy.candidates import row_maxima
from sampler_service.policy.statistics import RawStatistics, fused_available, raw_statistics
from sampler_service.server import convert
from sampler_service.server.metrics import MIXED_POLICY, policy_label
from sampler_service.service import SamplerCore, StepCall
from sampler_service.step_logits import StepLogits
from sampler_service.transport.codec import decode_tensor, region_refs, wire_tensor
from sampler_service.transport.regions import RegionRegistry
from sampler_service.transport.sparse import decode_sparse

if TYPE_CHECKING:
    from sampler_service.policy.sparse import SparseLogits


@dataclass(frozen=True)
class StepWork:
    """One step request as the batcher hands it over, with its caller's deadline
    (`time.monotonic()`; None: none): a step planned after it changes nothing. Once it has
    been answered, `outcome["policy"]` is the metrics label of its sequences' policy
    (`StepRunner.policy_label`)."""

    request: pb.StepRequest
    deadline: float | None = None
    outcome: dict[str, str] = field(default_factory=dict, compare=False)


class StepRunner:
    """`runner(works)` -> one StepResponse or exception per request, in order. `engine_idle`
    says whether the engine thread is idle; None: batches never run on the event loop
    (`runs_inline`)."""

    def __init__(self, core: SamplerCore, regions: RegionRegistry | None,
                 engine_idle: Callable[[], bool] | None = None):
        self.core = core
        #: torch's intra-op threads for a batch of SINGLE_THREAD_ELEMENTS logits or more.
        self.threads = torch.get_num_threads()
        #: None when shared memory is off: a region reference is then FAILED_PRECONDITION.
        self.regions = regions
        self.engine_idle = engine_idle

    def runs_inline(self, works: Sequence[StepWork]) -> bool:
        """Whether the batcher may run `works` on the event loop rather than hop to the engine
        thread and back (~0.2 ms): a small batch (`is_small`: well under a millisecond of
        work) while the engine thread is idle. The server allows it for a CPU engine without a
        state dir: the loop must never wait on a device, a disk or a snapshot."""
        return self.engine_idle is not None and self.is_small(works) and self.engine_idle()

    @staticmethod
    def is_small(works: Sequence[StepWork]) -> bool:
        """Fewer than SINGLE_THREAD_ROWS rows and SINGLE_THREAD_ELEMENTS logits: one intra-op
        thread runs it."""
        requests = [w.request for w in works]
        if sum(len(r.rows) for r in requests) >= SINGLE_THREAD_ROWS:
            return False
        return sum(math.prod(r.logits.shape) + math.prod(r.sparse.logits.shape)
                   for r in requests) < SINGLE_THREAD_ELEMENTS

    def decode_tensor(self, tensor: pb.Tensor, field: str):
        return decode_tensor(tensor, field, self.core.device, self.regions)

    def hold(self, request) -> contextlib.AbstractContextManager:
        """Keeps the regions `request` reads registered (NOT_FOUND for an unknown one)."""
        if self.regions is None:
            return contextlib.nullcontext()
        return self.regions.hold(region_refs(request))

    def decode(self, request: pb.StepRequest) -> "_Decoded":
        """Everything of the request but its dense logits' values, which stay as they travel
        (`wire`) until `__call__` copies every request's into one batch buffer."""
        rows = convert.step_rows_from_pb(request.rows, lambda tensor, name: decode_tensor(
            tensor, name, torch.device("cpu"), self.regions))
        sparse_rows, sparse = ((), None)
        if request.HasField("sparse"):
            sparse_rows, sparse = decode_sparse(request.sparse, len(rows), self.core.device,
                                                self.decode_tensor)
        wire = (wire_tensor(request.logits, "logits", self.regions)
                if request.HasField("logits") or sparse is None else None)
        reference = (self.decode_tensor(request.reference_logits, "reference_logits")
                     if request.HasField("reference_logits") else None)
        return _Decoded(rows, wire, tuple(sparse_rows), sparse, request.processed_logprobs,
                        reference, convert.signals_from_pb(request, self.core.device),
                        request.resume_records)

    def dense_logits(self, decoded: dict[int, "_Decoded"]
                     ) -> dict[int, tuple[torch.Tensor, RawStatistics | None] | Exception]:
        """Each request's dense logits as float32 rows of one buffer per vocabulary size (one
        copy from the wire, and adjacent rows the engine can take without another), checked
        in one pass, with their raw statistics where the fused kernel computes them in that
        pass (the engine reuses them; else None): a request with NaN, +inf or an all -inf row
        gets its error instead."""
        out: dict[int, tuple[torch.Tensor, RawStatistics | None] | Exception] = {}
        by_vocab: dict[int, list[int]] = {}
        for index, item in decoded.items():
            if item.wire is None:
                continue
            if item.wire.dim() == 2:
                by_vocab.setdefault(item.wire.shape[1], []).append(index)
            else:  # the core names the wrong shape
                out[index] = (item.wire.to(device=self.core.device, dtype=torch.float32), None)
        for vocab, members in by_vocab.items():
            buffer = torch.empty(sum(decoded[i].wire.shape[0] for i in members), vocab,
                                 device=self.core.device)
            spans, start = {}, 0
            for index in members:
                spans[index] = (start, start + decoded[index].wire.shape[0])
                buffer[start:spans[index][1]].copy_(decoded[index].wire)
                start = spans[index][1]
            stats = raw_statistics(buffer) if fused_available(buffer) else None
            bad = ~torch.isfinite(row_maxima(buffer)) if stats is None else stats.problem != 0
            for index, (start, end) in spans.items():
                out[index] = (buffer[start:end],
                              None if stats is None else stats.span(start, end))
            if bool(bad.any()):
                for index in members:
                    dense_rows, values = decoded[index].dense_rows, out[index][0]
                    if values.shape[0] != len(dense_rows):
                        continue  # the core refuses its shape, naming it, first
                    try:
                        self.core.validate_values([decoded[index].rows[r] for r in dense_rows],
                                                  values)
                    except SamplerServiceError as exc:
                        out[index] = detached(exc)
        return out

    def __call__(self, works: Sequence[StepWork]) -> list[pb.StepResponse | Exception]:
        requests = [w.request for w in works]
        with intra_op_threads(1 if self.is_small(works) else self.threads):
            results = self._run(requests, [w.deadline for w in works])
        for work, result in zip(works, results):
            if not isinstance(result, Exception):
                work.outcome["policy"] = self.policy_label(work.request)
        return results

    def policy_label(self, request: pb.StepRequest) -> str:
        """The metrics label of the policy of the sequences `request` stepped
        (`metrics.policy_label`; "(mixed)" for several). Read where the batch ran, after the
        step: no other call can have released them in between."""
        names = set()
        for sequence_id in {row.sequence_id for row in request.rows}:
            try:
                names.add(self.core.store.get(sequence_id).root.policy.name)
            except SamplerServiceError:  # cannot happen right after the step; never fails one
                continue
        return policy_label(names.pop()) if len(names) == 1 else MIXED_POLICY

    def _run(self, requests: Sequence[pb.StepRequest], deadlines: Sequence[float | None]
             ) -> list[pb.StepResponse | Exception]:
        results: list[pb.StepResponse | Exception | None] = [None] * len(requests)
        decoded: dict[int, _Decoded] = {}
        for index, request in enumerate(requests):
            try:
                decoded[index] = self.decode(request)
            except Exception as exc:
                results[index] = detached(exc)
        dense = self.dense_logits(decoded)
        calls: dict[int, StepCall] = {}
        for index, item in decoded.items():
            dense_of = dense.get(index, (None, None))
            if isinstance(dense_of, Exception):
                results[index] = dense_of
                continue
            values, statistics = dense_of
            calls[index] = item.call(values, checked=item.wire is not None and item.wire.dim() == 2,
                                     statistics=statistics, deadline=deadlines[index])
        stepped = self.core.step_calls(list(calls.values()))
        for (index, call), answers in zip(calls.items(), stepped):
            results[index] = answers if isinstance(answers, Exception) else self.encode(
                requests[index], call, answers)
        return results  # type: ignore[return-value]

    @staticmethod
    def encode(request: pb.StepRequest, call: StepCall, answers) -> pb.StepResponse:
        response = pb.StepResponse(request_id=request.request_id)
        for answer in answers:
            convert.answer_pb(response, call.rows[answer.start].sequence_id, answer)
        return response


#: A batch of fewer rows and logits than these runs on one intra-op thread: waking a second
#: one costs more than it saves (engine thread, 2 cores, 1 x 49152 greedy: 0.69 ms on two
#: threads, 0.43 on one; 4 rows 1.07 / 0.99; 8 rows 1.62 / 1.84; 64 x 128256 creative 52 /
#: 82 ms; 64 sparse rows of K = 1024, 65k logits, 10-13 / 12-20 ms).
SINGLE_THREAD_ROWS = 8
SINGLE_THREAD_ELEMENTS = 1 << 18


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for the block. The setting is the
    process's, and the thread running the batch is the only one running torch work."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class _Decoded:
    """A decoded request whose dense logits are still `wire` (as they travel)."""

    rows: list
    wire: torch.Tensor | None
    sparse_rows: tuple[int, ...]
    sparse: "SparseLogits | None"
    processed_logprobs: bool
    reference: torch.Tensor | None
    signals: dict | None
    resume_records: bool = False

    @property
    def dense_rows(self) -> tuple[int, ...]:
        listed = set(self.sparse_rows)
        # a row with k drafts has k + 1 logits rows (the core refuses drafts with sparse rows)
        total = sum(1 + len(row.drafts) for row in self.rows)
        return tuple(r for r in range(total) if r not in listed)

    def call(self, dense: torch.Tensor | None, checked: bool,
             statistics: RawStatistics | None = None, deadline: float | None = None) -> StepCall:
        """The StepCall with `dense` as its dense logits (`checked`: their values are;
        `statistics`: their raw statistics, when known)."""
        logits = StepLogits(dense, self.dense_rows, self.sparse, self.sparse_rows,
                            checked=checked, statistics=statistics)
        return StepCall(self.rows, logits, self.processed_logprobs, self.reference, self.signals,
                        deadline, self.resume_records)
