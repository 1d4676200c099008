"""Plain result types of the SDK, converted from protos once at the edge."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from sampler_proto.sampler.v1 import sampler_pb2 as pb

_FINISH = {pb.FINISH_REASON_UNSPECIFIED: None, pb.STOP: "stop", pb.LENGTH: "length"}


def _pairs(logprobs) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for t in logprobs]


@dataclass(frozen=True)
class Choice:
    """The token chosen for one row. `finish_reason` is None, "stop" or "length" (vLLM's)."""

    sequence_id: str
    parent_row: int
    step: int
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    entropy: float
    varentropy: float
    finished: bool
    finish_reason: str | None
    stop_token_id: int | None
    processed_logprob: float | None
    processed_top_logprobs: list[tuple[int, float]]
    processed_entropy: float | None
    processed_varentropy: float | None

    @classmethod
    def from_pb(cls, c: pb.Choice) -> "Choice":
        return cls(sequence_id=c.sequence_id, parent_row=c.parent_row, step=c.step,
                   token_id=c.token_id, logprob=c.logprob, top_logprobs=_pairs(c.top_logprobs),
                   entropy=c.stats.entropy, varentropy=c.stats.varentropy, finished=c.finished,
                   finish_reason=_FINISH[c.finish_reason],
                   stop_token_id=c.stop_token_id if c.HasField("stop_token_id") else None,
                   processed_logprob=c.processed_logprob if c.HasField("processed_logprob") else None,
                   processed_top_logprobs=_pairs(c.processed_top_logprobs),
                   processed_entropy=c.processed_stats.entropy if c.HasField("processed_stats") else None,
                   processed_varentropy=(c.processed_stats.varentropy
                                         if c.HasField("processed_stats") else None))


@dataclass(frozen=True)
class SequenceInfo:
    """A sequence's whole state as GetSequence reports it."""

    sequence_id: str
    policy: str
    policy_version: tuple[int, str]
    prompt_ids: list[int]
    output_ids: list[int]
    entropies: list[float]
    varentropies: list[float]
    finished: bool
    finish_reason: str | None
    stop_token_id: int | None
    seed: int
    resolved_spec: dict[str, Any]
    vocab_size: int

    @classmethod
    def from_pb(cls, s: pb.SequenceInfo) -> "SequenceInfo":
        return cls(sequence_id=s.sequence_id, policy=s.policy,
                   policy_version=(s.policy_version.number, s.policy_version.hash),
                   prompt_ids=list(s.prompt_ids), output_ids=list(s.output_ids),
                   entropies=[x.entropy for x in s.stats], varentropies=[x.varentropy for x in s.stats],
                   finished=s.finished, finish_reason=_FINISH[s.finish_reason],
                   stop_token_id=s.stop_token_id if s.HasField("stop_token_id") else None,
                   seed=s.seed, resolved_spec=json_format.MessageToDict(s.resolved_spec),
                   vocab_size=s.vocab_size)
