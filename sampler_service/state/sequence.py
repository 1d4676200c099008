"""The state the service keeps for one sequence between steps."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sampler_service.state.history import TokenHistory

if TYPE_CHECKING:
    from sampler_service.policy.resolved import ResolvedPolicy


class FinishReason(enum.IntEnum):
    """Mirrors `sampler.v1.FinishReason` (vLLM's "stop" / "length")."""

    NONE = 0
    STOP = 1
    LENGTH = 2


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
    vocab_size: int = 0
    finish_reason: FinishReason = FinishReason.NONE
    stop_token_id: int | None = None
    last_record: StepRecord | None = None
    processor_state: dict[str, Any] = field(default_factory=dict)
    last_used: float = 0.0
    history: TokenHistory = field(init=False)

    def __post_init__(self) -> None:
        self.history = TokenHistory(self.prompt_ids, self.output_ids)

    @property
    def position(self) -> int:
        """Index of the next token to choose (= the step number it expects)."""
        return len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not FinishReason.NONE

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that finish the sequence and that min_tokens masks: EOS ∪ stop_token_ids."""
        return self.eos_token_ids | frozenset(self.policy.settings["stop_token_ids"])

    def accept(self, token_id: int, entropy: float, varentropy: float) -> None:
        """Appends a chosen token and its raw-distribution stats, then checks for a finish."""
        self.output_ids.append(token_id)
        self.history.append(token_id)
        self.entropies.append(entropy)
        self.varentropies.append(varentropy)
        max_tokens = self.policy.settings["max_tokens"]
        if token_id in self.stop_ids:
            self.finish_reason = FinishReason.STOP
            self.stop_token_id = token_id
        elif max_tokens and len(self.output_ids) >= max_tokens:
            self.finish_reason = FinishReason.LENGTH
