"""Proto <-> domain conversions, kept at the edge so the math never sees a proto (TGI's from_pb)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from google.protobuf import struct_pb2

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import InvalidArgument, echo
from sampler_service.groups import AnswerVote, Group, GroupRecord, Hypothesis
from sampler_service.policy.processors.base import SIGNAL_NAMES
from sampler_service.service import Answer, SequenceRequest, StepRow
from sampler_service.state import SequenceState, StepRecord
from sampler_service.state.resume import ResumePoint, ResumeRecord
from sampler_service.state.sequence import ENTROPY_EMA_ALPHA


def _field_value(field, value) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    if field.message_type is not None and field.message_type.name == "StructuredOutput":
        kind = value.WhichOneof("kind")
        if kind is None:
            return {}
        return {kind: list(value.choice.values) if kind == "choice" else getattr(value, kind)}
    if field.message_type is not None:  # repeated TokenIds: ids or text (both: refused later)
        return [_token_ids_or_text(item) for item in value]
    if field.is_repeated:
        return list(value)
    if field.type == field.TYPE_FLOAT:  # 0.7 arrives as 0.699999988; keep the value the caller wrote
        return float(str(np.float32(value)))
    return value


def _token_ids_or_text(item: pb.TokenIds) -> Any:
    if item.text and item.ids:
        return {"ids": list(item.ids), "text": item.text}
    return item.text if item.text else list(item.ids)


def params_from_pb(params: pb.SamplingParams) -> dict[str, Any]:
    """The fields that are set, by their flat names (repeated fields count when non-empty)."""
    return {f.name: _field_value(f, v) for f, v in params.ListFields()}


def _plain(value: struct_pb2.Value) -> Any:
    """A Struct value as plain Python (numbers as floats, NaN and ±inf kept: the spec's
    validation names where they stand, as it does for every other bad value)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any] | None:
    """A spec Struct as a dict, None when empty. Unlike `json_format.MessageToDict`, a NaN
    or ±inf number does not raise here: `parse_policy` refuses it naming its field."""
    return {k: _plain(v) for k, v in struct.fields.items()} if struct.ListFields() else None


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def sequence_request_from_pb(config: pb.SequenceConfig) -> SequenceRequest:
    return SequenceRequest(
        sequence_id=config.sequence_id, policy=config.policy,
        policy_spec=struct_to_dict(config.policy_spec) if config.HasField("policy_spec") else None,
        params=params_from_pb(config.params), prompt_ids=tuple(config.prompt_ids),
        eos_token_ids=tuple(config.eos_token_ids), tokenizer=config.tokenizer,
        resume=resume_point_from_pb(config.resume) if config.HasField("resume") else None)


def resume_point_from_pb(resume: pb.ResumeState) -> ResumePoint:
    record = resume.record
    return ResumePoint(
        output_ids=tuple(resume.output_ids),
        stats=tuple((s.entropy, s.varentropy) for s in resume.stats),
        record=ResumeRecord(record.sequence_id, record.position, record.policy_hash, record.seed,
                            struct_to_dict(record.state) or {}, record.version)
        if resume.HasField("record") else None)


def resume_record_pb(record: ResumeRecord) -> pb.ResumeRecord:
    message = pb.ResumeRecord(sequence_id=record.sequence_id, version=record.version,
                              position=record.position, policy_hash=record.policy_hash,
                              seed=record.seed)
    message.state.update(record.state)
    return message


#: The values each worker signal may take (entropix's attention metrics, all >= 0): the
#: entropy of attention rows (bits, <= log2 of the context length) and its variance across
#: heads, the mean absolute difference of attention probabilities from their head mean
#: (<= 1) and the mean |attention score|, which entropix's own mask value (-0.7 x float32's
#: max) can make huge. Bounds leave room for other definitions while keeping the quadrant
#: rules' temperatures and top-k values finite.
SIGNAL_RANGES = {"attention_entropy": (0.0, 1e6), "attention_varentropy": (0.0, 1e6),
                 "agreement": (0.0, 1e6),
                 "interaction_strength": (0.0, float(np.finfo(np.float32).max))}


def signals_from_pb(request: pb.StepRequest, device) -> dict[str, torch.Tensor] | None:
    """Per-row worker signals as name -> [rows] float32 (unset fields 0), or None if none sent.
    Each value must be finite and in its `SIGNAL_RANGES` range: InvalidArgument names
    `signals[i].name` otherwise."""
    if not request.signals:
        return None
    if len(request.signals) != len(request.rows):
        raise InvalidArgument(f"signals has {len(request.signals)} entries for {len(request.rows)} "
                              "rows: send one per row or none", "signals")
    columns = {name: [getattr(s, name) for s in request.signals] for name in SIGNAL_NAMES}
    for name, values in columns.items():
        low, high = SIGNAL_RANGES[name]
        for row, value in enumerate(values):
            if not (math.isfinite(value) and low <= value <= high):
                problem = "must be finite" if not math.isfinite(value) else \
                    f"must be in [{low:g}, {high:g}]"
                raise InvalidArgument(f"signals[{row}].{name} = {value:g} {problem} (row {row}, "
                                      f"sequence {echo(request.rows[row].sequence_id)})",
                                      f"signals[{row}].{name}")
    return {name: torch.tensor(values, dtype=torch.float32, device=device)
            for name, values in columns.items()}


def step_rows_from_pb(rows, decode) -> list[StepRow]:
    """The rows; `decode(tensor, field)` decodes a row's draft_probs (inline or in a region)
    to float32 on the CPU."""
    out = []
    for i, r in enumerate(rows):
        probs = decode(r.draft_probs, f"rows[{i}].draft_probs") if r.HasField("draft_probs") \
            else None
        out.append(StepRow(r.sequence_id, r.step if r.HasField("step") else None,
                           r.branch if r.HasField("branch") else None,
                           tuple(r.draft_token_ids), probs))
    return out


def version_pb(state: SequenceState) -> pb.PolicyVersion:
    return pb.PolicyVersion(number=state.policy.version.number, hash=state.policy.version.hash)


def created_pb(entry: SequenceState | Group) -> pb.CreatedSequence:
    group = isinstance(entry, Group)
    state = entry.root if group else entry
    return pb.CreatedSequence(sequence_id=state.sequence_id, policy=state.policy.name,
                              policy_version=version_pb(state), seed=state.seed,
                              group_kind=entry.kind if group else "",
                              running_rows=entry.running_rows if group else 1)


def _logprobs_pb(pairs) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in pairs]


def choice_pb(sequence_id: str, parent_row: int, record: StepRecord, branch: int = 0) -> pb.Choice:
    choice = pb.Choice(
        sequence_id=sequence_id, parent_row=parent_row, branch=branch, score=record.score,
        step=record.step, token_id=record.token_id,
        logprob=record.logprob, top_logprobs=_logprobs_pb(record.top_logprobs),
        stats=pb.StepStats(entropy=record.entropy, varentropy=record.varentropy),
        finished=record.finished, finish_reason=int(record.finish_reason),
        processed_top_logprobs=_logprobs_pb(record.processed_top_logprobs),
        accepted_token_ids=record.accepted_token_ids,
        accepted_stats=[pb.StepStats(entropy=e, varentropy=v) for e, v in record.accepted_stats])
    if record.processed_stats is not None:
        choice.processed_stats.entropy, choice.processed_stats.varentropy = record.processed_stats
    if record.stop_token_id is not None:
        choice.stop_token_id = record.stop_token_id
    if record.processed_logprob is not None:
        choice.processed_logprob = record.processed_logprob
    if record.explanation:
        choice.explanation.update(record.explanation)
    if record.stop_string is not None:
        choice.stop_string = record.stop_string
    return choice


def hypothesis_pb(h: Hypothesis) -> pb.Hypothesis:
    message = pb.Hypothesis(token_ids=h.token_ids, score=h.score, sum_logprobs=h.sum_logprobs,
                            finish_reason=int(h.finish_reason), branch=h.branch,
                            answer_ids=h.answer_ids,
                            stats=[pb.StepStats(entropy=e, varentropy=v)
                                   for e, v in zip(h.entropies, h.varentropies)])
    if h.confidence is not None:
        message.confidence = h.confidence
    return message


def vote_pb(vote: AnswerVote) -> pb.AnswerVote:
    return pb.AnswerVote(answer_ids=vote.answer_ids, total_confidence=vote.total_confidence,
                         paths=vote.paths)


def answer_pb(response: pb.StepResponse, sequence_id: str, answer: Answer) -> None:
    """Adds one sequence's or group's answer to `response`: its choices (parent rows are
    request-wide row indices) and, for a group that finished, its result."""
    start, record = answer.start, answer.record
    if answer.resume is not None:
        response.resume.append(resume_record_pb(answer.resume))
    if not isinstance(record, GroupRecord):
        response.choices.append(choice_pb(sequence_id, start, record))
        return
    response.choices.extend(choice_pb(sequence_id, start + row.parent, row, branch)
                            for branch, row in enumerate(record.rows))
    if record.result is not None:
        response.results.append(pb.GroupResult(
            sequence_id=sequence_id,
            hypotheses=[hypothesis_pb(h) for h in record.result.hypotheses],
            answers=[vote_pb(v) for v in record.result.answers]))


def group_info_pb(group: Group) -> pb.GroupInfo:
    return pb.GroupInfo(kind=group.kind, running_rows=0 if group.finished else group.running_rows,
                        running=[] if group.finished else [hypothesis_pb(h) for h in group.running()],
                        hypotheses=[hypothesis_pb(h) for h in group.hypotheses()],
                        answers=[vote_pb(v) for v in group.answers()])


def sequence_info_pb(entry: SequenceState | Group) -> pb.SequenceInfo:
    if isinstance(entry, Group):
        root = entry.root
        info = pb.SequenceInfo(
            sequence_id=root.sequence_id, policy=root.policy.name, policy_version=version_pb(root),
            prompt_ids=root.prompt_ids, finished=entry.finished, seed=root.seed,
            resolved_spec=dict_to_struct(root.policy.spec()), vocab_size=root.vocab_size,
            group=group_info_pb(entry), split=root.policy.split, tokenizer_id=root.tokenizer_id)
        return info
    state = entry
    info = pb.SequenceInfo(
        sequence_id=state.sequence_id, policy=state.policy.name, policy_version=version_pb(state),
        prompt_ids=state.prompt_ids, output_ids=state.output_ids,
        stats=[pb.StepStats(entropy=h, varentropy=v)
               for h, v in zip(state.entropies, state.varentropies)],
        finished=state.finished, finish_reason=int(state.finish_reason), seed=state.seed,
        resolved_spec=dict_to_struct(state.policy.spec()), vocab_size=state.vocab_size,
        entropy_summary=pb.EntropySummary(
            mean_entropy=state.mean_entropy, mean_varentropy=state.mean_varentropy,
            ema_entropy=state.ema_entropy, ema_varentropy=state.ema_varentropy,
            ema_alpha=ENTROPY_EMA_ALPHA),
        split=state.policy.split, text=state.output_text(),
        stop_string=state.stop_string or "", tokenizer_id=state.tokenizer_id)
    if state.stop_token_id is not None:
        info.stop_token_id = state.stop_token_id
    return info
