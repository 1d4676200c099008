"""What every group is: one logical sequence that sends several rows per step.

A group (beam search, forks, CoT decoding) is created from one root `SequenceState` when its
policy's selector is a `GroupSelector` (or its settings ask for forks). Each step it receives
its running rows, in the order its previous answer gave them, and answers with output rows
that each name the input row they continue (`StepRecord.parent`), so the worker can reorder
or expand its KV cache. Rows whose choice is finished are not sent again.

A step is planned without touching the group (`plan`), and applied by `commit` only once every
unit of the request has been planned, so a failing request changes nothing.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch

from sampler_service.engine import RawRowReport, processed_reports, report_rows
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors.base import RowInputs
from sampler_service.errors import InvalidArgument
from sampler_service.state import FinishReason, SequenceState, StepRecord
from sampler_service.state.resume import (Reader, ResumePoint, ResumeRecord, checked_record,
                                          restore_row)

if TYPE_CHECKING:
    from sampler_service.engine import Engine


@dataclass(frozen=True)
class Hypothesis:
    """A finished candidate: a beam hypothesis, a fork's sample or a CoT path (or a running
    row, finish reason unset). `entropies` and `varentropies`: one per token, the raw entropy
    and varentropy (nats) of the distribution of the row that chose it (what that step's
    choices continuing the row reported as their stats); NaN for steps restored from a resume
    record that did not carry them."""

    token_ids: tuple[int, ...]
    score: float
    sum_logprobs: float
    finish_reason: FinishReason
    branch: int
    confidence: float | None = None
    answer_ids: tuple[int, ...] = ()
    entropies: tuple[float, ...] = ()
    varentropies: tuple[float, ...] = ()


@dataclass(frozen=True)
class AnswerVote:
    """CoT decoding: the paths that gave one answer span, with their summed confidence."""

    answer_ids: tuple[int, ...]
    total_confidence: float
    paths: int


@dataclass(frozen=True)
class GroupResult:
    """A finished group's hypotheses, best first, and (CoT) its aggregated answers."""

    hypotheses: tuple[Hypothesis, ...]
    answers: tuple[AnswerVote, ...] = ()


@dataclass(frozen=True)
class GroupRecord:
    """The answer of one group step, kept so that a retry of the step gets it again."""

    step: int
    rows_in: int
    rows: tuple[StepRecord, ...]
    result: GroupResult | None = None


@dataclass(frozen=True)
class GroupStep:
    """A planned step: its answer, the vocabulary it saw, and the change `Group.commit` applies."""

    record: GroupRecord
    vocab: int
    apply: Callable[[], None]


class Group(ABC):
    """One logical sequence with several rows. `root` holds the prompt, policy, seed and EOS
    ids; subclasses keep the running rows as `SequenceState`s of their own."""

    kind: ClassVar[str]

    def __init__(self, root: SequenceState):
        self.root = root
        self.sequence_id = root.sequence_id
        self.last_used = 0.0
        self.last_record: GroupRecord | None = None
        self.step_number = 0
        self.result: GroupResult | None = None

    #: Groups stay on the policy version they pinned (their rows share one plan).
    follows_latest = False
    #: A group plans its own rows (`plan`); plain sequences share the step's engine call.
    shares_engine_call = False
    finish_label = "every row finished"
    #: Why the group cannot verify speculative drafts (docs/speculative.md); None: it can,
    #: through `draft_lanes` and `plan_verified` (forks).
    drafts_refusal: ClassVar[str | None] = "its rows are chosen together, not one by one"

    @property
    def finished(self) -> bool:
        return self.result is not None

    def footprint_tokens(self) -> int:
        """Tokens the group holds: its prompt and every running or finished row's output
        (what `--max-state-bytes` counts)."""
        return (len(self.root.prompt_ids) + sum(len(h.token_ids) for h in self.running())
                + sum(len(h.token_ids) for h in self.hypotheses()))

    @property
    @abstractmethod
    def running_rows(self) -> int:
        """How many rows the next step must send."""

    @abstractmethod
    def running(self) -> list[Hypothesis]:
        """The running rows, in the order the next step sends them (finish reason unset)."""

    @abstractmethod
    def hypotheses(self) -> list[Hypothesis]:
        """Finished hypotheses so far, best first."""

    def answers(self) -> list[AnswerVote]:
        return list(self.result.answers) if self.result else []

    @abstractmethod
    def plan(self, engine: "Engine", inputs: RowInputs, processed_logprobs: bool) -> GroupStep:
        """The next step from `inputs.raw`, the logits [running_rows, vocab] (float32, on the
        engine's device), and the worker's extras for those rows. Must not change the group:
        the returned step's `apply` does."""

    def commit(self, step: GroupStep) -> GroupRecord:
        step.apply()
        self.root.vocab_size = step.vocab
        self.step_number = step.record.step + 1
        self.last_record = step.record
        self.result = step.record.result
        return step.record

    # -- resume (`sampler_service.state.resume`) -------------------------------------------------
    def resume_record(self) -> ResumeRecord:
        """What re-creates this group where it stands: its rows and their tokens included."""
        root = self.root
        return ResumeRecord(self.sequence_id, self.step_number, root.policy.version.hash,
                            root.seed, {**self.resume_state(), "vocab_size": root.vocab_size})

    def resume(self, point: ResumePoint, field: str, result: GroupResult | None = None) -> None:
        """Moves this new group to where `point.record` says it stood; `field` names the
        SequenceConfig's `resume` in errors. A client cannot resume a group whose rows all
        finished (its result came with the last step); the service's own restore can, giving
        the `result` it answered then."""
        if point.output_ids or point.stats:
            raise InvalidArgument("a group's rows and their tokens travel in its resume record; "
                                  "leave output_ids and stats empty", f"{field}.output_ids")
        if point.record is None:
            return
        record = checked_record(point, self.sequence_id, self.root.policy.version.hash, field)
        where = f"{field}.record.state"
        reader = Reader(record.state, where)
        self.load_state(reader, record.position)
        self.root.vocab_size = reader.integer("vocab_size")
        self.step_number = record.position
        self.result = result
        if self.running_rows == 0 and result is None:
            raise InvalidArgument("every row of the group had finished: its result came with its "
                                  "last step, and there is nothing left to resume", where)

    @abstractmethod
    def resume_state(self) -> dict[str, Any]:
        """The group's rows (tokens included), scores and finished hypotheses as plain data."""

    @abstractmethod
    def load_state(self, reader: Reader, position: int) -> None:
        """Takes `resume_state`'s data back into this new group (`position` steps taken)."""

    def branch_state(self, index: int, seed: int | None = None) -> SequenceState:
        """A fresh row state continuing the root (branch `index` of the group)."""
        return self.root.branch(f"{self.sequence_id}#{index}", seed)


def history(row: SequenceState) -> dict[str, tuple[float, ...]]:
    """A row's raw statistics per token, as `Hypothesis` fields."""
    return {"entropies": tuple(row.entropies), "varentropies": tuple(row.varentropies)}


def restore_branch(row: SequenceState, data: Reader, position: int, what: str,
                   verifies: bool = False) -> None:
    """Restores a fork or CoT branch from its row state (`row_state` with `output_ids` and,
    when the record has them, their statistics) after `position` steps of its group: it has
    one token per step until it finished, or, when its steps may verify drafts (`verifies`:
    forks), at least one per step while running."""
    ids = data.token_ids("output_ids")
    restore_row(row, ids, data, data.where("output_ids"), data.history(len(ids)),
                data.where("entropies"))
    if verifies:
        if not row.finished and len(ids) < position:
            raise InvalidArgument(f"a running {what} has at least one token per step: "
                                  f"{len(ids)} tokens after {position} steps",
                                  data.where("output_ids"))
    elif len(ids) > position or (not row.finished and len(ids) != position):
        raise InvalidArgument(f"a {what} has one token per step until it finishes: {len(ids)} "
                              f"tokens after {position} steps", data.where("output_ids"))


def row_records(logits: torch.Tensor, step: int, parents: Sequence[int], tokens: Sequence[int],
                scores: Sequence[float], top_n: int, finish: FinishReason = FinishReason.NONE,
                explanations: Sequence[dict] = (), reports: Sequence[RawRowReport] | None = None,
                processed: torch.Tensor | None = None) -> tuple[StepRecord, ...]:
    """Records of output rows that continue input rows `parents` of `logits` [rows, vocab] with
    `tokens`: the raw logprob of each token and its parent's raw statistics (`reports`, when
    already computed: `report_rows` of `logits` with `top_n`) and explanation (one per input
    row, when given). `finish` marks every row finished (the group's last step). `processed`
    [rows, vocab] (when the request asked for processed logprobs): the processed
    log-probabilities the group chose each input row's tokens by; each output row reports its
    token's value there, its parent's `top_n` best values and the entropy and varentropy of
    the softmax of its parent's values (`processed_reports`)."""
    reports = report_rows(logits, [top_n] * logits.shape[0]) if reports is None else reports
    chosen = logits[torch.tensor(parents), torch.tensor(tokens)].tolist() if parents else []
    extra: list = [((), None)] * logits.shape[0]
    picked = [None] * len(parents)
    if processed is not None:
        extra = processed_reports(Candidates(processed), [top_n] * processed.shape[0])
        if parents:
            where = processed.device
            picked = processed[torch.tensor(parents, device=where),
                               torch.tensor(tokens, device=where)].tolist()
    return tuple(StepRecord(
        step=step, token_id=token, logprob=value - reports[parent].log_normalizer,
        top_logprobs=reports[parent].top_logprobs, entropy=reports[parent].entropy,
        varentropy=reports[parent].varentropy, finished=finish is not FinishReason.NONE,
        finish_reason=finish, stop_token_id=None, parent=parent, score=score,
        explanation=explanations[parent] if explanations else {},
        processed_logprob=p_value, processed_top_logprobs=extra[parent][0],
        processed_stats=extra[parent][1])
        for parent, token, score, value, p_value in zip(parents, tokens, scores, chosen, picked))
