"""The sampling service without its transport: validation, state and the engine, wired.

The gRPC servicer converts protos to these calls and domain errors to statuses; nothing here
knows about gRPC. Every mutating call validates its whole request before changing any state,
so a bad request leaves every sequence as it was.
"""
from __future__ import annotations

import functools
import itertools
import logging
import operator
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, NamedTuple, Sequence, TypeVar

import torch

from sampler_service.engine import Engine
from sampler_service.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument,
                                     ResourceExhausted, SamplerServiceError, detached, echo)
from sampler_service.groups import Group, GroupRecord
from sampler_service.groups.fork import ForkGroup
from sampler_service.policy.processors.base import SIGNAL_NAMES, GroupSelector, RowInputs
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.resolved import PolicyVersion, ResolvedPolicy
from sampler_service.policy.sparse import NotExact, Refusal
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.policy.candidates import row_maxima
from sampler_service.policy.statistics import (NO_FINITE, RawStatistics, fused_available,
                                               raw_statistics)
from sampler_service.saved import CommitLog, SavedSequence, SavedStep
from sampler_service.state import RowOutcome, SequenceState, SequenceStore, StepRecord
from sampler_service.state.resume import ResumePoint, ResumeRecord
from sampler_service.step_logits import StepLogits
from sampler_service.policy.processors.structured import structured_of
from sampler_service.text import encode
from sampler_service.text import grammar as grammars
from sampler_service.text.detokenize import IncrementalText
from sampler_service.text.registry import TokenizerRegistry
from sampler_service.text.stops import StopStrings

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
    #: Re-create the sequence where it stood (its tokens and last resume record).
    resume: ResumePoint | None = None
    #: A registered tokenizer's name or id ("": none).
    tokenizer: str = ""


@dataclass(frozen=True)
class StepRow:
    sequence_id: str
    step: int | None = None
    branch: int | None = None
    #: Speculative verification (docs/speculative.md): the draft ids, and optionally the draft
    #: model's probabilities [k, vocab] (float32, CPU); the call's logits hold k + 1 rows for it.
    drafts: tuple[int, ...] = ()
    draft_probs: torch.Tensor | None = None


@dataclass
class Answer:
    """What a step answers for one sequence or group: the index of its first row in the
    request, its record (one row for a plain sequence, a `GroupRecord` for a group) and, when
    the call asked for them, its resume record after the step. Short-lived (one per unit of
    every step, read once by the edge), so not frozen."""

    start: int
    record: "StepRecord | GroupRecord"
    resume: ResumeRecord | None = None


@dataclass(frozen=True)
class StepCall:
    """One step request out of its proto: its rows, their logits (dense and/or sparse) and the
    worker's extras, `reference` [rows, V] and `signals` (name -> [rows]), in row order."""

    rows: Sequence[StepRow]
    logits: StepLogits
    processed_logprobs: bool = False
    reference: torch.Tensor | None = None
    signals: Mapping[str, torch.Tensor] | None = None
    #: `time.monotonic()` past which the caller no longer waits (its gRPC deadline): a call
    #: planned after it is not committed and gets DEADLINE_EXCEEDED. None: no deadline.
    deadline: float | None = None
    #: Answer each sequence's resume record too (`Answer.resume`).
    resume_records: bool = False

    @functools.cached_property
    def has_drafts(self) -> bool:
        return any(row.drafts for row in self.rows)

    def extras(self, rows: Sequence[int]) -> RowInputs:
        """The reference logits and signals of request rows `rows`, with their dense logits
        when every one of them is dense (else `raw` is None)."""
        dense = not any(map(self.logits.is_sparse, rows))
        index = (None if self.reference is None and self.signals is None
                 else torch.tensor(list(rows), device=self.logits.device))
        return RowInputs(
            raw=self.logits.dense_of(rows) if dense else None,
            reference=None if self.reference is None else self.reference.index_select(0, index),
            signals=None if self.signals is None else {
                name: values.index_select(0, index) for name, values in self.signals.items()})


class _Unit(NamedTuple):
    """The consecutive rows of one sequence or group in a step request (a tuple: one is made
    per row of every step)."""

    entry: "SequenceState | Group"
    start: int
    count: int
    retry: bool

    @property
    def state(self) -> SequenceState:
        """The state that holds the prompt, policy and vocabulary (a group's root)."""
        return self.entry.root

    @property
    def rows(self) -> range:
        return range(self.start, self.start + self.count)


@dataclass
class _Prepared:
    """A validated call of a batch: its units, and the sequences `follow_latest` moved."""

    call: StepCall
    units: list[_Unit]
    moved: list[tuple[SequenceState, ResolvedPolicy]]

    def restore(self) -> None:
        """The call failed: the moved sequences go back to the version they pinned."""
        for state, pinned in self.moved:
            state.policy = pinned


#: A planned unit: applying it commits the unit's step and returns its record.
_Commit = tuple[_Unit, Callable[[], "StepRecord | GroupRecord"]]


def _check_token_ids(ids: Sequence[int], field_name: str) -> tuple[int, ...]:
    bad = [i for i in ids if i < 0]
    if bad:
        raise InvalidArgument(f"token ids must be >= 0, got {bad[:5]}", field_name)
    return tuple(ids)


#: Prompt tokens one sequence may bring (`--max-prompt-tokens`): a million-token context.
DEFAULT_MAX_PROMPT_TOKENS = 1 << 20


def link_field(policy: ResolvedPolicy, index: int, name: str, prefix: str = "") -> str:
    """The field that set parameter `name` of the policy's chain entry `index`: the request's
    flat parameter (`params.bad_words`, `params.structured.regex`), the inline spec's chain
    entry, or the named policy."""
    stage = policy.links[index].stage
    flat = f"{stage.flat_group}.{name}" if stage.flat_group else stage.flat_names.get(name)
    if flat is not None and flat.split(".")[0] in policy.overrides:
        return f"{prefix}params.{flat}"
    if policy.name == "inline":
        return f"{prefix}policy_spec.chain[{index}].{stage.key}.{name}"
    return f"{prefix}policy"


def structured_link(policy: ResolvedPolicy, prefix: str = ""
                    ) -> tuple[tuple[str, str], str] | None:
    """((kind, canonical text), the field that set it) of the policy's `structured` stage when
    it is on."""
    for index, link in enumerate(policy.links):
        if link.stage.key != "structured":
            continue
        spec = structured_of(link.values)
        return None if spec is None else (spec, link_field(policy, index, spec[0], prefix))
    return None


def text_entries(policy: ResolvedPolicy, prefix: str = ""
                 ) -> list[tuple[str, tuple[Any, ...], str]]:
    """(rule, value, field) of each chain parameter holding text to encode (bad words and DRY
    breakers given as strings)."""
    return [(param.text_rule, link.values[param.name], link_field(policy, index, param.name,
                                                                   prefix))
            for index, link in enumerate(policy.links) for param in link.stage.params
            if param.text_rule and encode.has_text(link.values[param.name])]


class SamplerCore:
    """Creates, steps, inspects and releases sequences; previews policies."""

    def __init__(self, registry: PolicyRegistry, store: SequenceStore, engine: Engine,
                 max_group_rows: int = 64,
                 on_row: Callable[[str, StepRecord], None] | None = None,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                 tokenizers: TokenizerRegistry | None = None):
        self.registry = registry
        self.store = store
        self.engine = engine
        self.max_group_rows = max_group_rows
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizers = TokenizerRegistry() if tokenizers is None else tokenizers
        #: Called with (policy name, record) for every row a step advanced (metrics).
        self.on_row = on_row
        #: Told every committed change before its answer returns (`attach_journal`).
        self.journal: CommitLog | None = None
        self._lock = threading.Lock()  # one step at a time: the engine owns the device
        #: (policy, version, error kind) whose refused follow_latest moves were logged at WARNING.
        self._stays_warned: set[tuple[str, int, str]] = set()

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
            return resolve(policy, PolicyVersion(0, policy.content_hash()), params,
                           f"{prefix}params", inline=True)
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
            if len(request.prompt_ids) > self.max_prompt_tokens:
                raise ResourceExhausted(
                    f"{prefix}prompt_ids holds {len(request.prompt_ids)} tokens; the cap is "
                    f"{self.max_prompt_tokens}: send the prompt's last tokens only (the "
                    "penalties read at most their window) or raise --max-prompt-tokens",
                    "--max-prompt-tokens")
            policy = self.resolve_policy(request.policy, request.policy_spec, request.params, prefix,
                                         request.sequence_id)
            root = SequenceState(
                sequence_id=request.sequence_id, policy=policy,
                prompt_ids=_check_token_ids(request.prompt_ids, f"{prefix}prompt_ids"),
                seed=self._seed(policy, request, prefix),
                eos_token_ids=frozenset(_check_token_ids(request.eos_token_ids,
                                                         f"{prefix}eos_token_ids")),
                **self.text_of(request.tokenizer, policy, prefix))
            if policy.settings["ignore_eos"] and structured_link(policy, prefix) is not None:
                where = (f"{prefix}params.ignore_eos" if "ignore_eos" in policy.overrides else
                         f"{prefix}policy_spec.defaults.ignore_eos" if request.policy_spec else
                         f"{prefix}policy")
                raise InvalidArgument("ignore_eos cannot go with structured outputs: a "
                                      "completed grammar allows only EOS (or a stop id), which "
                                      "must end the sequence", where)
            if not root.stop_ids and root.text is not None and \
                    structured_link(policy, prefix) is not None:
                # a finished grammar ends the sequence at EOS: the vocabulary's, if none given
                root.eos_token_ids = frozenset(root.text.vocabulary.eos_token_ids)
                if not root.eos_token_ids:
                    raise InvalidArgument("structured outputs need EOS ids: give eos_token_ids "
                                          "or register the tokenizer with its EOS ids",
                                          f"{prefix}eos_token_ids")
            entry = self._group_or_sequence(root, request, prefix)
            if request.resume is not None:
                entry.resume(request.resume, f"{prefix}resume")
            states.append(entry)
        with self._lock:
            self.store.add_all(states)
            if self.journal is not None:
                self.journal.created([SavedSequence.of(entry) for entry in states])
        return states

    def text_of(self, tokenizer: str, policy: ResolvedPolicy, prefix: str = "") -> dict[str, Any]:
        """The text fields of a new sequence's state (`SequenceState.tokenizer_id`, `text`,
        `stops`) from its tokenizer's name or id; stop strings need one, and so does a
        `structured` stage, whose grammar is compiled here (refused naming its field)."""
        stop = policy.settings["stop"]
        structured = structured_link(policy, prefix)
        texts = text_entries(policy, prefix)
        if not tokenizer:
            needs = [("structured outputs", f"{prefix}tokenizer")] if structured else []
            needs += [("stop strings", f"{prefix}params.stop")] if stop else []
            needs += [("bad words or DRY breakers given as text",
                       f"{field}[{next(i for i, v in enumerate(items) if isinstance(v, str))}]")
                      for _, items, field in texts]
            if needs:
                what, field = needs[0]
                raise InvalidArgument(f"{what} need the sequence's tokenizer: name one "
                                      "registered with RegisterTokenizer or --tokenizer", field)
            return {}
        tokenizer_id, vocabulary = self.tokenizers.get(tokenizer, f"{prefix}tokenizer")
        if structured is not None:
            grammars.compiled(vocabulary, *structured[0], structured[1])
        for rule, items, field in texts:  # encoded now: refusals at creation, steps find it cached
            encode.token_sequences(vocabulary, rule, items, field)
        return {"tokenizer_id": tokenizer_id, "text": IncrementalText(vocabulary),
                "stops": StopStrings(stop) if stop else None}

    @staticmethod
    def _seed(policy: ResolvedPolicy, request: SequenceRequest, prefix: str) -> int:
        """The seed given, else the one a resumed sequence drew before, else a fresh one."""
        given = policy.settings["seed"]
        record = None if request.resume is None else request.resume.record
        if record is None:
            return secrets.randbits(64) if given is None else given
        if given is not None and given != record.seed:
            raise InvalidArgument(f"params.seed {given} differs from the seed {record.seed} the "
                                  "resumed sequence drew its noise with",
                                  f"{prefix}resume.record.seed")
        return record.seed

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
            released, missing = self.store.release(sequence_ids)
            if self.journal is not None and released:
                self.journal.released(released)
            return released, missing

    def read(self, sequence_id: str, view: Callable[[SequenceState | Group], T]) -> T:
        """`view(state)` of one sequence, taken while no step can change it halfway."""
        with self._lock:
            return view(self.store.get(sequence_id))

    # -- steps --------------------------------------------------------------------------------
    def step(self, rows: Sequence[StepRow], logits: torch.Tensor | StepLogits,
             processed_logprobs: bool = False, reference: torch.Tensor | None = None,
             signals: Mapping[str, torch.Tensor] | None = None,
             resume_records: bool = False) -> list[Answer]:
        """One step request (see `step_calls`); raises its error."""
        if isinstance(logits, torch.Tensor):
            logits = StepLogits.of_dense(logits)
        result, = self.step_calls([StepCall(rows, logits, processed_logprobs, reference, signals,
                                            resume_records=resume_records)])
        if isinstance(result, BaseException):
            raise result
        return result

    def step_calls(self, calls: Sequence[StepCall]) -> list[list[Answer] | Exception]:
        """Several step requests as one batch: each is validated whole, every unit of every
        valid call is planned (the plain sequences of all calls in one engine call), then all
        are committed. A call that fails gets its exception and changes nothing; the others
        are answered as if they had come alone (a failure found while planning the batch
        plans each call again on its own, to find whose it was). Retried steps answer their
        record again. The calls must not share a sequence (the batcher sees to it)."""
        results: list[list[Answer] | Exception | None] = [None] * len(calls)
        steps: list[SavedStep] | None = None if self.journal is None else []
        with self._lock:
            prepared: dict[int, _Prepared] = {}
            for index, call in enumerate(calls):
                try:
                    units, statistics = self._validate_step(call)
                except SamplerServiceError as exc:
                    results[index] = detached(exc)
                    continue
                if statistics is not call.logits.statistics:  # the engine reuses them
                    call = replace(call, logits=replace(call.logits, statistics=statistics))
                prepared[index] = _Prepared(call, units, self._follow_latest(units))
            plain = {i: p for i, p in prepared.items() if not p.call.has_drafts}
            planned_all = self._plan_isolating_failures(plain) if plain else {}
            for index, p in prepared.items():
                if p.call.has_drafts:
                    try:
                        planned_all[index] = self._plan_verify(p.call, p.units)
                    except Exception as exc:
                        planned_all[index] = detached(exc)
            for index, planned in planned_all.items():
                late = calls[index].deadline is not None and time.monotonic() > calls[index].deadline
                if isinstance(planned, Exception) or late:
                    prepared[index].restore()
                    results[index] = planned if not late else DeadlineExceeded(
                        "the step's deadline passed before it could be committed: nothing "
                        "changed; send the same step again (with a longer deadline)")
                else:
                    results[index] = self._commit(planned, calls[index].resume_records,
                                                  prepared[index].moved, steps)
            if steps:
                self.journal.stepped(steps)
        return results  # type: ignore[return-value]

    def _plan_isolating_failures(self, prepared: dict[int, _Prepared]
                                 ) -> dict[int, list[_Commit] | Exception]:
        try:
            return self._plan(prepared)
        except Exception as exc:
            if len(prepared) == 1:
                return {index: detached(exc) for index in prepared}
        isolated: dict[int, list[_Commit] | Exception] = {}
        for index, call in prepared.items():
            try:
                isolated.update(self._plan({index: call}))
            except Exception as exc:
                isolated[index] = detached(exc)
        return isolated

    def _plan(self, prepared: dict[int, _Prepared]) -> dict[int, list[_Commit]]:
        """Plans every fresh unit of the calls; changes nothing."""
        plans: dict[int, list[_Commit]] = {index: [] for index in prepared}
        shared: dict[tuple, list[tuple[int, _Unit]]] = {}
        refusals: list[Refusal] = []  # sparse rows that need full logits, all reported at once
        for index, p in prepared.items():
            keys = self._engine_call_keys(index, p.call)
            for unit in p.units:
                if unit.retry:
                    plans[index].append((unit, lambda record=unit.entry.last_record: record))
                elif unit.entry.shares_engine_call:
                    shared.setdefault(keys[p.call.logits.is_sparse(unit.start)], []).append(
                        (index, unit))
                elif any(p.call.logits.is_sparse(row) for row in unit.rows):
                    refusals += [Refusal(row, "groups need full rows: beam search, forks and CoT "
                                         "decoding rank every token of the vocabulary",
                                         structural=True)
                                 for row in unit.rows if p.call.logits.is_sparse(row)]
                else:
                    plans[index].append(self._plan_group(p.call, unit))
        for key, members in shared.items():
            calls = [prepared[index].call for index, _ in members]
            units = [unit for _, unit in members]
            try:
                outcomes = self._run_engine(key, calls, units)
            except NotExact as exc:  # numbered by the engine's rows: renumber by the request's
                refusals += exc.for_request([unit.start for unit in units]).refusals
                continue
            vocab = calls[0].logits.vocab  # one for every row of the key
            for (index, unit), outcome in zip(members, outcomes):
                plans[index].append((unit, functools.partial(unit.entry.record_step, outcome, vocab)))
        if refusals:
            raise NotExact.of(refusals)
        return plans

    @staticmethod
    def _engine_call_keys(index: int, call: StepCall) -> dict[bool, tuple]:
        """The keys of the engine calls that plain sequences' rows of `call` join, by whether
        the row is sparse: dense rows of every call with the same vocabulary and options share
        one; sparse rows, one of this call's own."""
        return {False: ("dense", call.logits.vocab, call.processed_logprobs,
                        call.reference is not None),
                True: ("sparse", index, call.processed_logprobs)}

    def _run_engine(self, key: tuple, calls: Sequence[StepCall], units: Sequence[_Unit]):
        """One engine call over the one row of each plain-sequence unit (unit i of `calls[i]`)."""
        rows = [unit.start for unit in units]
        states = [unit.entry for unit in units]
        processed = calls[0].processed_logprobs
        if key[0] == "sparse":
            extras = calls[0].extras(rows)
            return self.engine.step(states, calls[0].logits.sparse_of(rows), processed,
                                    reference=extras.reference, signals=extras.signals)
        parts: list[tuple[StepCall, list[int]]] = []  # runs of consecutive units of one call
        for call, row in zip(calls, rows):
            if parts and parts[-1][0] is call:
                parts[-1][1].append(row)
            else:
                parts.append((call, [row]))
        extras = [call.extras(call_rows) for call, call_rows in parts]
        known = [call.logits.statistics_of(call_rows) for call, call_rows in parts]
        statistics = None if any(s is None for s in known) else RawStatistics.joined(known)
        inputs = extras[0] if len(extras) == 1 else RowInputs(
            raw=_joined_rows([e.raw for e in extras]),
            reference=None if extras[0].reference is None else torch.cat(
                [e.reference for e in extras]),
            signals=_joined_signals(extras))
        return self.engine.step(states, inputs.raw, processed, reference=inputs.reference,
                                signals=inputs.signals, statistics=statistics)

    def _plan_verify(self, call: StepCall, units: Sequence[_Unit]) -> list[_Commit]:
        """Plans a request with drafts: the lanes of every fresh unit (a plain sequence's row,
        each running fork) verified together (`speculative.verify`), each unit's outcomes
        gathered for its own commit; nothing changes until commit."""
        from sampler_service import speculative as spec
        rows, logits = call.rows, call.logits.dense
        offsets = list(itertools.accumulate((1 + len(row.drafts) for row in rows), initial=0))
        plans: list[_Commit] = []
        lanes: list[tuple[_Unit, spec.Drafted]] = []
        for unit in units:
            if unit.retry:
                plans.append((unit, lambda record=unit.entry.last_record: record))
                continue
            for state, offset in unit.entry.draft_lanes():
                row, at = rows[unit.start + offset], offsets[unit.start + offset]
                lanes.append((unit, spec.Drafted(state, logits[at:at + 1 + len(row.drafts)],
                                                 row.drafts, row.draft_probs)))
        emitted = spec.verify(self.engine, [lane for _, lane in lanes], call.processed_logprobs)
        by_unit: dict[int, list[list[RowOutcome]]] = {}
        for (unit, _), outcomes in zip(lanes, emitted):
            by_unit.setdefault(unit.start, []).append(outcomes)
        for unit in units:
            if not unit.retry:
                plans.append((unit, unit.entry.plan_verified(by_unit[unit.start],
                                                             call.logits.vocab, unit.count)))
        return plans

    def _plan_group(self, call: StepCall, unit: _Unit) -> _Commit:
        group_step = unit.entry.plan(self.engine, call.extras(unit.rows), call.processed_logprobs)
        return unit, lambda: unit.entry.commit(group_step)

    def _commit(self, plans: list[_Commit], resume_records: bool,
                moved: list[tuple[SequenceState, ResolvedPolicy]],
                steps: list[SavedStep] | None) -> list[Answer]:
        """Applies planned units; appends each fresh unit's `SavedStep` to `steps` (a list
        when a journal is attached)."""
        answers = []
        for unit, commit in plans:
            record = commit()
            resume = unit.entry.resume_record() if resume_records else None
            if not unit.retry:
                if self.on_row is not None:
                    for row in record.rows:
                        self.on_row(unit.state.policy.name, row)
                if steps is not None:
                    steps.append(SavedStep.of(unit.entry, record, resume, any(
                        state is unit.state for state, _ in moved)))
            answers.append(Answer(unit.start, record, resume))
        return sorted(answers, key=operator.attrgetter("start"))

    def _follow_latest(self, units: Sequence[_Unit]) -> list[tuple[SequenceState, ResolvedPolicy]]:
        """Moves the sequences whose policy says `follow_latest` to the version now in force
        (their request overrides applied again); returns (state, pinned policy) of each moved
        one. A sequence whose overrides the new version refuses keeps its version."""
        moved = []
        for unit in units:
            if unit.retry or not unit.entry.follows_latest:
                continue
            state = unit.state
            pinned = state.policy
            try:
                spec, version, _ = self.registry.get(pinned.name)
                if version != pinned.version:
                    state.policy = resolve(spec, version, pinned.overrides, split=pinned.split)
                    moved.append((state, pinned))
            except SamplerServiceError as exc:  # tried again each step: warned once per version
                once = (pinned.name, pinned.version.number, type(exc).__name__)
                level = logging.DEBUG if once in self._stays_warned else logging.WARNING
                self._stays_warned.add(once)
                log.log(level, "sequence %r stays on %s v%d (and so may others on it; further "
                        "ones are logged at DEBUG): %s", state.sequence_id, pinned.name,
                        pinned.version.number, exc)
        return moved

    @staticmethod
    def _is_retry(step: int | None, entry: SequenceState | Group) -> bool:
        record = entry.last_record
        return step is not None and record is not None and step == record.step

    def _units(self, rows: Sequence[StepRow]) -> list[_Unit]:
        """Rows split into runs of one sequence or group each (a group's rows are consecutive)."""
        units: list[_Unit] = []
        seen: dict[str, int] = {}
        count = len(rows)
        start = 0
        while start < count:
            first = rows[start]
            sid = first.sequence_id
            end = start + 1
            while end < count and rows[end].sequence_id == sid:
                end += 1
            field_name = f"rows[{start}].sequence_id"
            if sid in seen:
                raise InvalidArgument(f"sequence {sid!r} has rows at {seen[sid]} and {start}: a "
                                      "plain sequence sends one row, a group its rows one after "
                                      "another", field_name)
            seen[sid] = start
            entry = self.store.get(sid, field_name)
            if entry.shares_engine_call and end - start > 1:
                raise InvalidArgument(f"sequence {sid!r} has {end - start} rows ({start} to "
                                      f"{end - 1}); send one row per sequence", f"rows[{start + 1}].sequence_id")
            units.append(_Unit(entry, start, end - start, self._is_retry(first.step, entry)))
            start = end
        return units

    def _validate_step(self, call: StepCall) -> tuple[list[_Unit], RawStatistics | None]:
        """The call's units, checked, and its dense rows' raw statistics when known (given by
        the caller, or computed by the values' check: `validate_values`)."""
        rows, logits = call.rows, call.logits
        if not rows:
            raise InvalidArgument("a step needs at least one row", "rows")
        dense_rows = 0 if logits.dense is None else logits.dense.shape[0]
        expected = sum(1 + len(row.drafts) for row in rows)
        if call.has_drafts:
            self._validate_drafts(call, expected)
        if logits.rows != expected or dense_rows != len(logits.dense_rows) or (
                logits.dense is not None and logits.dense.dim() != 2):
            shape = [] if logits.dense is None else list(logits.dense.shape)
            raise InvalidArgument(f"logits shape {shape} must be [rows, vocab] with rows = "
                                  f"{len(logits.dense_rows)}: one per entry of `rows` not sent in "
                                  f"`sparse` ({len(logits.sparse_rows)} are), k + 1 for a row "
                                  "with k draft_token_ids", "logits.shape")
        vocab = logits.vocab
        if logits.dense is not None and logits.sparse is not None and logits.sparse.vocab != vocab:
            raise InvalidArgument(f"sparse.vocab_size {logits.sparse.vocab} differs from the dense "
                                  f"logits' vocabulary of {vocab}", "sparse.vocab_size")
        if call.reference is not None and list(call.reference.shape) != [len(rows), vocab]:
            raise InvalidArgument(f"reference_logits shape {list(call.reference.shape)} must be "
                                  f"[rows, vocab] = {[len(rows), vocab]}", "reference_logits.shape")
        units = self._units(rows)
        has_drafts = call.has_drafts
        for unit in units:
            entry, start = unit.entry, unit.start
            sid = rows[start].sequence_id
            if has_drafts:
                self._check_verifiable(unit, rows)
            if unit.retry:
                if unit.count != entry.last_record.rows_in:
                    raise InvalidArgument(f"sequence {sid!r} retried step {entry.last_record.step} "
                                          f"with {unit.count} rows; that step had "
                                          f"{entry.last_record.rows_in}", f"rows[{start}]")
                continue
            if entry.finished:
                raise FailedPrecondition(
                    f"sequence {sid!r} finished ({entry.finish_label}) after {entry.step_number} "
                    "steps; read its result with GetSequence, then release it",
                    f"rows[{start}].sequence_id")
            for offset, row in enumerate(unit.rows):
                asked = rows[row]
                if asked.step is not None and asked.step != entry.step_number:
                    raise FailedPrecondition(f"sequence {sid!r} expects step {entry.step_number}, "
                                             f"got {asked.step}", f"rows[{row}].step")
                if asked.branch is not None and asked.branch != offset:
                    raise InvalidArgument(f"row {row} is branch {asked.branch} of "
                                          f"group {sid!r}, but its rows must come in the order of "
                                          f"the last answer: branch {offset} is due here",
                                          f"rows[{row}].branch")
            if unit.count != entry.running_rows:
                raise InvalidArgument(
                    f"group {sid!r} has {entry.running_rows} running rows and this request "
                    f"sends {unit.count}: send one row per choice of its last answer with "
                    "finished = false, in that order", f"rows[{start}]")
            state = unit.state
            if state.text is not None and state.text.vocabulary.size > vocab:
                raise InvalidArgument(f"sequence {sid!r} has a tokenizer of "
                                      f"{state.text.vocabulary.size} tokens; this request's "
                                      f"logits have {vocab}", "logits.shape")
            if state.vocab_size and state.vocab_size != vocab:
                raise InvalidArgument(f"sequence {sid!r} stepped with vocab {state.vocab_size} "
                                      f"before; this request has {vocab}", "logits.shape")
            largest = max(state.history.max_token_id, max(state.min_tokens_ids, default=-1))
            if largest >= vocab:
                raise InvalidArgument(f"sequence {sid!r} refers to token id {largest} "
                                      f"but the vocabulary has {vocab} ids", "logits.shape")
        statistics = logits.statistics
        if logits.dense is not None and not logits.checked:
            statistics = self.validate_values(
                [rows[r] for r in logits.dense_rows] if not has_drafts else [],
                logits.dense, statistics=not has_drafts)
        if call.reference is not None:
            self.validate_values(rows, call.reference, "reference_logits")
        return units, statistics

    @staticmethod
    def _validate_drafts(call: StepCall, expected: int) -> None:
        """A request with drafts: dense logits only, no extras; each draft id in the
        vocabulary, each draft_probs [k, vocab] in [0, 1] with q_j(x_j) in (0, 1]."""
        first = next(i for i, row in enumerate(call.rows) if row.drafts)
        if call.logits.sparse is not None or call.reference is not None or call.signals:
            raise FailedPrecondition("speculative verification takes dense logits without "
                                     "sparse rows, reference_logits or signals",
                                     f"rows[{first}].draft_token_ids")
        vocab = call.logits.vocab
        for i, row in enumerate(call.rows):
            for j, token in enumerate(row.drafts):
                if not 0 <= token < vocab:
                    raise InvalidArgument(f"draft token id {token} is outside the vocabulary of "
                                          f"{vocab}", f"rows[{i}].draft_token_ids[{j}]")
            q = row.draft_probs
            if q is None:
                continue
            if not row.drafts:
                raise InvalidArgument("draft_probs without draft_token_ids",
                                      f"rows[{i}].draft_probs")
            if list(q.shape) != [len(row.drafts), vocab]:
                raise InvalidArgument(f"draft_probs shape {list(q.shape)} must be [k, vocab] = "
                                      f"{[len(row.drafts), vocab]}", f"rows[{i}].draft_probs.shape")
            if not bool(((q >= 0) & (q <= 1)).all()):
                raise InvalidArgument("draft_probs must lie in [0, 1] (no NaN)",
                                      f"rows[{i}].draft_probs")
            own = q[torch.arange(len(row.drafts)), torch.tensor(row.drafts)]
            bad = (own <= 0).nonzero().flatten().tolist()
            if bad:
                raise InvalidArgument(f"the draft's own probability q[{bad[0]}][{row.drafts[bad[0]]}]"
                                      " must be in (0, 1]: the draft model drew it",
                                      f"rows[{i}].draft_probs[{bad[0]}]")

    @staticmethod
    def _check_verifiable(unit: _Unit, rows: Sequence[StepRow]) -> None:
        """FAILED_PRECONDITION unless the unit verifies drafts (a plain sequence or forks)
        and its selector can."""
        from sampler_service.speculative import VERIFIABLE_SELECTORS
        where = f"rows[{unit.start}].draft_token_ids"
        refusal = unit.entry.drafts_refusal
        if refusal is not None:
            raise FailedPrecondition(
                f"sequence {echo(rows[unit.start].sequence_id)} is a {unit.entry.kind} group: "
                f"{refusal}. Speculative verification takes plain sequences and forks; send "
                "this group's rows in a request without drafts", where)
        key = unit.state.policy.selector.stage.key
        if key not in VERIFIABLE_SELECTORS:
            raise FailedPrecondition(
                f"the {key!r} selector cannot verify drafts: speculative verification needs a "
                f"selector among {list(VERIFIABLE_SELECTORS)} (whose distribution is the one "
                "it draws from)", where)

    @staticmethod
    def validate_values(rows: Sequence[StepRow], logits: torch.Tensor,
                        field_name: str = "logits",
                        statistics: bool = False) -> RawStatistics | None:
        """No NaN or +inf anywhere, and no row without a finite logit. With `statistics`,
        where the fused kernel runs (`fused_available`), the rows' raw statistics tell (their
        `problem` codes, from the same read of each row) and are returned for the engine to
        reuse; elsewhere one max per row tells (NaN if the row holds one, +inf with a +inf,
        −inf if all are −inf) and None is returned."""
        stats = raw_statistics(logits) if statistics and fused_available(logits) else None
        if stats is not None:
            bad, no_finite = stats.problem != 0, stats.problem == NO_FINITE
        else:
            best = row_maxima(logits)
            bad, no_finite = ~torch.isfinite(best), best == float("-inf")
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            problem = ("is all -inf: no token can be chosen" if bool(no_finite[row])
                       else "contains NaN or +inf")
            whose = (f" (sequence {echo(rows[row].sequence_id)})" if row < len(rows) else "")
            raise InvalidArgument(f"{field_name} row {row}{whose} {problem}", field_name)
        return stats

    # -- persistence (`sampler_service.saved`, `--state-dir`) ---------------------------------
    def attach_journal(self, journal: CommitLog | None) -> None:
        """From now on tells `journal` every committed change (creations, steps, releases and
        idle evictions), under the lock, before the change's answer returns; None: stop."""
        with self._lock:
            self.journal = journal
            self.store.on_evict = None if journal is None else journal.released

    def checkpoint(self) -> list[SavedSequence]:
        """Every live sequence and group as saved data, taken while nothing can change; the
        attached journal's `checkpoint` runs before the next change."""
        with self._lock:
            saved = [SavedSequence.of(entry) for entry in self.store.snapshot()]
            if self.journal is not None:
                self.journal.checkpoint()
            return saved

    def restore(self, saved: Sequence[SavedSequence]) -> list[str]:
        """Brings saved sequences back to life (a restart with `--state-dir`), each where it
        stood, with the answer of its last step (a retry of that step gets it again), idle
        since now. One that cannot be rebuilt (its policy's spec no longer parses, e.g. a
        plug-in stage not installed; its record refused) is skipped with a log line. Returns
        the ids restored."""
        entries = []
        for item in saved:
            try:
                entries.append(self._rebuilt(item))
            except SamplerServiceError as exc:
                log.warning("state: sequence %s not restored: %s", echo(item.sequence_id),
                            f"{exc.field}: {exc.message}" if exc.field else exc.message)
        with self._lock:
            self.store.put_back(entries)
        return [entry.sequence_id for entry in entries]

    def _rebuilt(self, saved: SavedSequence) -> SequenceState | Group:
        policy = saved.policy.resolved()
        root = SequenceState(sequence_id=saved.sequence_id, policy=policy,
                             prompt_ids=saved.prompt_ids, seed=saved.record.seed,
                             eos_token_ids=frozenset(saved.eos_token_ids),
                             **self.text_of(saved.tokenizer_id, policy))
        entry = self._group_or_sequence(root, SequenceRequest(saved.sequence_id), "")
        last = saved.last_record
        if last is not None and isinstance(last, GroupRecord) != isinstance(entry, Group):
            raise InvalidArgument(f"its last answer is a {type(last).__name__} but its policy "
                                  f"makes a {type(entry).__name__}", "resume.last_answer")
        if isinstance(last, GroupRecord):  # a finished group lives on until released
            entry.resume(saved.point, "resume", result=last.result)
        else:
            entry.resume(saved.point, "resume")
        entry.last_record = last
        root.vocab_size = saved.vocab_size
        return entry

    # -- preview ------------------------------------------------------------------------------
    def explain_plan(self, policy: str, policy_spec: Mapping[str, Any] | None,
                     params: Mapping[str, Any]) -> list[str]:
        """The chain the engine runs for the policy and parameters, then the selector
        (`ResolvedPolicy.explain_plan`)."""
        return self.resolve_policy(policy, policy_spec, params).explain_plan()

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
        largest = max(state.history.max_token_id, max(state.min_tokens_ids, default=-1))
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
                self.validate_values([StepRow("preview")], tensor.unsqueeze(0), name)
        log_probs = self.engine.distribution(state, logits, reference)
        ids = torch.isfinite(log_probs).nonzero().squeeze(1)  # ascending ids
        values, order = torch.sort(log_probs.index_select(0, ids), descending=True, stable=True)
        return ids.index_select(0, order).tolist(), torch.exp(values).tolist()


def _joined_signals(parts: Sequence[RowInputs]) -> dict[str, torch.Tensor] | None:
    """The signals of consecutive row runs joined (0 for a run whose call sent none)."""
    if all(p.signals is None for p in parts):
        return None
    return {name: torch.cat([p.signals[name] if p.signals is not None else
                             torch.zeros(p.raw.shape[0], device=p.raw.device) for p in parts])
            for name in SIGNAL_NAMES}


def _joined_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[R, V] parts as one tensor: a view when they lie one after another in one buffer (the
    step runner decodes a batch's requests so), else a copy."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if not (part.is_contiguous() and part.untyped_storage().data_ptr()
                == first.untyped_storage().data_ptr() and part.storage_offset() == offset):
            return torch.cat(list(parts))
        offset += part.numel()
    return first.as_strided((sum(p.shape[0] for p in parts), first.shape[1]), first.stride())
