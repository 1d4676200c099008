"""Saved sequences and journal changes (`sampler_service.saved`) <-> the persistence messages
of sampler.proto (SavedSequence, SavedStep, JournalEntry), as bytes for the state files.

Every number the service keeps travels exactly: answers' numbers are doubles (a group result's
per-token statistics are float32, as the engine computes them and answers carry them), and
plain data (a policy's spec and overrides, a resume record's state, an explanation) is JSON
text, whose integers stay integers (a seed up to 2^64 - 1) and whose doubles round trip (NaN
and ±Infinity included). Decoding checks the structure (messages that must be set are set, JSON
objects are objects, enums are known) and raises `StateDecodeError`; the values themselves are
checked when the sequence is resumed (`SamplerCore.restore`), as a client's resume record is.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from google.protobuf.message import DecodeError

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.groups import AnswerVote, GroupRecord, GroupResult, Hypothesis
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.saved import SavedPolicy, SavedSequence, SavedStep, SavedState
from sampler_service.server.convert import hypothesis_pb, vote_pb
from sampler_service.state import FinishReason, StepRecord
from sampler_service.state.resume import ResumeRecord


class StateDecodeError(ValueError):
    """A payload that is not the message it should be, or lacks what it must hold."""


# -- encoding (messages are filled in place: building and copying sub-messages costs more) --------
def sequence_bytes(saved: SavedSequence) -> bytes:
    """One snapshot frame."""
    message = pb.SavedSequence()
    _fill_sequence(message, saved)
    return message.SerializeToString()


def created_bytes(saved: SavedSequence) -> bytes:
    entry = pb.JournalEntry()
    _fill_sequence(entry.created, saved)
    return entry.SerializeToString()


def stepped_bytes(step: SavedStep) -> bytes:
    entry = pb.JournalEntry()
    message = entry.stepped
    _fill_record(message.record, step.record)
    _fill_answer(message.answer, step.answer)
    message.vocab_size = step.vocab_size
    if step.policy is not None:
        _fill_policy(message.policy, step.policy)
    return entry.SerializeToString()


def released_bytes(sequence_ids: Sequence[str]) -> bytes:
    entry = pb.JournalEntry()
    entry.released.sequence_ids.extend(sequence_ids)
    return entry.SerializeToString()


def _fill_record(message: pb.SavedRecord, record: ResumeRecord) -> None:
    message.sequence_id, message.version = record.sequence_id, record.version
    message.position, message.policy_hash = record.position, record.policy_hash
    message.seed, message.state_json = record.seed, json.dumps(record.state)


def _fill_policy(message: pb.SavedPolicy, policy: SavedPolicy) -> None:
    message.name, message.split = policy.name, policy.split
    message.version.number, message.version.hash = policy.version.number, policy.version.hash
    message.spec_json = json.dumps(policy.spec)
    message.follow_latest = policy.follow_latest
    message.overrides_json = json.dumps(dict(policy.overrides))


def _fill_row(row: pb.SavedRow, record: StepRecord) -> None:
    row.step, row.token_id, row.logprob = record.step, record.token_id, record.logprob
    row.entropy, row.varentropy = record.entropy, record.varentropy
    row.finished, row.finish_reason = record.finished, int(record.finish_reason)
    row.parent, row.score = record.parent, record.score
    for token, logprob in record.top_logprobs:
        row.top_logprobs.add(token_id=token, logprob=logprob)
    for token, logprob in record.processed_top_logprobs:
        row.processed_top_logprobs.add(token_id=token, logprob=logprob)
    if record.stop_token_id is not None:
        row.stop_token_id = record.stop_token_id
    if record.processed_logprob is not None:
        row.processed_logprob = record.processed_logprob
    if record.processed_stats is not None:
        row.processed_entropy, row.processed_varentropy = record.processed_stats
    if record.explanation:
        row.explanation_json = json.dumps(record.explanation)
    if record.stop_string is not None:
        row.stop_string = record.stop_string
    row.accepted_token_ids.extend(record.accepted_token_ids)
    row.accepted_stats.extend(pb.StepStats(entropy=e, varentropy=v)
                              for e, v in record.accepted_stats)


def _fill_answer(message: pb.SavedAnswer, answer: StepRecord | GroupRecord) -> None:
    if isinstance(answer, StepRecord):
        _fill_row(message.row, answer)
        return
    group = message.group
    group.step, group.rows_in = answer.step, answer.rows_in
    for record in answer.rows:
        _fill_row(group.rows.add(), record)
    if answer.result is not None:
        group.result.hypotheses.extend(hypothesis_pb(h) for h in answer.result.hypotheses)
        group.result.answers.extend(vote_pb(v) for v in answer.result.answers)


def _fill_sequence(message: pb.SavedSequence, saved: SavedSequence) -> None:
    message.sequence_id = saved.sequence_id
    _fill_policy(message.policy, saved.policy)
    message.prompt_ids.extend(saved.prompt_ids)
    message.eos_token_ids.extend(saved.eos_token_ids)
    message.output_ids.extend(saved.output_ids)
    message.entropies.extend(h for h, _ in saved.stats)
    message.varentropies.extend(v for _, v in saved.stats)
    _fill_record(message.record, saved.record)
    message.vocab_size = saved.vocab_size
    message.tokenizer_id = saved.tokenizer_id
    if saved.last_record is not None:
        _fill_answer(message.last_answer, saved.last_record)


# -- decoding -------------------------------------------------------------------------------------
def sequence_from_bytes(payload: bytes) -> SavedSequence:
    """A snapshot frame's sequence (StateDecodeError when it is not one)."""
    return _sequence_from_pb(_parse(pb.SavedSequence, payload))


def apply_change(payload: bytes, state: SavedState) -> None:
    """Applies one journal frame's change to `state` (StateDecodeError when it is not one)."""
    entry = _parse(pb.JournalEntry, payload)
    kind = entry.WhichOneof("change")
    if kind == "created":
        state.created([_sequence_from_pb(entry.created)])
    elif kind == "stepped":
        step = entry.stepped
        _require(step, ("record", "answer"), "SavedStep")
        state.stepped([SavedStep(
            _record_from_pb(step.record), _answer_from_pb(step.answer), step.vocab_size,
            _policy_from_pb(step.policy) if step.HasField("policy") else None)])
    elif kind == "released":
        state.released(list(entry.released.sequence_ids))
    else:
        raise StateDecodeError("a journal entry without a change")


def _parse(message_type, payload: bytes):
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise StateDecodeError(f"not a {message_type.__name__} message: {exc}") from None
    return message


def _require(message, fields: Sequence[str], what: str) -> None:
    for name in fields:
        if not message.HasField(name):
            raise StateDecodeError(f"a {what} without {name}")


def _object(text: str, what: str) -> dict[str, Any]:
    """A JSON object ("" is the empty one)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise StateDecodeError(f"{what}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StateDecodeError(f"{what}: a JSON object was expected, got {type(value).__name__}")
    return value


def _policy_from_pb(message: pb.SavedPolicy) -> SavedPolicy:
    _require(message, ("version",), "SavedPolicy")
    what = f"policy {message.name!r}"
    return SavedPolicy(message.name, PolicyVersion(message.version.number, message.version.hash),
                       _object(message.spec_json, f"{what} spec"), message.split,
                       message.follow_latest, _object(message.overrides_json, f"{what} overrides"))


def _record_from_pb(message: pb.SavedRecord) -> ResumeRecord:
    return ResumeRecord(message.sequence_id, message.position, message.policy_hash,
                        message.seed, _object(message.state_json,
                                              f"sequence {message.sequence_id!r} record state"),
                        message.version)


def _finish(value: int) -> FinishReason:
    try:
        return FinishReason(value)
    except ValueError:
        raise StateDecodeError(f"unknown finish reason {value}") from None


def _row_from_pb(row: pb.SavedRow) -> StepRecord:
    return StepRecord(
        step=row.step, token_id=row.token_id, logprob=row.logprob,
        top_logprobs=tuple((t.token_id, t.logprob) for t in row.top_logprobs),
        entropy=row.entropy, varentropy=row.varentropy, finished=row.finished,
        finish_reason=_finish(row.finish_reason),
        stop_token_id=row.stop_token_id if row.HasField("stop_token_id") else None,
        processed_logprob=row.processed_logprob if row.HasField("processed_logprob") else None,
        processed_top_logprobs=tuple((t.token_id, t.logprob) for t in row.processed_top_logprobs),
        processed_stats=((row.processed_entropy, row.processed_varentropy)
                         if row.HasField("processed_entropy") else None),
        parent=row.parent, score=row.score,
        explanation=_object(row.explanation_json, "explanation"),
        stop_string=row.stop_string if row.HasField("stop_string") else None,
        accepted_token_ids=tuple(row.accepted_token_ids),
        accepted_stats=tuple((s.entropy, s.varentropy) for s in row.accepted_stats))


def _answer_from_pb(answer: pb.SavedAnswer) -> StepRecord | GroupRecord:
    kind = answer.WhichOneof("kind")
    if kind == "row":
        return _row_from_pb(answer.row)
    if kind is None:
        raise StateDecodeError("a SavedAnswer without a row or group")
    group = answer.group
    result = None
    if group.HasField("result"):
        result = GroupResult(
            tuple(Hypothesis(tuple(h.token_ids), h.score, h.sum_logprobs,
                             _finish(h.finish_reason), h.branch,
                             h.confidence if h.HasField("confidence") else None,
                             tuple(h.answer_ids), tuple(s.entropy for s in h.stats),
                             tuple(s.varentropy for s in h.stats))
                  for h in group.result.hypotheses),
            tuple(AnswerVote(tuple(v.answer_ids), v.total_confidence, v.paths)
                  for v in group.result.answers))
    return GroupRecord(group.step, group.rows_in, tuple(_row_from_pb(r) for r in group.rows),
                       result)


def _sequence_from_pb(message: pb.SavedSequence) -> SavedSequence:
    _require(message, ("policy", "record"), "SavedSequence")
    if not len(message.entropies) == len(message.varentropies) == len(message.output_ids):
        raise StateDecodeError(f"sequence {message.sequence_id!r}: {len(message.output_ids)} "
                               f"output ids, {len(message.entropies)} entropies and "
                               f"{len(message.varentropies)} varentropies")
    return SavedSequence(
        message.sequence_id, _policy_from_pb(message.policy), tuple(message.prompt_ids),
        tuple(message.eos_token_ids), _record_from_pb(message.record),
        list(message.output_ids), list(zip(message.entropies, message.varentropies)),
        message.vocab_size,
        _answer_from_pb(message.last_answer) if message.HasField("last_answer") else None,
        message.tokenizer_id)
