"""One step, as both clients and their streams send it: rows, transport, sparse rows, resends.

`StepExchange.step` is a sans-I/O exchange (`sampler_client.calls`): it builds the request,
places its tensors (registering regions as needed), yields the Step call and reads the answer.

Sparse rows (`sparse_top_k=K`): each row of a plain sequence goes as its K best ids and logits
plus its tail statistics (`sampler_client.sparse`); group rows (beam search, forks, CoT) and
rows of a sequence marked `dense_only` go in full, in `StepRequest.logits`. When the service
answers FAILED_PRECONDITION naming rows (BadRequest field `rows[i]`: this step's logits do not
allow it; `rows[i].policy`: the policy never runs sparse), those rows are sent again in full
in the same call (and for `.policy`, that sequence's rows from then on). Nothing was
committed by the refused request, so the resend carries the same step numbers.

Replay (`sampler_client.replay`): with a `Replay`, every request asks for resume records,
each answered step is kept in its handles' `resumption`, and a step the service failed to
answer for a restart is sent again once it is back, its sequences re-created.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, Sequence

import grpc

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client import requests
from sampler_client.calls import Exchange, Rpc
from sampler_client.errors import SamplerError, from_status
from sampler_client.replay import Replay
from sampler_client.sparse import TopKWithTail, top_k_with_tail
from sampler_client.tensors import WireTensor, stacked_rows, wire_rows
from sampler_client.transports import TensorPlacer
from sampler_client.types import Choice, GroupResult

#: Codes the service answers a step with once it read the request: its regions are free again.
#: Any other failure (a deadline, a lost connection) may leave the service still reading them.
ANSWER_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED})
_SPARSE_REFUSAL = re.compile(r"rows\[(\d+)\](\.policy)?")


def step_rows(handles: Sequence[Any]) -> list[tuple[str, int, int | None]]:
    """(id, step, branch) of every row the handles' next step sends, in order."""
    return [key for handle in handles for key in handle.row_keys()]


def choices_from(response: pb.StepResponse) -> list[Choice]:
    """The choices of a response, or the in-band error it carries, raised."""
    if response.HasField("error"):
        raise from_status(response.error)
    return [Choice.from_pb(c) for c in response.choices]


def advance(handles: Sequence[Any], response: pb.StepResponse) -> list[Choice]:
    """The choices of a response (or its error, raised), followed by every handle (and kept
    by its resumption, when the response carries resume records: one per handle, in order)."""
    choices = choices_from(response)
    results = {r.sequence_id: GroupResult.from_pb(r) for r in response.results}
    by_id: dict[str, list[Choice]] = {}
    for choice in choices:
        by_id.setdefault(choice.sequence_id, []).append(choice)
    for handle in handles:
        handle._take(by_id[handle.sequence_id], results)
    for handle, record in zip(handles, response.resume):
        if handle.resumption is not None:
            handle.resumption.took(by_id[handle.sequence_id], record)
    return choices


def sparse_refusals(error: SamplerError, sparse_rows: Sequence[int]) -> dict[int, bool] | None:
    """The rows a FAILED_PRECONDITION refuses to take sparse, each with whether for good
    (`rows[i].policy`); None when `error` is anything else (or names a row not sent sparse)."""
    if error.code != grpc.StatusCode.FAILED_PRECONDITION or not error.field_violations:
        return None
    refused: dict[int, bool] = {}
    for violation in error.field_violations:
        match = _SPARSE_REFUSAL.fullmatch(violation.field)
        if match is None or int(match[1]) not in sparse_rows:
            return None
        row = int(match[1])
        refused[row] = refused.get(row, False) or match[2] is not None
    return refused


class StepExchange:
    """Steps as one client sends them: its `placer` (transport and regions),
    `sparse_top_k` (None: every row in full) and `replay` (None: a failed step is raised)."""

    def __init__(self, placer: TensorPlacer, sparse_top_k: int | None = None,
                 replay: Replay | None = None):
        if sparse_top_k is not None and (isinstance(sparse_top_k, bool) or
                                         not isinstance(sparse_top_k, int) or sparse_top_k < 1):
            raise ValueError(f"sparse_top_k must be a positive int or None, got {sparse_top_k!r}")
        self.placer = placer
        self.sparse_top_k = sparse_top_k
        self.replay = replay

    def step(self, handles: Sequence[Any], logits: Any, *, processed_logprobs: bool = False,
             reference_logits: Any = None,
             signals: Sequence[Mapping[str, float]] | None = None) -> Exchange[list[Choice]]:
        """One token per row from `logits` [rows, vocab] (1-D for a single row): one row per
        plain sequence, `running_rows` rows per group, in the order of `handles`."""
        attempt = functools.partial(self._step_once, handles, logits,
                                    processed_logprobs=processed_logprobs,
                                    reference_logits=reference_logits, signals=signals)
        if self.replay is None:
            return (yield from attempt())
        return (yield from self.replay.run(attempt, handles, self.placer))

    def verify(self, handles: Sequence[Any], drafts: Sequence[Sequence[int]], logits: Any,
               draft_probs: Sequence[Any] | None = None, *,
               processed_logprobs: bool = False) -> Exchange[list[Choice]]:
        """One speculative verification of plain sequences and fork groups: per row of
        `handles` (one per plain sequence, `running_rows` per group, in order) its draft ids
        (k_i >= 0) and optionally its draft model's [k_i, vocab] probabilities (None: point
        masses), with `logits` [sum of (k_i + 1), vocab]; every tensor goes through the
        client's transport. Replay retries it like a step. Its choices, whose
        accepted_token_ids are the tokens each row emitted."""
        rows = len(step_rows(handles))
        drafts = [[int(t) for t in ids] for ids in drafts]
        probs = [None] * rows if draft_probs is None else list(draft_probs)
        if len(drafts) != rows or len(probs) != rows:
            raise ValueError(f"the sequences send {rows} rows: give one draft list and one "
                             f"draft_probs entry per row, not {len(drafts)} and {len(probs)}")
        if not any(drafts):
            raise ValueError("verify needs at least one draft token id")
        wires = [wire_rows(logits, sum(len(ids) + 1 for ids in drafts))] + [
            None if p is None else stacked_rows(p, len(ids)) for p, ids in zip(probs, drafts)]

        def attempt() -> Exchange[list[Choice]]:
            def build(tensors: list[pb.Tensor | None]) -> pb.StepRequest:
                return requests.verify_request(
                    step_rows(handles), drafts, tensors[0], tensors[1:],
                    processed_logprobs=processed_logprobs, resume_records=self.replay is not None)

            response, failure = yield from self._send(wires, build)
            if failure is not None:
                raise failure
            return advance(handles, response)

        if self.replay is None:
            return (yield from attempt())
        return (yield from self.replay.run(attempt, handles, self.placer))

    def _send(self, wires: Sequence[WireTensor | None],
              build: Callable[[list[pb.Tensor | None]], pb.StepRequest]
              ) -> Exchange[tuple[pb.StepResponse | None, SamplerError | None]]:
        """Places `wires`, sends the Step request `build` makes of the placed tensors, and
        frees the regions once the service has read them: (response, None) or (None, the
        failure, in-band or not)."""
        placement = yield from self.placer.place(wires)
        answered = False
        try:
            try:
                response = yield Rpc("Step", build(placement.tensors))
                answered = True
                if response.HasField("error"):
                    return None, from_status(response.error)
                return response, None
            except SamplerError as error:
                answered = error.code in ANSWER_CODES
                return None, error
        finally:
            placement.finish(answered)

    def _step_once(self, handles: Sequence[Any], logits: Any, *, processed_logprobs: bool,
                   reference_logits: Any,
                   signals: Sequence[Mapping[str, float]] | None) -> Exchange[list[Choice]]:
        """One try of `step`: sparse rows the service refuses are resent in full in it."""
        keys = step_rows(handles)
        row_handles = [handle for handle in handles for _ in handle.row_keys()]
        wire = wire_rows(logits, len(keys))
        reference = None if reference_logits is None else wire_rows(reference_logits, len(keys))
        sparse, top = self._sparse_rows(wire, row_handles)
        while True:
            def build(tensors: list[pb.Tensor | None]) -> pb.StepRequest:
                logits_pb, values_pb, reference_pb = tensors
                return requests.step_request(
                    keys, logits_pb, processed_logprobs=processed_logprobs,
                    reference_logits=reference_pb, signals=signals,
                    sparse=None if top is None else top.message(sparse, wire.shape[1], values_pb),
                    resume_records=self.replay is not None)

            response, failure = yield from self._send(
                [self._dense_rows(wire, len(keys), sparse),
                 None if top is None else top.values, reference], build)
            if failure is None:
                return advance(handles, response)
            refused = sparse_refusals(failure, sparse)
            if not refused:
                raise failure
            for row, for_good in refused.items():
                row_handles[row].dense_only |= for_good
            kept = [p for p, row in enumerate(sparse) if row not in refused]
            sparse, top = [sparse[p] for p in kept], (top.take(kept) if kept else None)

    def _sparse_rows(self, wire: WireTensor,
                     row_handles: Sequence[Any]) -> tuple[list[int], TopKWithTail | None]:
        """The rows to send sparse and their top-K with tails: rows of handles not
        `dense_only` whose values are all finite or -inf (a NaN or +inf row goes dense, so the
        service names the problem)."""
        k = self.sparse_top_k
        if (k is None or len(wire.shape) != 2 or wire.shape[0] != len(row_handles)
                or k >= wire.shape[1]):
            return [], None  # a malformed tensor goes as it is, for the service to reject
        rows = [i for i, handle in enumerate(row_handles) if not handle.dense_only]
        if not rows:
            return [], None
        top = top_k_with_tail(wire if len(rows) == len(row_handles) else wire.take_rows(rows), k)
        kept = [p for p in range(len(rows)) if top.sendable[p]]
        if not kept:
            return [], None
        return [rows[p] for p in kept], (top if len(kept) == len(rows) else top.take(kept))

    @staticmethod
    def _dense_rows(wire: WireTensor, rows: int, sparse: Sequence[int]) -> WireTensor | None:
        """`StepRequest.logits`: the rows not sent sparse (None when all are)."""
        if not sparse:
            return wire
        chosen = set(sparse)
        dense = [i for i in range(rows) if i not in chosen]
        return wire.take_rows(dense) if dense else None

    def close(self) -> Exchange[None]:
        """Unregisters and frees the client's regions."""
        yield from self.placer.close()
