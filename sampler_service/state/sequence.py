"""The state the service keeps for one sequence between steps."""
from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from sampler_service.state.history import TokenHistory
from sampler_service.text.detokenize import IncrementalText
from sampler_service.text.stops import StopStrings
from sampler_service.state.resume import (Reader, ResumePoint, ResumeRecord, checked_record,
                                          restore_row, row_state)

if TYPE_CHECKING:
    from sampler_service.policy.resolved import ResolvedPolicy


class FinishReason(enum.IntEnum):
    """Mirrors `sampler.v1.FinishReason` (vLLM's "stop" / "length")."""

    NONE = 0
    STOP = 1
    LENGTH = 2


#: Weight of the newest step in the entropy moving averages (`SequenceState.ema_entropy`).
ENTROPY_EMA_ALPHA = 0.2


TopList = tuple[tuple[int, float], ...]


@dataclass
class RowOutcome:
    """What the engine chose for one row and what it measured: a step's outcome, which
    `SequenceState.record_step` turns into the sequence's `StepRecord` (which is frozen: this
    short-lived carrier is not, as one is made per row of every step)."""

    token_id: int
    logprob: float
    top_logprobs: TopList
    entropy: float
    varentropy: float
    processed_logprob: float | None = None
    processed_top_logprobs: TopList = ()
    processed_stats: tuple[float, float] | None = None  # (entropy, varentropy)
    #: Per-sequence state the stages asked to keep (e.g. mirostat's mu), by stage key.
    memory: dict[str, Any] = field(default_factory=dict)
    #: What the adaptive stages decided for this row: {stage key: {field: value}}.
    explanation: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRecord:
    """What one step chose for a sequence; kept for the last step so a retry gets it again."""

    step: int
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]
    entropy: float
    varentropy: float
    finished: bool
    finish_reason: FinishReason
    stop_token_id: int | None
    processed_logprob: float | None = None
    processed_top_logprobs: tuple[tuple[int, float], ...] = ()
    processed_stats: tuple[float, float] | None = None  # (entropy, varentropy)
    #: The stop string that finished the sequence at this step (finish_reason STOP).
    stop_string: str | None = None
    #: Group rows: the input row (index among the group's rows) this output row continues.
    parent: int = 0
    #: Group rows: the running beam score, or a branch's cumulative raw logprob.
    score: float = 0.0
    #: What the policy's adaptive stages decided: {stage key: {field: value}}.
    explanation: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: A speculative verification (docs/speculative.md): every token it emitted, in order, and
    #: their (entropy, varentropy); `step` is the position of the first, the other fields
    #: describe the last. Empty for a plain step.
    accepted_token_ids: tuple[int, ...] = ()
    accepted_stats: tuple[tuple[float, float], ...] = ()

    #: A plain sequence's step takes one row and answers one (a group's record says more).
    rows_in: ClassVar[int] = 1

    @property
    def rows(self) -> tuple["StepRecord", ...]:
        """The output rows of the step: this one."""
        return (self,)


@dataclass
class SequenceState:
    """One live sequence.

    `policy` is pinned at creation (name, version, resolved chain and settings). `seed` keys the
    counter-based noise; the position of a step is `len(output_ids)`. `processor_state` holds
    per-sequence state of stateful processors and selectors, keyed by chain link.
    """

    sequence_id: str
    policy: "ResolvedPolicy"
    prompt_ids: tuple[int, ...]
    seed: int
    eos_token_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    varentropies: list[float] = field(default_factory=list)
    #: Running summaries of the raw entropy history (nats), O(1) per step: exponential moving
    #: averages (weight ENTROPY_EMA_ALPHA; the first step sets them) and sums for the means.
    ema_entropy: float = 0.0
    ema_varentropy: float = 0.0
    entropy_sum: float = 0.0
    varentropy_sum: float = 0.0
    vocab_size: int = 0
    finish_reason: FinishReason = FinishReason.NONE
    stop_token_id: int | None = None
    last_record: StepRecord | None = None
    processor_state: dict[str, Any] = field(default_factory=dict)
    last_used: float = 0.0
    #: With a tokenizer: its id, the output as text so far and the stop strings searched in it
    #: (`sampler_service.text`); the stop string that finished the sequence, and where it starts.
    tokenizer_id: str = ""
    text: IncrementalText | None = None
    stops: StopStrings | None = None
    stop_string: str | None = None
    stop_at: int = 0
    history: TokenHistory = field(init=False)

    def __post_init__(self) -> None:
        self.history = TokenHistory(self.prompt_ids, self.output_ids)


    def footprint_tokens(self) -> int:
        """Tokens the sequence holds, prompt and output (what `--max-state-bytes` counts)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def position(self) -> int:
        """Index of the next token to choose (= the step number it expects)."""
        return len(self.output_ids)

    # -- the unit interface a step request sees (shared with groups) ---------------------------
    #: A plain sequence sends one row per step, and the rows of all plain sequences of a step
    #: share one engine call (a group plans its rows itself).
    running_rows: ClassVar[int] = 1
    shares_engine_call: ClassVar[bool] = True
    #: Why the unit cannot verify speculative drafts; None: it can (`draft_lanes`).
    drafts_refusal: ClassVar[str | None] = None

    def draft_lanes(self) -> list[tuple["SequenceState", int]]:
        """Speculative verification: each row state that verifies drafts, with the index
        (among the unit's rows in the request) of the row whose drafts and logits it takes."""
        return [(self, 0)]

    def plan_verified(self, outcomes: Sequence[Sequence[RowOutcome]], vocab: int,
                      rows_in: int) -> Callable[[], StepRecord]:
        """The commit of a verification whose lanes emitted `outcomes` (one list per lane)."""
        emitted, = outcomes
        return lambda: self.record_tokens(emitted, vocab)

    @property
    def root(self) -> "SequenceState":
        """The state holding the prompt, policy and vocabulary: itself (a group's is its root)."""
        return self

    @property
    def step_number(self) -> int:
        return self.position

    @property
    def follows_latest(self) -> bool:
        """Whether a step moves it to its policy's newest version first."""
        return self.policy.follow_latest

    @property
    def finish_label(self) -> str:
        return self.finish_reason.name

    @property
    def finished(self) -> bool:
        return self.finish_reason is not FinishReason.NONE

    @property
    def mean_entropy(self) -> float:
        return self.entropy_sum / len(self.entropies) if self.entropies else 0.0

    @property
    def mean_varentropy(self) -> float:
        return self.varentropy_sum / len(self.varentropies) if self.varentropies else 0.0

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that finish the sequence: stop_token_ids ∪ EOS, without EOS when the policy
        says `ignore_eos` (vLLM: EOS is then a token like any other)."""
        stops = frozenset(self.policy.settings["stop_token_ids"])
        return stops if self.policy.settings["ignore_eos"] else self.eos_token_ids | stops

    @property
    def min_tokens_ids(self) -> frozenset[int]:
        """Ids min_tokens masks: EOS ∪ stop_token_ids, ignore_eos or not (vLLM's
        `all_stop_token_ids`, which keeps the model's EOS under ignore_eos)."""
        return self.eos_token_ids | frozenset(self.policy.settings["stop_token_ids"])

    def branch(self, sequence_id: str, seed: int | None = None) -> "SequenceState":
        """A copy that continues independently (a beam, fork or CoT branch), cloned here in one
        place: every mutable field gets its own copy (tests/unit/test_state.py checks that no
        field is shared). Stage memory is copied shallowly: stages keep immutable values or
        indices guarded by their owner's id."""
        other = copy.copy(self)
        other.sequence_id = sequence_id
        other.seed = self.seed if seed is None else seed
        other.output_ids = list(self.output_ids)
        other.entropies, other.varentropies = list(self.entropies), list(self.varentropies)
        other.last_record = None
        other.processor_state = dict(self.processor_state)
        other.history = self.history.copy()
        other.text = None if self.text is None else self.text.copy()
        return other

    # -- resume (`sampler_service.state.resume`) -------------------------------------------------
    def resume_record(self) -> ResumeRecord:
        """What re-creates this sequence where it stands, with its tokens."""
        return ResumeRecord(self.sequence_id, self.position, self.policy.version.hash,
                            self.seed, row_state(self))

    def resume(self, point: ResumePoint, field: str) -> None:
        """Moves this new sequence to `point` (its tokens, their stats and its record);
        `field` names the SequenceConfig's `resume` in errors."""
        if not point.output_ids and point.record is None:
            return
        record = checked_record(point, self.sequence_id, self.policy.version.hash, field,
                                len(point.output_ids))
        restore_row(self, point.output_ids, Reader(record.state, f"{field}.record.state"),
                    f"{field}.output_ids", point.stats, f"{field}.stats")

    def record_step(self, outcome: RowOutcome, vocab: int, parent: int = 0,
                    score: float = 0.0) -> StepRecord:
        """Accepts what the engine chose for this sequence (token, stage memory, statistics)
        and returns the step's record, kept as `last_record` for retries."""
        step = self.position
        self.vocab_size = vocab
        self.processor_state.update(outcome.memory)
        self.accept(outcome.token_id, outcome.entropy, outcome.varentropy)
        self.last_record = StepRecord(
            step=step, token_id=outcome.token_id, logprob=outcome.logprob,
            top_logprobs=outcome.top_logprobs, entropy=outcome.entropy,
            varentropy=outcome.varentropy, finished=self.finished,
            finish_reason=self.finish_reason, stop_token_id=self.stop_token_id,
            processed_logprob=outcome.processed_logprob,
            processed_top_logprobs=outcome.processed_top_logprobs,
            processed_stats=outcome.processed_stats, parent=parent, score=score,
            explanation=outcome.explanation, stop_string=self.stop_string)
        return self.last_record

    def record_tokens(self, outcomes: Sequence[RowOutcome], vocab: int, parent: int = 0,
                      score: float = 0.0) -> StepRecord:
        """Accepts a speculative verification's emitted tokens in order, each as plain decoding
        would (`record_step`), and keeps one record for the step: at the first token's
        position, naming them all (`accepted_token_ids`), the rest of it the last's, with
        `score` (a fork's cumulative raw logprob after the last)."""
        start = self.position
        for outcome in outcomes:
            record = self.record_step(outcome, vocab, parent, score)
        self.last_record = replace(record, step=start, accepted_token_ids=tuple(
            o.token_id for o in outcomes), accepted_stats=tuple(
            (o.entropy, o.varentropy) for o in outcomes))
        return self.last_record

    def accept(self, token_id: int, entropy: float, varentropy: float) -> None:
        """Appends a chosen token and its raw-distribution stats, then checks for a finish."""
        self.output_ids.append(token_id)
        self.history.append(token_id)
        first = not self.entropies
        self.entropies.append(entropy)
        self.varentropies.append(varentropy)
        alpha = 1.0 if first else ENTROPY_EMA_ALPHA
        self.ema_entropy += alpha * (entropy - self.ema_entropy)
        self.ema_varentropy += alpha * (varentropy - self.ema_varentropy)
        self.entropy_sum += entropy
        self.varentropy_sum += varentropy
        max_tokens = self.policy.settings["max_tokens"]
        match = None
        if self.text is not None:
            start = len(self.text)
            self.text.append(token_id)
            if self.stops is not None:
                match = self.stops.find(self.text.text, start)
        if token_id in self.stop_ids:  # vLLM's order: stop ids, stop strings, then length
            self.finish_reason = FinishReason.STOP
            self.stop_token_id = token_id
        elif match is not None:
            self.finish_reason = FinishReason.STOP
            self.stop_string, self.stop_at = match.stop, match.start
        elif max_tokens and len(self.output_ids) >= max_tokens:
            self.finish_reason = FinishReason.LENGTH

    def output_text(self) -> str:
        """The output as text, cut before the stop string that ended it unless the policy
        says include_stop_str_in_output (vLLM); "" without a tokenizer."""
        if self.text is None:
            return ""
        if self.stop_string is None or self.policy.settings["include_stop_str_in_output"]:
            return self.text.text
        return self.text.text[:self.stop_at]
