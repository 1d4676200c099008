"""Proto <-> domain conversions, kept at the edge so the math never sees a proto (TGI's from_pb)."""
from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.service import SequenceRequest, StepRow
from sampler_service.state import SequenceState, StepRecord


def _field_value(field, value) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    if field.message_type is not None:  # repeated TokenIds
        return [list(item.ids) for item in value]
    if field.is_repeated:
        return list(value)
    if field.type == field.TYPE_FLOAT:  # 0.7 arrives as 0.699999988; keep the value the caller wrote
        return float(str(np.float32(value)))
    return value


def params_from_pb(params: pb.SamplingParams) -> dict[str, Any]:
    """The fields that are set, by their flat names (repeated fields count when non-empty)."""
    return {f.name: _field_value(f, v) for f, v in params.ListFields()}


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any] | None:
    return json_format.MessageToDict(struct) if struct.ListFields() else None


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def sequence_request_from_pb(config: pb.SequenceConfig) -> SequenceRequest:
    return SequenceRequest(
        sequence_id=config.sequence_id, policy=config.policy,
        policy_spec=struct_to_dict(config.policy_spec) if config.HasField("policy_spec") else None,
        params=params_from_pb(config.params), prompt_ids=tuple(config.prompt_ids),
        eos_token_ids=tuple(config.eos_token_ids))


def step_rows_from_pb(rows) -> list[StepRow]:
    return [StepRow(r.sequence_id, r.step if r.HasField("step") else None) for r in rows]


def version_pb(state: SequenceState) -> pb.PolicyVersion:
    return pb.PolicyVersion(number=state.policy.version.number, hash=state.policy.version.hash)


def created_pb(state: SequenceState) -> pb.CreatedSequence:
    return pb.CreatedSequence(sequence_id=state.sequence_id, policy=state.policy.name,
                              policy_version=version_pb(state), seed=state.seed)


def _logprobs_pb(pairs) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in pairs]


def choice_pb(sequence_id: str, parent_row: int, record: StepRecord) -> pb.Choice:
    choice = pb.Choice(
        sequence_id=sequence_id, parent_row=parent_row, step=record.step, token_id=record.token_id,
        logprob=record.logprob, top_logprobs=_logprobs_pb(record.top_logprobs),
        stats=pb.StepStats(entropy=record.entropy, varentropy=record.varentropy),
        finished=record.finished, finish_reason=int(record.finish_reason),
        processed_top_logprobs=_logprobs_pb(record.processed_top_logprobs))
    if record.processed_stats is not None:
        choice.processed_stats.entropy, choice.processed_stats.varentropy = record.processed_stats
    if record.stop_token_id is not None:
        choice.stop_token_id = record.stop_token_id
    if record.processed_logprob is not None:
        choice.processed_logprob = record.processed_logprob
    return choice


def sequence_info_pb(state: SequenceState) -> pb.SequenceInfo:
    info = pb.SequenceInfo(
        sequence_id=state.sequence_id, policy=state.policy.name, policy_version=version_pb(state),
        prompt_ids=state.prompt_ids, output_ids=state.output_ids,
        stats=[pb.StepStats(entropy=h, varentropy=v)
               for h, v in zip(state.entropies, state.varentropies)],
        finished=state.finished, finish_reason=int(state.finish_reason), seed=state.seed,
        resolved_spec=dict_to_struct(state.policy.spec()), vocab_size=state.vocab_size)
    if state.stop_token_id is not None:
        info.stop_token_id = state.stop_token_id
    return info
