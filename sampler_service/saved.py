"""What the service keeps of its sequences across a restart, as domain data (no protos).

`serve --state-dir` (docs/state-dir.md) writes each live sequence or group as a
`SavedSequence` in its snapshots, and every committed change to its journal through a
`CommitLog`: a `SavedSequence` per creation, a `SavedStep` per step of a sequence or group,
and the ids of released or evicted ones. `SavedState` applies those changes, in order, to
the snapshot's sequences; `SamplerCore.restore` brings the result back to life through the
resume path clients use (`sampler_service.state.resume`). The proto codec is
`sampler_service.server.state_codec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Iterable, Mapping, Protocol, Sequence

from sampler_service.groups import Group, GroupRecord
from sampler_service.policy.resolved import PolicyVersion, ResolvedPolicy
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState, StepRecord
from sampler_service.state.resume import ResumePoint, ResumeRecord


@dataclass(frozen=True)
class SavedPolicy:
    """The policy version a sequence pinned. `source` is the live policy (`of`), or its
    resolved values read back from a file; `spec` gives those values as plain data (what
    GetSequence reports as `resolved_spec`), computed from a live policy when first read, so
    that `of`, which runs under the core's lock, stays cheap."""

    name: str
    version: PolicyVersion
    source: ResolvedPolicy | Mapping[str, Any] = field(repr=False)
    split: str = ""
    follow_latest: bool = False
    #: The request's overrides by flat name.
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, policy: ResolvedPolicy) -> "SavedPolicy":
        return cls(policy.name, policy.version, policy, policy.split, policy.follow_latest,
                   policy.overrides)

    @cached_property
    def spec(self) -> Mapping[str, Any]:
        return self.source.spec() if isinstance(self.source, ResolvedPolicy) else self.source

    def resolved(self) -> ResolvedPolicy:
        """The pinned policy rebuilt from `spec`, with its version, split, follow_latest and
        overrides: the stages and values the sequence ran on. InvalidArgument when the spec
        no longer parses (a plug-in stage that is not installed any more)."""
        spec = parse_policy(self.name, dict(self.spec), "spec")
        policy = resolve(spec, self.version, {}, split=self.split)
        return replace(policy, follow_latest=self.follow_latest, overrides=dict(self.overrides))


@dataclass
class SavedSequence:
    """A live sequence or group: its policy, prompt, EOS ids, resume record (`record`: the
    position and seed too), and for a plain sequence its tokens and their raw (entropy,
    varentropy); the vocabulary it stepped with (0 before a step) and its last step's answer
    (`last_record`: None before a step), which a retry of that step gets again."""

    sequence_id: str
    policy: SavedPolicy
    prompt_ids: tuple[int, ...]
    eos_token_ids: tuple[int, ...]
    record: ResumeRecord
    output_ids: list[int] = field(default_factory=list)
    stats: list[tuple[float, float]] = field(default_factory=list)
    vocab_size: int = 0
    last_record: StepRecord | GroupRecord | None = None
    tokenizer_id: str = ""

    @classmethod
    def of(cls, entry: SequenceState | Group) -> "SavedSequence":
        """The sequence or group as it stands (copies: it may change afterwards)."""
        root = entry.root
        saved = cls(entry.sequence_id, SavedPolicy.of(root.policy), root.prompt_ids,
                    tuple(sorted(root.eos_token_ids)), entry.resume_record(),
                    vocab_size=root.vocab_size, last_record=entry.last_record,
                    tokenizer_id=root.tokenizer_id)
        if not isinstance(entry, Group):
            saved.output_ids = list(entry.output_ids)
            saved.stats = list(zip(entry.entropies, entry.varentropies))
        return saved

    @property
    def point(self) -> ResumePoint:
        """Where `SequenceState.resume` / `Group.resume` put it back."""
        return ResumePoint(tuple(self.output_ids), tuple(self.stats), self.record)


@dataclass(frozen=True)
class SavedStep:
    """One committed step of the sequence or group `record.sequence_id`: its resume record
    after the step, its answer, the vocabulary, and `policy` when the step moved a
    follow_latest sequence to another version (else None)."""

    record: ResumeRecord
    answer: StepRecord | GroupRecord
    vocab_size: int
    policy: SavedPolicy | None = None

    @classmethod
    def of(cls, entry: SequenceState | Group, answer: StepRecord | GroupRecord,
           record: ResumeRecord | None, moved: bool) -> "SavedStep":
        """The step `entry` just committed (`record`: its resume record, when already made)."""
        root = entry.root
        return cls(entry.resume_record() if record is None else record, answer,
                   root.vocab_size, SavedPolicy.of(root.policy) if moved else None)


class CommitLog(Protocol):
    """Where the core reports committed changes (a journal), each before its answer returns,
    all under the core's lock: in commit order."""

    def created(self, sequences: Sequence[SavedSequence]) -> None: ...

    def stepped(self, steps: Sequence[SavedStep]) -> None: ...

    def released(self, sequence_ids: Sequence[str]) -> None:
        """Released by a caller, or evicted after being idle."""

    def checkpoint(self) -> None:
        """Every sequence was just saved (`SamplerCore.checkpoint`): what follows is after."""


class SavedStateError(ValueError):
    """A change that does not fit the saved sequences (a step of an unknown sequence)."""


class SavedState:
    """Saved sequences by id, as a snapshot's sequences and the journal's changes after it
    (applied in order, through the methods named as `CommitLog`'s) leave them."""

    def __init__(self, sequences: Iterable[SavedSequence] = ()):
        self.sequences = {s.sequence_id: s for s in sequences}

    def created(self, sequences: Sequence[SavedSequence]) -> None:
        for saved in sequences:
            self.sequences[saved.sequence_id] = saved

    def stepped(self, steps: Sequence[SavedStep]) -> None:
        """A plain sequence gains the answer's token and statistics; every sequence takes the
        step's record, answer, vocabulary and moved policy."""
        for step in steps:
            saved = self.sequences.get(step.record.sequence_id)
            if saved is None:
                raise SavedStateError(f"a step of sequence {step.record.sequence_id!r}, which "
                                      "was never created or was released")
            if isinstance(step.answer, StepRecord) and step.answer.accepted_token_ids:
                saved.output_ids.extend(step.answer.accepted_token_ids)
                saved.stats.extend(step.answer.accepted_stats)
            elif isinstance(step.answer, StepRecord):
                saved.output_ids.append(step.answer.token_id)
                saved.stats.append((step.answer.entropy, step.answer.varentropy))
            saved.record, saved.last_record = step.record, step.answer
            saved.vocab_size = step.vocab_size
            if step.policy is not None:
                saved.policy = step.policy

    def released(self, sequence_ids: Sequence[str]) -> None:
        for sequence_id in sequence_ids:
            self.sequences.pop(sequence_id, None)
