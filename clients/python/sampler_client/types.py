"""Plain result types of the SDK, converted from protos once at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from sampler_proto.sampler.v1 import sampler_pb2 as pb

_FINISH = {pb.FINISH_REASON_UNSPECIFIED: None, pb.STOP: "stop", pb.LENGTH: "length"}


def _pairs(logprobs) -> list[tuple[int, float]]:
    return [(t.token_id, t.logprob) for t in logprobs]


def struct_plain(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python. Unlike `json_format.MessageToDict`, a NaN or ±inf number
    (an explanation may hold one, e.g. an infinite KL divergence) does not raise."""
    return {key: _value_plain(value) for key, value in struct.fields.items()}


def _value_plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_plain(value.struct_value)
    if kind == "list_value":
        return [_value_plain(v) for v in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)

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
    #: Index of this row among its group's rows (0 for a plain sequence).
    branch: int = 0
    #: Beam search: the running beam's score; forks and CoT: the cumulative raw logprob.
    score: float = 0.0
    #: What the policy's adaptive stages decided: {stage key: {field: value}}.
    explanation: dict[str, Any] = field(default_factory=dict)
    #: The stop string that finished the sequence at this step, if any.
    stop_string: str | None = None
    #: A speculative verification: every token emitted, in order, and their (entropy,
    #: varentropy); token_id and the other fields describe the last. Empty for a plain step.
    accepted_token_ids: list[int] = field(default_factory=list)
    accepted_stats: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def from_pb(cls, c: pb.Choice) -> "Choice":
        return cls(accepted_token_ids=list(c.accepted_token_ids),
                   accepted_stats=[(s.entropy, s.varentropy) for s in c.accepted_stats],
                   sequence_id=c.sequence_id, parent_row=c.parent_row, step=c.step,
                   branch=c.branch, score=c.score, stop_string=c.stop_string or None,
                   explanation=struct_plain(c.explanation),
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
class Hypothesis:
    """A finished candidate of a group: a beam hypothesis, a fork's sample, a CoT path (or a
    running row, in `GroupInfo.running`). `entropies` and `varentropies`: one per token, the
    raw entropy and varentropy of the distribution of the row that chose it (the `Choice`
    stats of that step), as `SequenceInfo` gives a plain sequence's."""

    token_ids: list[int]
    score: float
    sum_logprobs: float
    finish_reason: str | None
    branch: int
    confidence: float | None = None
    answer_ids: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    varentropies: list[float] = field(default_factory=list)

    @classmethod
    def from_pb(cls, h: pb.Hypothesis) -> "Hypothesis":
        return cls(token_ids=list(h.token_ids), score=h.score, sum_logprobs=h.sum_logprobs,
                   finish_reason=_FINISH[h.finish_reason], branch=h.branch,
                   confidence=h.confidence if h.HasField("confidence") else None,
                   answer_ids=list(h.answer_ids), entropies=[x.entropy for x in h.stats],
                   varentropies=[x.varentropy for x in h.stats])


@dataclass(frozen=True)
class AnswerVote:
    """CoT decoding: the paths that gave one answer span and their summed confidence."""

    answer_ids: list[int]
    total_confidence: float
    paths: int

    @classmethod
    def from_pb(cls, v: pb.AnswerVote) -> "AnswerVote":
        return cls(list(v.answer_ids), v.total_confidence, v.paths)


@dataclass(frozen=True)
class GroupResult:
    """What a finished group returns: hypotheses best first, and CoT's aggregated answers."""

    hypotheses: list[Hypothesis]
    answers: list[AnswerVote]

    @classmethod
    def from_pb(cls, r) -> "GroupResult":
        return cls([Hypothesis.from_pb(h) for h in r.hypotheses],
                   [AnswerVote.from_pb(v) for v in r.answers])


@dataclass(frozen=True)
class GroupInfo:
    """A group's state as GetSequence reports it."""

    kind: str
    running_rows: int
    running: list[Hypothesis]
    hypotheses: list[Hypothesis]
    answers: list[AnswerVote]

    @classmethod
    def from_pb(cls, g: pb.GroupInfo) -> "GroupInfo":
        result = GroupResult.from_pb(g)
        return cls(g.kind, g.running_rows, [Hypothesis.from_pb(h) for h in g.running],
                   result.hypotheses, result.answers)


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
    #: Set for a group (beam search, forks, CoT decoding).
    group: GroupInfo | None = None
    #: Running summaries of the entropy history: mean_entropy, mean_varentropy, ema_entropy,
    #: ema_varentropy, ema_alpha.
    entropy_summary: dict[str, float] = field(default_factory=dict)
    #: The A/B split that assigned the policy ("" when named directly).
    split: str = ""
    #: With a tokenizer: its id, the output as text (cut before the stop string that ended it
    #: unless include_stop_str_in_output) and that stop string.
    tokenizer_id: str = ""
    text: str = ""
    stop_string: str | None = None

    @classmethod
    def from_pb(cls, s: pb.SequenceInfo) -> "SequenceInfo":
        return cls(sequence_id=s.sequence_id, policy=s.policy,
                   policy_version=(s.policy_version.number, s.policy_version.hash),
                   prompt_ids=list(s.prompt_ids), output_ids=list(s.output_ids),
                   entropies=[x.entropy for x in s.stats], varentropies=[x.varentropy for x in s.stats],
                   finished=s.finished, finish_reason=_FINISH[s.finish_reason],
                   stop_token_id=s.stop_token_id if s.HasField("stop_token_id") else None,
                   seed=s.seed, resolved_spec=struct_plain(s.resolved_spec),
                   vocab_size=s.vocab_size,
                   group=GroupInfo.from_pb(s.group) if s.HasField("group") else None,
                   entropy_summary={f.name: getattr(s.entropy_summary, f.name)
                                    for f in pb.EntropySummary.DESCRIPTOR.fields},
                   split=s.split, tokenizer_id=s.tokenizer_id, text=s.text,
                   stop_string=s.stop_string or None)


@dataclass(frozen=True)
class RegionInfo:
    """A region registered with the service's SharedMemory API: `kind` "system" (a POSIX
    shared-memory object, `key`) or "cuda" (an allocation on `device_id`); `in_use`: steps
    reading it now."""

    name: str
    kind: str
    key: str
    offset: int
    byte_size: int
    device_id: int
    client_id: str
    in_use: int

    @classmethod
    def from_pb(cls, r: pb.RegionInfo) -> "RegionInfo":
        return cls(name=r.name, kind=r.kind, key=r.key, offset=r.offset, byte_size=r.byte_size,
                   device_id=r.device_id, client_id=r.client_id, in_use=r.in_use)
