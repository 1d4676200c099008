"""The sampling service without its transport: validation, state and the engine, wired.

The gRPC servicer converts protos to these calls and domain errors to statuses; nothing here
knows about gRPC. Every mutating call validates its whole request before changing any state,
so a bad request leaves every sequence as it was.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from sampler_service.engine import Engine
from sampler_service.errors import FailedPrecondition, InvalidArgument
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.resolved import PolicyVersion, ResolvedPolicy
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState, SequenceStore, StepRecord

T = TypeVar("T")


@dataclass(frozen=True)
class SequenceRequest:
    """What CreateSequences asks for one sequence (already out of its proto)."""

    sequence_id: str
    policy: str = ""
    policy_spec: Mapping[str, Any] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    prompt_ids: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepRow:
    sequence_id: str
    step: int | None = None


def _check_token_ids(ids: Sequence[int], field_name: str) -> tuple[int, ...]:
    bad = [i for i in ids if i < 0]
    if bad:
        raise InvalidArgument(f"token ids must be >= 0, got {bad[:5]}", field_name)
    return tuple(ids)


class SamplerCore:
    """Creates, steps, inspects and releases sequences; previews policies."""

    def __init__(self, registry: PolicyRegistry, store: SequenceStore, engine: Engine):
        self.registry = registry
        self.store = store
        self.engine = engine
        self._lock = threading.Lock()  # one step at a time: the engine owns the device

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- policies -----------------------------------------------------------------------------
    def resolve_policy(self, name: str, spec: Mapping[str, Any] | None,
                       params: Mapping[str, Any], prefix: str = "") -> ResolvedPolicy:
        """A named policy, an inline spec, or flat parameters, with `params` applied."""
        if name and spec:
            raise InvalidArgument("give a policy name or an inline policy_spec, not both",
                                  f"{prefix}policy_spec")
        if name:
            policy, version = self.registry.get(name, f"{prefix}policy")
            return resolve(policy, version, params, f"{prefix}params")
        if spec:
            policy = parse_policy("inline", dict(spec), f"{prefix}policy_spec")
            return resolve(policy, PolicyVersion(0, policy.content_hash()), params, f"{prefix}params")
        return resolve_flat(params, f"{prefix}params")

    # -- sequences ----------------------------------------------------------------------------
    def create_sequences(self, requests: Sequence[SequenceRequest]) -> list[SequenceState]:
        if not requests:
            raise InvalidArgument("no sequences given", "sequences")
        states = []
        for index, request in enumerate(requests):
            prefix = f"sequences[{index}]."
            if not request.sequence_id:
                raise InvalidArgument("sequence_id is required", f"{prefix}sequence_id")
            policy = self.resolve_policy(request.policy, request.policy_spec, request.params, prefix)
            seed = policy.settings["seed"]
            states.append(SequenceState(
                sequence_id=request.sequence_id, policy=policy,
                prompt_ids=_check_token_ids(request.prompt_ids, f"{prefix}prompt_ids"),
                seed=secrets.randbits(64) if seed is None else seed,
                eos_token_ids=frozenset(_check_token_ids(request.eos_token_ids,
                                                         f"{prefix}eos_token_ids"))))
        with self._lock:
            self.store.add_all(states)
        return states

    def release(self, sequence_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        with self._lock:
            return self.store.release(sequence_ids)

    def read(self, sequence_id: str, view: Callable[[SequenceState], T]) -> T:
        """`view(state)` of one sequence, taken while no step can change it halfway."""
        with self._lock:
            return view(self.store.get(sequence_id))

    # -- steps --------------------------------------------------------------------------------
    def step(self, rows: Sequence[StepRow], logits: torch.Tensor,
             processed_logprobs: bool = False) -> list[StepRecord]:
        """One StepRequest: validates all of it, then advances every non-retried row."""
        with self._lock:
            states = self._validate_step(rows, logits)
            retried = [self._is_retry(row, s) for row, s in zip(rows, states)]
            fresh = [i for i, retry in enumerate(retried) if not retry]
            records: list[StepRecord | None] = [
                s.last_record if retry else None for s, retry in zip(states, retried)]
            if fresh:
                fresh_states = [states[i] for i in fresh]
                if len(fresh) < len(rows):
                    logits = logits.index_select(0, torch.tensor(fresh, device=logits.device))
                outcomes = self.engine.step(fresh_states, logits, processed_logprobs)
                for i, state, outcome in zip(fresh, fresh_states, outcomes):
                    records[i] = self._accept(state, outcome, logits.shape[1])
            return records  # type: ignore[return-value]

    @staticmethod
    def _is_retry(row: StepRow, state: SequenceState) -> bool:
        record = state.last_record
        return row.step is not None and record is not None and row.step == record.step

    def _validate_step(self, rows: Sequence[StepRow], logits: torch.Tensor) -> list[SequenceState]:
        if not rows:
            raise InvalidArgument("a step needs at least one row", "rows")
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise InvalidArgument(f"logits shape {list(logits.shape)} must be [rows, vocab] with "
                                  f"rows = {len(rows)} (one per entry of `rows`)", "logits.shape")
        vocab = logits.shape[1]
        seen: dict[str, int] = {}
        states = []
        for i, row in enumerate(rows):
            where = f"rows[{i}]"
            if row.sequence_id in seen:
                raise InvalidArgument(f"sequence {row.sequence_id!r} has two rows ({seen[row.sequence_id]} "
                                      f"and {i}); send one row per sequence", f"{where}.sequence_id")
            seen[row.sequence_id] = i
            state = self.store.get(row.sequence_id, f"{where}.sequence_id")
            states.append(state)
            if self._is_retry(row, state):
                continue
            if state.finished:
                raise FailedPrecondition(
                    f"sequence {row.sequence_id!r} finished ({state.finish_reason.name}) after "
                    f"{state.position} tokens; release it or create a new one", f"{where}.sequence_id")
            if row.step is not None and row.step != state.position:
                raise FailedPrecondition(
                    f"sequence {row.sequence_id!r} expects step {state.position}, got {row.step}",
                    f"{where}.step")
            if state.vocab_size and state.vocab_size != vocab:
                raise InvalidArgument(f"sequence {row.sequence_id!r} stepped with vocab "
                                      f"{state.vocab_size} before; this request has {vocab}",
                                      "logits.shape")
            largest = max(state.history.max_token_id, max(state.stop_ids, default=-1))
            if largest >= vocab:
                raise InvalidArgument(f"sequence {row.sequence_id!r} refers to token id {largest} "
                                      f"but the vocabulary has {vocab} ids", "logits.shape")
        self._validate_values(rows, logits)
        return states

    @staticmethod
    def _validate_values(rows: Sequence[StepRow], logits: torch.Tensor) -> None:
        """No NaN or +inf anywhere, and no row without a finite logit: one max per row tells
        (a row's max is NaN if it holds a NaN, +inf with a +inf, −inf if all are −inf)."""
        best = logits.amax(dim=1)
        bad = ~torch.isfinite(best)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            problem = ("is all -inf: no token can be chosen" if float(best[row]) == float("-inf")
                       else "contains NaN or +inf")
            raise InvalidArgument(f"logits row {row} (sequence {rows[row].sequence_id!r}) {problem}",
                                  "logits")

    @staticmethod
    def _accept(state: SequenceState, outcome, vocab: int) -> StepRecord:
        step = state.position
        state.vocab_size = vocab
        state.processor_state.update(outcome.memory)
        state.accept(outcome.token_id, outcome.entropy, outcome.varentropy)
        state.last_record = StepRecord(
            step=step, token_id=outcome.token_id, logprob=outcome.logprob,
            top_logprobs=outcome.top_logprobs, entropy=outcome.entropy,
            varentropy=outcome.varentropy, finished=state.finished,
            finish_reason=state.finish_reason, stop_token_id=state.stop_token_id,
            processed_logprob=outcome.processed_logprob,
            processed_top_logprobs=outcome.processed_top_logprobs,
            processed_stats=outcome.processed_stats)
        return state.last_record

    # -- preview ------------------------------------------------------------------------------
    def preview(self, policy: str, policy_spec: Mapping[str, Any] | None,
                params: Mapping[str, Any], logits: torch.Tensor, history: Sequence[int] = (),
                prompt_ids: Sequence[int] = (), eos_token_ids: Sequence[int] = ()
                ) -> tuple[list[int], list[float]]:
        """Survivors of the policy on `logits` [vocab], best first, with probabilities."""
        resolved = self.resolve_policy(policy, policy_spec, params)
        if logits.dim() == 2 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.dim() != 1:
            raise InvalidArgument(f"logits shape {list(logits.shape)} must be [vocab] or [1, vocab]",
                                  "logits.shape")
        state = SequenceState(sequence_id="preview", policy=resolved,
                              prompt_ids=_check_token_ids(prompt_ids, "prompt_ids"), seed=0,
                              eos_token_ids=frozenset(_check_token_ids(eos_token_ids, "eos_token_ids")),
                              output_ids=list(_check_token_ids(history, "history")))
        largest = max(state.history.max_token_id, max(state.stop_ids, default=-1))
        if largest >= logits.shape[0]:
            raise InvalidArgument(f"token id {largest} is outside the vocabulary of "
                                  f"{logits.shape[0]}", "history")
        self._validate_values([StepRow("preview")], logits.unsqueeze(0))
        log_probs = self.engine.distribution(state, logits)
        ids = torch.isfinite(log_probs).nonzero().squeeze(1)  # ascending ids
        values, order = torch.sort(log_probs.index_select(0, ids), descending=True, stable=True)
        return ids.index_select(0, order).tolist(), torch.exp(values).tolist()
