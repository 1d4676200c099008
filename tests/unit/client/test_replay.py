"""sampler_client.replay: what a replaying client keeps per sequence, and how it recovers a step
from each failure (a service away, one that restarted, one restored from an older snapshot,
lost regions, a changed policy).

Replay is sans-I/O: these tests run a StepExchange with a Replay through the SDK's driver
(`run_sync`) against a scripted service that checks every call it gets, in order.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import run_sync
from sampler_client.client import SequenceHandle
from sampler_client.errors import (AlreadyExistsError, FailedPreconditionError, FieldViolation,
                                   NotFoundError, SamplerError, UnavailableError)
from sampler_client.exchange import StepExchange
from sampler_client.health import HealthCheckResponse
from sampler_client.regions import RegionRing
from sampler_client.replay import Replay, Resumption, release, sequence_info
from sampler_client.transports import TensorPlacer
from sampler_client.types import Choice

VOCAB = 8
SERVING, NOT_SERVING = HealthCheckResponse(status=1), HealthCheckResponse(status=2)


def error(kind: type, code: grpc.StatusCode, *fields: str) -> SamplerError:
    return kind(code, "scripted", tuple(FieldViolation(f, "") for f in fields))


GONE = error(UnavailableError, grpc.StatusCode.UNAVAILABLE)


def record(sequence_id: str, position: int) -> pb.ResumeRecord:
    state = struct_pb2.Struct()
    state.update({"ema_entropy": 0.5 * position})
    return pb.ResumeRecord(sequence_id=sequence_id, version=1, position=position,
                           policy_hash="h", state=state, seed=9)


def answer(request: pb.StepRequest) -> pb.StepResponse:
    """Token 3 + row index for every row, each sequence's record after the step."""
    response = pb.StepResponse()
    for i, row in enumerate(request.rows):
        response.choices.add(sequence_id=row.sequence_id, step=row.step, parent_row=i,
                             branch=i, token_id=3 + i, stats=pb.StepStats(entropy=0.25 * i,
                                                                          varentropy=0.5))
    if request.resume_records:
        for sid in dict.fromkeys(row.sequence_id for row in request.rows):
            response.resume.append(record(sid, request.rows[0].step + 1))
    return response


class Script:
    """A service that expects these calls, in order: (method, outcome) pairs, the outcome a
    response, an exception to raise, or a function of the request (`answer` for a Step)."""

    def __init__(self, *calls: tuple[str, Any]):
        self.expected = list(calls)
        self.requests: list[tuple[str, Any]] = []

    def __call__(self, rpc):
        assert self.expected, f"unexpected {rpc.method}"
        method, outcome = self.expected.pop(0)
        assert rpc.method == method, f"expected {method}, got {rpc.method}"
        self.requests.append((rpc.method, rpc.request))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome(rpc.request) if callable(outcome) else outcome

    def sent(self, method: str) -> list:
        return [request for name, request in self.requests if name == method]


def handle(name: str, group_rows: int = 0, replay: bool = True) -> SequenceHandle:
    created = pb.CreatedSequence(sequence_id=name, group_kind="beam" if group_rows else "",
                                 running_rows=group_rows or 1, seed=9)
    made = SequenceHandle(None, created)
    if replay:
        config = pb.SequenceConfig(sequence_id=name, policy="creative", prompt_ids=[1, 2])
        made.resumption = Resumption(config, plain=not group_rows)
    return made


@pytest.fixture
def pauses(monkeypatch) -> list[float]:
    """The driver's pauses, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


def exchange(timeout: float = 60.0, clock: Callable[[], float] = time.monotonic,
             transport: str = "inline") -> StepExchange:
    return StepExchange(TensorPlacer("127.0.0.1:1", transport), replay=Replay(timeout, clock))


def step(steps: StepExchange, handles, service) -> list[Choice]:
    rows = sum(h.running_rows if h.group_kind else 1 for h in handles)
    return run_sync(steps.step(handles, np.zeros((rows, VOCAB), np.float32)), service)


def test_a_plain_sequence_keeps_its_ids_stats_and_last_record_and_resumes_from_them():
    steps, seq = exchange(), handle("a")
    assert seq.resumption.config_now() == seq.resumption.config  # before a step: as created
    step(steps, [seq], Script(("Step", answer)))
    step(steps, [seq], Script(("Step", answer)))
    config = seq.resumption.config_now()
    assert list(config.resume.output_ids) == [3, 3]
    assert [(s.entropy, s.varentropy) for s in config.resume.stats] == [(0.0, 0.5)] * 2
    assert config.resume.record == record("a", 2)
    assert (config.sequence_id, config.policy, list(config.prompt_ids)) == ("a", "creative", [1, 2])


def test_a_group_keeps_only_its_last_record():
    steps, beams = exchange(), handle("b", group_rows=2)
    step(steps, [beams], Script(("Step", answer)))
    config = beams.resumption.config_now()
    assert list(config.resume.output_ids) == [] and list(config.resume.stats) == []
    assert config.resume.record == record("b", 1)


def test_every_step_asks_for_records_only_with_replay():
    service = Script(("Step", answer), ("Step", answer))
    step(exchange(), [handle("a")], service)
    run_sync(StepExchange(TensorPlacer("127.0.0.1:1", "inline")).step(
        [handle("b", replay=False)], np.zeros((1, VOCAB), np.float32)), service)
    assert [r.resume_records for r in service.sent("Step")] == [True, False]


def test_a_restart_is_waited_for_then_the_sequences_are_recreated_where_they_stood(pauses):
    steps, a, b = exchange(), handle("a"), handle("b")
    step(steps, [a, b], Script(("Step", answer)))
    service = Script(("Step", GONE), ("Check", GONE), ("Check", NOT_SERVING), ("Check", SERVING),
                     ("Step", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                    "rows[0].sequence_id")),
                     ("CreateSequences", pb.CreateSequencesResponse(sequences=[
                         pb.CreatedSequence(sequence_id="a", seed=9),
                         pb.CreatedSequence(sequence_id="b", seed=9)])),
                     ("Step", answer))
    choices = step(steps, [a, b], service)
    assert [(c.sequence_id, c.step) for c in choices] == [("a", 1), ("b", 1)]
    assert pauses == [0.05, 0.1]  # after the failed and the NOT_SERVING checks
    steps_sent = service.sent("Step")
    assert steps_sent[0] == steps_sent[1] == steps_sent[2]  # the same step numbers each time
    created = service.sent("CreateSequences")[0].sequences
    assert [list(c.resume.output_ids) for c in created] == [[3], [4]]
    assert [[s.entropy for s in c.resume.stats] for c in created] == [[0.0], [0.25]]
    assert [c.resume.record for c in created] == [record("a", 1), record("b", 1)]
    assert list(a.resumption.output_ids) == [3, 3] and a.next_step == 2


def test_a_sequence_the_service_still_has_is_left_as_it_is():
    steps, a, b = exchange(), handle("a"), handle("b")
    service = Script(("Step", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                    "rows[1].sequence_id")),
                     ("CreateSequences", error(AlreadyExistsError,
                                               grpc.StatusCode.ALREADY_EXISTS,
                                               "sequences[0].sequence_id")),
                     ("CreateSequences", pb.CreateSequencesResponse(sequences=[
                         pb.CreatedSequence(sequence_id="b", seed=4)])),
                     ("Step", answer))
    step(steps, [a, b], service)
    assert [[c.sequence_id for c in r.sequences] for r in service.sent("CreateSequences")] == [
        ["a", "b"], ["b"]]
    assert (a.seed, b.seed) == (9, 4)  # b had no step yet: the service drew its seed anew


def test_a_sequence_restored_at_another_step_is_released_and_recreated(pauses):
    """A service restored from an older snapshot has the sequence, at an earlier step."""
    steps, a, b = exchange(), handle("a"), handle("b")
    step(steps, [a, b], Script(("Step", answer)))
    step(steps, [a, b], Script(("Step", answer)))
    behind = error(FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, "rows[1].step")
    service = Script(("Step", GONE), ("Check", SERVING), ("Step", behind),
                     ("ReleaseSequences", pb.ReleaseSequencesResponse()),
                     ("CreateSequences", pb.CreateSequencesResponse(sequences=[
                         pb.CreatedSequence(sequence_id="b", seed=9)])),
                     ("Step", answer))
    step(steps, [a, b], service)
    assert list(service.sent("ReleaseSequences")[0].sequence_ids) == ["b"]
    assert list(service.sent("CreateSequences")[0].sequences[0].resume.output_ids) == [4, 4]


def test_a_wrong_step_number_outside_a_replay_is_the_callers_error():
    behind = error(FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, "rows[0].step")
    with pytest.raises(FailedPreconditionError):
        step(exchange(), [handle("a")], Script(("Step", behind)))


def test_a_refused_recreation_is_raised_as_it_is():
    """The policy changed while the service was away: its tokens would differ."""
    changed = error(FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION,
                    "sequences[0].resume.record.policy_hash")
    service = Script(("Step", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                    "rows[0].sequence_id")),
                     ("CreateSequences", changed))
    with pytest.raises(FailedPreconditionError) as raised:
        step(exchange(), [handle("a")], service)
    assert raised.value is changed


def test_a_sequence_the_client_does_not_keep_is_not_recreated():
    lost = error(NotFoundError, grpc.StatusCode.NOT_FOUND, "rows[0].sequence_id")
    with pytest.raises(NotFoundError):
        step(exchange(), [handle("a", replay=False)], Script(("Step", lost)))


def test_the_service_must_be_back_within_the_timeout(monkeypatch):
    """Health checks answered NOT_SERVING, with a doubling pause between them, until the
    timeout (1 s of a clock the pauses advance) runs out."""
    now, pauses = [0.0], []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(time, "sleep", sleep)
    service = Script(("Step", GONE), *[("Check", NOT_SERVING)] * 10)
    with pytest.raises(UnavailableError, match=r"not back within replay_timeout \(1 s\)"):
        step(exchange(timeout=1.0, clock=lambda: now[0]), [handle("a")], service)
    assert pauses[:4] == [0.05, 0.1, 0.2, 0.4]
    assert sum(pauses) == pytest.approx(1.0)  # the last pause ends at the deadline


def test_lost_regions_are_made_and_registered_anew(pauses):
    steps, seq = exchange(transport="shm"), handle("a")
    registered = pb.RegisterRegionResponse()
    first = Script(("RegisterSystemRegion", registered), ("Step", answer))
    step(steps, [seq], first)
    lost = error(NotFoundError, grpc.StatusCode.NOT_FOUND, "logits.shared_memory.region")
    service = Script(("Step", lost), ("RegisterSystemRegion", registered), ("Step", answer))
    step(steps, [seq], service)
    old, new = first.sent("RegisterSystemRegion")[0], service.sent("RegisterSystemRegion")[0]
    assert new.name != old.name and new.key != old.key  # a new region: no name can clash
    assert [r.logits.shared_memory.region for r in service.sent("Step")] == [old.name, new.name]
    assert not os.path.exists(f"/dev/shm/{old.key}")  # the old one was freed
    run_sync(steps.close(), Script(("UnregisterRegion", pb.UnregisterRegionResponse())))


def test_renewing_a_ring_keeps_the_regions_lent_now():
    ring = RegionRing(2)
    lent, idle = ring.acquire(10), ring.acquire(10)
    lent.region, idle.region = "in flight", "idle"
    ring.release(idle)
    assert ring.renew() == ["idle"]
    assert (lent.region, idle.region) == ("in flight", None)


def test_an_unanswered_registration_is_retried_not_given_up(pauses):
    """auto gives shared memory up when the service refuses it, not when it is away."""
    steps = StepExchange(TensorPlacer("127.0.0.1:1", "auto"), replay=Replay())
    service = Script(("RegisterSystemRegion", GONE), ("Check", SERVING),
                     ("RegisterSystemRegion", pb.RegisterRegionResponse()), ("Step", answer))
    step(steps, [handle("a")], service)
    assert service.sent("Step")[0].logits.HasField("shared_memory")
    run_sync(steps.close(), Script(("UnregisterRegion", pb.UnregisterRegionResponse())))


def test_release_reports_not_found_only_what_replay_did_not_keep():
    kept, other = handle("a"), handle("b", replay=False)
    service = Script(("ReleaseSequences", pb.ReleaseSequencesResponse(not_found=["a", "b", "c"])))
    assert run_sync(release([kept, other, "c"]), service) == ["b", "c"]
    assert kept.resumption is None  # forgotten: nothing kept for a released sequence


def test_a_step_racing_its_release_is_not_replayed():
    """The release drops the handle's resumption before it is sent: the racing step's
    NOT_FOUND is the caller's own doing, and re-creating the sequence would leak it."""
    seq = handle("a")

    class Racing(Script):
        def __call__(self, rpc):
            if rpc.method == "ReleaseSequences":
                assert seq.resumption is None  # already dropped when the call goes out
            return super().__call__(rpc)

    run_sync(release([seq]), Racing(("ReleaseSequences", pb.ReleaseSequencesResponse())))
    steps = StepExchange(TensorPlacer("127.0.0.1:1", "inline"), replay=Replay())
    with pytest.raises(NotFoundError):
        step(steps, [seq], Script(("Step", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                                "rows[0].sequence_id"))))


def test_info_of_a_lost_sequence_recreates_it():
    seq = handle("a")
    lost = error(NotFoundError, grpc.StatusCode.NOT_FOUND, "sequence_id")
    info = pb.SequenceInfo(sequence_id="a")
    service = Script(("GetSequence", lost),
                     ("CreateSequences", pb.CreateSequencesResponse(sequences=[
                         pb.CreatedSequence(sequence_id="a", seed=9)])),
                     ("GetSequence", info))
    assert run_sync(sequence_info(seq), service) == info
    with pytest.raises(NotFoundError):  # an id alone: nothing kept to re-create it from
        run_sync(sequence_info("a"), Script(("GetSequence", lost)))


def test_replay_timeout_must_be_positive():
    with pytest.raises(ValueError, match="replay_timeout"):
        Replay(0)


def test_a_tokenizer_the_restarted_service_forgot_is_registered_again():
    steps, seq = exchange(), handle("a")
    registration = pb.RegisterTokenizerRequest(name="toy", tokens=[b"a", b"b"])
    seq.resumption.tokenizer = registration
    service = Script(("Step", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                    "rows[0].sequence_id")),
                     ("CreateSequences", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                               "sequences[0].tokenizer")),
                     ("RegisterTokenizer", pb.RegisterTokenizerResponse(tokenizer_id="t")),
                     ("CreateSequences", pb.CreateSequencesResponse(sequences=[
                         pb.CreatedSequence(sequence_id="a", seed=9)])),
                     ("Step", answer))
    assert [c.sequence_id for c in step(steps, [seq], service)] == ["a"]
    assert service.sent("RegisterTokenizer") == [registration]


def test_a_tokenizer_this_client_did_not_register_is_not_guessed():
    steps, seq = exchange(), handle("a")
    service = Script(("Step", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                    "rows[0].sequence_id")),
                     ("CreateSequences", error(NotFoundError, grpc.StatusCode.NOT_FOUND,
                                               "sequences[0].tokenizer")))
    with pytest.raises(NotFoundError):
        step(steps, [seq], service)
