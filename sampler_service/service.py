"""The sampling service without its transport: validation, state and the engine, wired.

The gRPC servicer converts protos to these calls and domain errors to statuses; nothing here
knows about gRPC. Every mutating call validates its whole request before changing any state,
so a bad request leaves every sequence as it was.
"""
from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from sampler_service.engine import Engine
from sampler_service.errors import FailedPrecondition, InvalidArgument, SamplerServiceError
from sampler_service.groups import Group, GroupRecord
from sampler_service.groups.fork import ForkGroup
from sampler_service.policy.processors.base import GroupSelector, RowInputs
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.resolved import PolicyVersion, ResolvedPolicy
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState, SequenceStore, StepRecord

T = TypeVar("T")
log = logging.getLogger(__name__)


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
    branch: int | None = None


#: What a step answers for one sequence or group: the index of its first row in the request,
#: and its record (one row for a plain sequence, a `GroupRecord` for a group).
Answer = tuple[int, "StepRecord | GroupRecord"]


@dataclass(frozen=True)
class _Unit:
    """The consecutive rows of one sequence or group in a step request."""

    entry: "SequenceState | Group"
    start: int
    count: int
    retry: bool

    @property
    def state(self) -> SequenceState:
        """The state that holds the prompt, policy and vocabulary (a group's root)."""
        return self.entry.root if isinstance(self.entry, Group) else self.entry

    @property
    def position(self) -> int:
        return self.entry.step_number if isinstance(self.entry, Group) else self.entry.position


def _check_token_ids(ids: Sequence[int], field_name: str) -> tuple[int, ...]:
    bad = [i for i in ids if i < 0]
    if bad:
        raise InvalidArgument(f"token ids must be >= 0, got {bad[:5]}", field_name)
    return tuple(ids)


class SamplerCore:
    """Creates, steps, inspects and releases sequences; previews policies."""

    def __init__(self, registry: PolicyRegistry, store: SequenceStore, engine: Engine,
                 max_group_rows: int = 64,
                 on_row: Callable[[str, StepRecord], None] | None = None):
        self.registry = registry
        self.store = store
        self.engine = engine
        self.max_group_rows = max_group_rows
        #: Called with (policy name, record) for every row a step advanced (metrics).
        self.on_row = on_row
        self._lock = threading.Lock()  # one step at a time: the engine owns the device

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- policies -----------------------------------------------------------------------------
    def resolve_policy(self, name: str, spec: Mapping[str, Any] | None,
                       params: Mapping[str, Any], prefix: str = "",
                       sequence_id: str = "") -> ResolvedPolicy:
        """A named policy (a split assigns `sequence_id` a variant), an inline spec, or flat
        parameters, with `params` applied."""
        if name and spec:
            raise InvalidArgument("give a policy name or an inline policy_spec, not both",
                                  f"{prefix}policy_spec")
        if name:
            policy, version, split = self.registry.get(name, f"{prefix}policy", sequence_id)
            return resolve(policy, version, params, f"{prefix}params", split)
        if spec:
            policy = parse_policy("inline", dict(spec), f"{prefix}policy_spec")
            return resolve(policy, PolicyVersion(0, policy.content_hash()), params, f"{prefix}params")
        return resolve_flat(params, f"{prefix}params")

    # -- sequences ----------------------------------------------------------------------------
    def create_sequences(self, requests: Sequence[SequenceRequest]) -> list[SequenceState | Group]:
        """Creates plain sequences and groups (a group selector, or n / best_of > 1)."""
        if not requests:
            raise InvalidArgument("no sequences given", "sequences")
        states = []
        for index, request in enumerate(requests):
            prefix = f"sequences[{index}]."
            if not request.sequence_id:
                raise InvalidArgument("sequence_id is required", f"{prefix}sequence_id")
            policy = self.resolve_policy(request.policy, request.policy_spec, request.params, prefix,
                                         request.sequence_id)
            seed = policy.settings["seed"]
            root = SequenceState(
                sequence_id=request.sequence_id, policy=policy,
                prompt_ids=_check_token_ids(request.prompt_ids, f"{prefix}prompt_ids"),
                seed=secrets.randbits(64) if seed is None else seed,
                eos_token_ids=frozenset(_check_token_ids(request.eos_token_ids,
                                                         f"{prefix}eos_token_ids")))
            states.append(self._group_or_sequence(root, request, prefix))
        with self._lock:
            self.store.add_all(states)
        return states

    def _group_or_sequence(self, root: SequenceState, request: SequenceRequest,
                           prefix: str) -> SequenceState | Group:
        selector, settings = root.policy.selector, root.policy.settings
        forks = settings["n"] > 1 or settings["best_of"] > 1
        if isinstance(selector.stage, GroupSelector):
            if forks:
                raise InvalidArgument(f"n and best_of fork sampling selectors; the "
                                      f"{selector.stage.key!r} selector makes its own rows",
                                      f"{prefix}params.n")
            where = f"{prefix}policy_spec.select" if request.policy_spec else f"{prefix}policy"
            return selector.stage.new_group(root, selector.values, self.max_group_rows,
                                            f"{where}.{selector.stage.key}", f"{prefix}params")
        if forks:
            return ForkGroup.create(root, self.max_group_rows, f"{prefix}params.")
        return root

    def release(self, sequence_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        with self._lock:
            return self.store.release(sequence_ids)

    def read(self, sequence_id: str, view: Callable[[SequenceState | Group], T]) -> T:
        """`view(state)` of one sequence, taken while no step can change it halfway."""
        with self._lock:
            return view(self.store.get(sequence_id))

    # -- steps --------------------------------------------------------------------------------
    def step(self, rows: Sequence[StepRow], logits: torch.Tensor, processed_logprobs: bool = False,
             reference: torch.Tensor | None = None,
             signals: Mapping[str, torch.Tensor] | None = None) -> list[Answer]:
        """One StepRequest: validates all of it, plans every sequence's and group's step, then
        applies them all (a retried step answers its record again and does not advance).
        `reference` ([rows, vocab]) and `signals` (name -> [rows]) are the worker's extras."""
        with self._lock:
            units = self._validate_step(rows, logits, reference)
            moved = self._follow_latest(units)
            try:
                return self._step_units(units, rows, logits, processed_logprobs, reference, signals)
            except BaseException:
                for state, pinned in moved:  # the step failed: nothing changes, not even that
                    state.policy = pinned
                raise

    def _follow_latest(self, units: Sequence[_Unit]) -> list[tuple[SequenceState, ResolvedPolicy]]:
        """Moves the plain sequences whose policy says `follow_latest` to the version now in
        force (their request overrides applied again); returns (state, pinned policy) of each
        moved one. A sequence whose overrides the new version refuses keeps its version."""
        moved = []
        for unit in units:
            state = unit.entry
            if unit.retry or isinstance(state, Group) or not state.policy.follow_latest:
                continue
            pinned = state.policy
            try:
                spec, version, _ = self.registry.get(pinned.name)
                if version != pinned.version:
                    state.policy = resolve(spec, version, pinned.overrides, split=pinned.split)
                    moved.append((state, pinned))
            except SamplerServiceError as exc:
                log.warning("sequence %r stays on %s v%d: %s", state.sequence_id, pinned.name,
                            pinned.version.number, exc)
        return moved

    def _step_units(self, units: Sequence[_Unit], rows: Sequence[StepRow], logits: torch.Tensor,
                    processed_logprobs: bool, reference: torch.Tensor | None,
                    signals: Mapping[str, torch.Tensor] | None) -> list[Answer]:
        """Plans every fresh sequence's and group's step, then applies them all."""
        inputs = RowInputs(logits, reference=reference, signals=signals)
        vocab = logits.shape[1]
        answers: list[StepRecord | GroupRecord | None] = [
            u.entry.last_record if u.retry else None for u in units]
        plain = [k for k, u in enumerate(units) if not u.retry and not isinstance(u.entry, Group)]
        outcomes = []
        if plain:
            own = inputs
            if len(plain) < len(rows):
                own = inputs.select(torch.tensor([units[k].start for k in plain],
                                                 device=logits.device))
            outcomes = self.engine.step([units[k].entry for k in plain], own.raw,
                                        processed_logprobs, reference=own.reference,
                                        signals=own.signals)
        planned = [(k, u.entry.plan(self.engine, inputs.select(torch.arange(
            u.start, u.start + u.count, device=logits.device)), processed_logprobs))
            for k, u in enumerate(units) if not u.retry and isinstance(u.entry, Group)]
        for k, outcome in zip(plain, outcomes):
            answers[k] = units[k].entry.record_step(outcome, vocab)
        for k, group_step in planned:
            answers[k] = units[k].entry.commit(group_step)
        if self.on_row is not None:
            for unit, answer in zip(units, answers):
                if not unit.retry:
                    for record in answer.rows if isinstance(answer, GroupRecord) else [answer]:
                        self.on_row(unit.state.policy.name, record)
        return [(u.start, answer) for u, answer in zip(units, answers)]  # type: ignore[misc]

    @staticmethod
    def _is_retry(step: int | None, entry: SequenceState | Group) -> bool:
        record = entry.last_record
        return step is not None and record is not None and step == record.step

    def _units(self, rows: Sequence[StepRow]) -> list[_Unit]:
        """Rows split into runs of one sequence or group each (a group's rows are consecutive)."""
        units: list[_Unit] = []
        seen: dict[str, int] = {}
        start = 0
        while start < len(rows):
            sid = rows[start].sequence_id
            end = start
            while end < len(rows) and rows[end].sequence_id == sid:
                end += 1
            where = f"rows[{start}]"
            if sid in seen:
                raise InvalidArgument(f"sequence {sid!r} has rows at {seen[sid]} and {start}: a "
                                      "plain sequence sends one row, a group its rows one after "
                                      "another", f"{where}.sequence_id")
            seen[sid] = start
            entry = self.store.get(sid, f"{where}.sequence_id")
            if not isinstance(entry, Group) and end - start > 1:
                raise InvalidArgument(f"sequence {sid!r} has {end - start} rows ({start} to "
                                      f"{end - 1}); send one row per sequence", f"rows[{start + 1}].sequence_id")
            units.append(_Unit(entry, start, end - start, self._is_retry(rows[start].step, entry)))
            start = end
        return units

    def _validate_step(self, rows: Sequence[StepRow], logits: torch.Tensor,
                       reference: torch.Tensor | None = None) -> list[_Unit]:
        if not rows:
            raise InvalidArgument("a step needs at least one row", "rows")
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise InvalidArgument(f"logits shape {list(logits.shape)} must be [rows, vocab] with "
                                  f"rows = {len(rows)} (one per entry of `rows`)", "logits.shape")
        if reference is not None and reference.shape != logits.shape:
            raise InvalidArgument(f"reference_logits shape {list(reference.shape)} must equal "
                                  f"the logits shape {list(logits.shape)}", "reference_logits.shape")
        vocab = logits.shape[1]
        units = self._units(rows)
        for unit in units:
            where, sid, state = f"rows[{unit.start}]", rows[unit.start].sequence_id, unit.state
            if unit.retry:
                if isinstance(unit.entry, Group) and unit.count != unit.entry.last_record.rows_in:
                    raise InvalidArgument(f"group {sid!r} retried step {unit.entry.last_record.step} "
                                          f"with {unit.count} rows; that step had "
                                          f"{unit.entry.last_record.rows_in}", where)
                continue
            if unit.entry.finished:
                reason = "GROUP DONE" if isinstance(unit.entry, Group) else state.finish_reason.name
                raise FailedPrecondition(
                    f"sequence {sid!r} finished ({reason}) after {unit.position} steps; read its "
                    "result with GetSequence, then release it", f"{where}.sequence_id")
            for offset in range(unit.count):
                row = rows[unit.start + offset]
                if row.step is not None and row.step != unit.position:
                    raise FailedPrecondition(f"sequence {sid!r} expects step {unit.position}, got "
                                             f"{row.step}", f"rows[{unit.start + offset}].step")
                if row.branch is not None and row.branch != offset:
                    raise InvalidArgument(f"row {unit.start + offset} is branch {row.branch} of "
                                          f"group {sid!r}, but its rows must come in the order of "
                                          f"the last answer: branch {offset} is due here",
                                          f"rows[{unit.start + offset}].branch")
            if isinstance(unit.entry, Group) and unit.count != unit.entry.running_rows:
                raise InvalidArgument(
                    f"group {sid!r} has {unit.entry.running_rows} running rows and this request "
                    f"sends {unit.count}: send one row per choice of its last answer with "
                    "finished = false, in that order", where)
            if state.vocab_size and state.vocab_size != vocab:
                raise InvalidArgument(f"sequence {sid!r} stepped with vocab {state.vocab_size} "
                                      f"before; this request has {vocab}", "logits.shape")
            largest = max(state.history.max_token_id, max(state.stop_ids, default=-1))
            if largest >= vocab:
                raise InvalidArgument(f"sequence {sid!r} refers to token id {largest} "
                                      f"but the vocabulary has {vocab} ids", "logits.shape")
        self._validate_values(rows, logits)
        if reference is not None:
            self._validate_values(rows, reference, "reference_logits")
        return units

    @staticmethod
    def _validate_values(rows: Sequence[StepRow], logits: torch.Tensor,
                         field_name: str = "logits") -> None:
        """No NaN or +inf anywhere, and no row without a finite logit: one max per row tells
        (a row's max is NaN if it holds a NaN, +inf with a +inf, −inf if all are −inf)."""
        best = logits.amax(dim=1)
        bad = ~torch.isfinite(best)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            problem = ("is all -inf: no token can be chosen" if float(best[row]) == float("-inf")
                       else "contains NaN or +inf")
            raise InvalidArgument(f"{field_name} row {row} (sequence {rows[row].sequence_id!r}) "
                                  f"{problem}", field_name)

    # -- preview ------------------------------------------------------------------------------
    def preview(self, policy: str, policy_spec: Mapping[str, Any] | None,
                params: Mapping[str, Any], logits: torch.Tensor, history: Sequence[int] = (),
                prompt_ids: Sequence[int] = (), eos_token_ids: Sequence[int] = (),
                reference: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        """Survivors of the policy on `logits` [vocab], best first, with probabilities
        (`reference`: the reference logits, for policies that read them)."""
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
        if reference is not None:
            reference = reference.reshape(-1)
            if reference.shape != logits.shape:
                raise InvalidArgument(f"reference_logits has {reference.numel()} values; the logits "
                                      f"have {logits.shape[0]}", "reference_logits.shape")
        for tensor, name in ((logits, "logits"), (reference, "reference_logits")):
            if tensor is not None:
                self._validate_values([StepRow("preview")], tensor.unsqueeze(0), name)
        log_probs = self.engine.distribution(state, logits, reference)
        ids = torch.isfinite(log_probs).nonzero().squeeze(1)  # ascending ids
        values, order = torch.sort(log_probs.index_select(0, ids), descending=True, stable=True)
        return ids.index_select(0, order).tolist(), torch.exp(values).tolist()
