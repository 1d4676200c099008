"""sampler_client.exchange: what a step sends (dense rows, sparse rows, groups in full), the
automatic resend of refused sparse rows, and when a step's regions are free again.

The exchange is sans-I/O: these tests run it with the SDK's driver (`run_sync`) and answer
its Step calls greedily from the data they carry, so a wrong row gives a wrong token.
"""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import run_sync
from sampler_client.client import SequenceHandle
from sampler_client.errors import (FailedPreconditionError, FieldViolation, InvalidArgumentError,
                                   SamplerError)
from sampler_client.exchange import StepExchange, sparse_refusals
from sampler_client.transports import TensorPlacer

VOCAB = 12
LOGITS = np.random.default_rng(7).standard_normal((4, VOCAB)).astype(np.float32) * 3


def handle(name: str, group_rows: int = 0) -> SequenceHandle:
    return SequenceHandle(None, pb.CreatedSequence(
        sequence_id=name, group_kind="beam" if group_rows else "", running_rows=group_rows or 1))


def row_values(request: pb.StepRequest) -> list[np.ndarray]:
    """Each request row as the service would rebuild it: dense rows whole, sparse rows as
    their sent entries (the rest -inf)."""
    sparse_rows = list(request.sparse.rows)
    dense = iter(np.frombuffer(request.logits.raw, "<f4").reshape(-1, VOCAB)
                 if request.HasField("logits") else [])
    if sparse_rows:
        k = len(request.sparse.token_ids) // 4 // len(sparse_rows)
        ids = np.frombuffer(request.sparse.token_ids, "<i4").reshape(-1, k)
        values = np.frombuffer(request.sparse.logits.raw, "<f4").reshape(-1, k)
    rows = []
    for i in range(len(request.rows)):
        if i in sparse_rows:
            row = np.full(VOCAB, -np.inf, np.float32)
            row[ids[sparse_rows.index(i)]] = values[sparse_rows.index(i)]
            rows.append(row)
        else:
            rows.append(next(dense))
    return rows


class GreedyService:
    """Answers Step with each row's argmax; `refusals` holds errors (or in-band statuses) to
    answer the next calls with, first; `requests` records every Step request."""

    def __init__(self, *refusals):
        self.refusals = list(refusals)
        self.requests: list[pb.StepRequest] = []

    def __call__(self, rpc):
        if rpc.method != "Step":
            return pb.RegisterRegionResponse() if rpc.method.startswith("Register") \
                else pb.UnregisterRegionResponse()
        self.requests.append(rpc.request)
        if self.refusals:
            refusal = self.refusals.pop(0)
            if isinstance(refusal, status_pb2.Status):
                return pb.StepResponse(error=refusal)
            raise refusal
        return pb.StepResponse(choices=[
            pb.Choice(sequence_id=r.sequence_id, step=r.step, parent_row=i,
                      token_id=int(np.argmax(values)))
            for i, (r, values) in enumerate(zip(rpc.request.rows, row_values(rpc.request)))])


def refusal(*fields: str) -> FailedPreconditionError:
    return FailedPreconditionError(grpc.StatusCode.FAILED_PRECONDITION, "cannot run sparse",
                                   tuple(FieldViolation(f, "send it in full") for f in fields))


def step(exchange: StepExchange, service: GreedyService, handles, logits, **options):
    return run_sync(exchange.step(handles, logits, **options), service)


@pytest.fixture
def exchanges():
    """make(sparse_top_k, transport) -> a StepExchange whose regions are freed afterwards."""
    made: list[StepExchange] = []

    def make(sparse_top_k: int | None = None, transport: str = "inline") -> StepExchange:
        made.append(StepExchange(TensorPlacer("127.0.0.1:1", transport), sparse_top_k))
        return made[-1]

    yield make
    for exchange in made:
        run_sync(exchange.close(), GreedyService())


def test_dense_rows_travel_whole_and_every_handle_advances(exchanges):
    service = GreedyService()
    handles = [handle("a"), handle("b")]
    choices = step(exchanges(), service, handles, LOGITS[:2])
    (request,) = service.requests
    assert [(r.sequence_id, r.step) for r in request.rows] == [("a", 0), ("b", 0)]
    assert request.logits.raw == LOGITS[:2].tobytes() and not request.HasField("sparse")
    assert [c.token_id for c in choices] == LOGITS[:2].argmax(1).tolist()
    assert [h.next_step for h in handles] == [1, 1]
    step(exchanges(), service, handles[:1], LOGITS[2])  # a 1-D row for one sequence
    assert list(service.requests[-1].logits.shape) == [1, VOCAB]


def test_sparse_rows_carry_the_k_best_and_their_tails(exchanges):
    service = GreedyService()
    choices = step(exchanges(sparse_top_k=3), service, [handle("a"), handle("b")], LOGITS[:2])
    (request,) = service.requests
    assert not request.HasField("logits")
    sparse = request.sparse
    assert (list(sparse.rows), sparse.vocab_size) == ([0, 1], VOCAB)
    ids = np.frombuffer(sparse.token_ids, "<i4").reshape(2, 3)
    for row, sent, tail in zip(LOGITS[:2], ids, sparse.tails):
        assert sorted(sent.tolist()) == sorted(np.argsort(row)[-3:].tolist())
        rest = np.delete(row, sent).astype(np.float64)
        assert tail.max == rest.max()
        assert tail.log_sum_exp == pytest.approx(math.log(np.exp(rest).sum()), abs=1e-5)
    assert [c.token_id for c in choices] == LOGITS[:2].argmax(1).tolist()


def test_groups_and_dense_only_sequences_go_in_full(exchanges):
    service = GreedyService()
    plain, beams, dense_only = handle("a"), handle("g", group_rows=2), handle("c")
    dense_only.dense_only = True
    step(exchanges(sparse_top_k=2), service, [plain, beams, dense_only], LOGITS)
    (request,) = service.requests
    assert list(request.sparse.rows) == [0]
    assert request.logits.raw == LOGITS[1:].tobytes()
    assert [r.sequence_id for r in request.rows] == ["a", "g", "g", "c"]


def test_a_refused_row_is_resent_in_full_in_the_same_call(exchanges):
    service = GreedyService(refusal("rows[1]"))
    exchange, handles = exchanges(sparse_top_k=2), [handle("a"), handle("b")]
    choices = step(exchange, service, handles, LOGITS[:2])
    first, resent = service.requests
    assert list(first.sparse.rows) == [0, 1]
    assert list(resent.sparse.rows) == [0] and resent.logits.raw == LOGITS[1:2].tobytes()
    assert [r.step for r in resent.rows] == [0, 0]  # the same step, nothing was committed
    assert [c.token_id for c in choices] == LOGITS[:2].argmax(1).tolist()
    assert not handles[1].dense_only
    step(exchange, service, handles, LOGITS[2:])
    assert list(service.requests[-1].sparse.rows) == [0, 1]  # this step only


def test_a_policy_refusal_sends_that_sequence_in_full_from_then_on(exchanges):
    service = GreedyService(refusal("rows[0].policy", "rows[0]"))
    exchange, handles = exchanges(sparse_top_k=2), [handle("a"), handle("b")]
    step(exchange, service, handles, LOGITS[:2])
    assert handles[0].dense_only and not handles[1].dense_only
    step(exchange, service, handles, LOGITS[2:])
    later = service.requests[-1]
    assert list(later.sparse.rows) == [1] and later.logits.raw == LOGITS[2:3].tobytes()
    assert len(service.requests) == 3


def test_an_in_band_refusal_on_a_stream_is_resent_too(exchanges):
    bad_request = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="rows[0]", description="in full")])
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    in_band = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                message="cannot run sparse", details=[detail])
    service = GreedyService(in_band)
    choices = step(exchanges(sparse_top_k=2), service, [handle("a")], LOGITS[:1])
    assert [len(r.sparse.rows) for r in service.requests] == [1, 0]
    assert choices[0].token_id == int(LOGITS[0].argmax())


@pytest.mark.parametrize("error", [
    refusal("rows[1]"),  # a row that was sent in full
    refusal("rows[0]", "logits.shape"),  # another field too
    refusal(),  # no row named
    InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (FieldViolation("rows[0]", ""),)),
], ids=["dense-row", "other-field", "no-field", "invalid-argument"])
def test_other_failures_are_raised_as_they_are(exchanges, error):
    service = GreedyService(error)
    plain, dense_only = handle("a"), handle("b")
    dense_only.dense_only = True
    with pytest.raises(SamplerError) as raised:
        step(exchanges(sparse_top_k=2), service, [plain, dense_only], LOGITS[:2])
    assert raised.value is error and len(service.requests) == 1


def test_rows_holding_nan_go_in_full_for_the_service_to_name(exchanges):
    logits = LOGITS[:2].copy()
    logits[1, 4] = np.nan
    service = GreedyService(InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "NaN"))
    with pytest.raises(InvalidArgumentError):
        step(exchanges(sparse_top_k=2), service, [handle("a"), handle("b")], logits)
    (request,) = service.requests
    assert list(request.sparse.rows) == [0]
    assert np.isnan(np.frombuffer(request.logits.raw, "<f4")[4])


def test_a_malformed_tensor_goes_as_it_is(exchanges):
    service = GreedyService(InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "shape"))
    with pytest.raises(InvalidArgumentError):
        step(exchanges(sparse_top_k=2), service, [handle("a"), handle("b")], LOGITS[:3])
    assert list(service.requests[0].logits.shape) == [3, VOCAB]


def test_reference_logits_and_signals_travel_with_the_rows(exchanges):
    service = GreedyService()
    step(exchanges(sparse_top_k=2), service, [handle("a")], LOGITS[:1],
         reference_logits=LOGITS[1:2], signals=[{"agreement": 0.5}], processed_logprobs=True)
    (request,) = service.requests
    assert request.reference_logits.raw == LOGITS[1:2].tobytes()
    assert request.signals[0].agreement == 0.5 and request.processed_logprobs


def test_an_answered_step_frees_its_region_and_a_lost_one_retires_it(exchanges):
    exchange = exchanges(transport="shm")
    bad = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    service = GreedyService(bad, SamplerError(grpc.StatusCode.DEADLINE_EXCEEDED, "too slow"), bad)
    regions = []
    for _ in range(3):
        with pytest.raises(SamplerError):
            step(exchange, service, [handle("a")], LOGITS[:1])
        regions.append(service.requests[-1].logits.shared_memory.region)
    assert regions[0] == regions[1]  # answered (INVALID_ARGUMENT): reused
    assert regions[2] != regions[1]  # the deadline passed: the service may still read it


def test_sparse_top_k_must_be_a_positive_int():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="sparse_top_k"):
            StepExchange(TensorPlacer("127.0.0.1:1", "inline"), bad)


def test_sparse_refusals_name_rows_and_whether_for_good():
    assert sparse_refusals(refusal("rows[2]", "rows[0].policy", "rows[2].policy"), [0, 2]) == {
        2: True, 0: True}
    assert sparse_refusals(refusal("rows[1]"), [0, 1]) == {1: False}
    assert sparse_refusals(refusal("rows[1]"), [0]) is None
    assert sparse_refusals(refusal("rows[1].params"), [1]) is None


def test_verify_places_logits_and_draft_probs_and_advances_by_what_was_emitted(exchanges):
    """A verification's tensors all go through the transport (one shared-memory region), its
    rows carry their drafts; a plain sequence advances by the tokens emitted, a group by one
    step."""
    requests_seen = []

    def service(rpc):
        if rpc.method != "Step":
            return GreedyService()(rpc)
        requests_seen.append(rpc.request)
        return pb.StepResponse(choices=[
            pb.Choice(sequence_id=r.sequence_id, step=r.step, parent_row=i,
                      accepted_token_ids=[*r.draft_token_ids, 0])
            for i, r in enumerate(rpc.request.rows)])

    exchange = exchanges(transport="shm")
    plain, forks = handle("a"), SequenceHandle(None, pb.CreatedSequence(
        sequence_id="f", group_kind="fork", running_rows=2))
    q = np.full((2, VOCAB), 1 / VOCAB, np.float32)
    (choice,) = run_sync(exchange.verify([plain], [[3, 4]], LOGITS[:3], [q]), service)
    request = requests_seen[-1]
    assert request.logits.WhichOneof("data") == "shared_memory"
    assert request.rows[0].draft_probs.WhichOneof("data") == "shared_memory"
    assert request.rows[0].draft_probs.shared_memory.region == request.logits.shared_memory.region
    assert list(request.rows[0].draft_token_ids) == [3, 4] and plain.next_step == 3
    choices = run_sync(exchange.verify([forks], [[5], []], LOGITS[:3], [None, None]), service)
    request = requests_seen[-1]
    assert [list(r.draft_token_ids) for r in request.rows] == [[5], []]
    assert [r.branch for r in request.rows] == [0, 1]
    assert not request.rows[0].HasField("draft_probs")
    assert [list(c.accepted_token_ids) for c in choices] == [[5, 0], [0]] and forks.next_step == 1
    with pytest.raises(ValueError, match="one draft list"):
        run_sync(exchange.verify([forks], [[5]], LOGITS[:2]), service)
