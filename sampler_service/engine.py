"""One batched step over many rows of many sequences.

Order of operations for a step (`Engine.step`):
  1. Raw statistics of every row in a few vectorised passes (`raw_statistics`): the
     log-normaliser, entropy H and varentropy V (nats); then the chosen token's raw logprob and
     the top-N raw logprobs.
  2. Rows are grouped by their policy's signature (the keys of its stages). Per group, every
     stage's parameters become [rows] tensors once, the processors run in chain order on a
     float32 copy of the group's logits (`Candidates`: dense, or sparse once a truncation
     bounds every row), and the selector picks one token per row.
  3. Optionally, processed logprobs (of the distribution the selector drew from). Each row
     also gets its stages' memory updates and explanations (`RowBatch.explain`).
The engine reads sequence state but never changes it: the caller accepts the tokens.

Rows sent sparse (`SparseLogits`: each row's K best raw logits and its tail's statistics) run
the same chain on their K entries, O(rows × K): the raw statistics come exactly from the tail
statistics, and before each stage (and the selector) its `sparse_tail` rule proves the result
equal to the one full rows would give, or refuses the row (`sampler_service.policy.sparse`).
A step with refused rows chooses nothing and raises `NotExact` listing every one of them.
"""
from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any, NamedTuple, Sequence

import torch

from sampler_service.errors import FailedPrecondition
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors.base import (PLUGIN_KEYS, RowBatch, RowInputs, Selector,
                                                    Stage)
from sampler_service.policy.sparse import NotExact, Refusal, SparseLogits, TailBound, fmt
from sampler_service.policy.statistics import RawStatistics, raw_statistics
from sampler_service.policy.resolved import Link
from sampler_service.state import RowOutcome, SequenceState, TopList

_TENSOR_DTYPES = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}
#: Stage argument sets the engine keeps (see `Engine._stage_args`).
ARGS_CACHE_ENTRIES = 256


class RawRowReport(NamedTuple):
    """The raw-distribution facts of one input row that every choice continuing it reports (a
    tuple: one is made per row of every step)."""

    log_normalizer: float
    entropy: float
    varentropy: float
    top_logprobs: TopList


def report_rows(logits: torch.Tensor, top_n: Sequence[int],
                stats: RawStatistics | None = None) -> list[RawRowReport]:
    """Per row of `logits`: log-normaliser, entropy, varentropy and its `top_n[row]` best raw
    logprobs (best first). `stats`: the rows' statistics when already computed."""
    stats = raw_statistics(logits, max(top_n, default=0)) if stats is None else stats
    return _reports(Candidates(logits), top_n, stats)


def _reports(raw: Candidates, top_n: Sequence[int], stats: RawStatistics) -> list[RawRowReport]:
    """`report_rows` of raw rows, dense or sparse (whose top-N are sent: `_raw_top_refusals`);
    the N best come from `stats` when it holds enough of them."""
    n = max(top_n, default=0)
    statistics = zip(stats.log_normalizer.tolist(), stats.entropy.tolist(),
                     stats.varentropy.tolist())
    if n == 0:
        return [RawRowReport(norm, h, v, ()) for norm, h, v in statistics]
    if stats.top_values is not None and stats.top_values.shape[1] >= min(n, raw.vocab):
        top_ids, top_values = _finite_lists(stats.top_values[:, :n], stats.top_ids[:, :n])
    else:
        top_ids, top_values = _top(raw, n)
    return [RawRowReport(norm, h, v, tuple((t, value - norm) for t, value in
                                           zip(top_ids[row][:top_n[row]], top_values[row])))
            for row, (norm, h, v) in enumerate(statistics)]


def processed_reports(dist: Candidates, top_n: Sequence[int]
                      ) -> list[tuple[TopList, tuple[float, float]]]:
    """Per row of processed log-probabilities `dist` (−inf = masked, dense or sparse, each row
    with a finite value): its `top_n[row]` best (token id, value), best first, and the entropy
    and varentropy of the softmax of its values: what a choice reports of its processed
    distribution (`processed_top_logprobs`, `processed_stats`)."""
    ids, values = _top(dist, max(top_n, default=0))
    stats = raw_statistics(dist.values)
    return [(tuple(zip(ids[row][:n], values[row][:n])), (h, v))
            for row, (n, h, v) in enumerate(zip(top_n, stats.entropy.tolist(),
                                                stats.varentropy.tolist()))]


def _raw_top_refusals(sparse: SparseLogits, top_n: Sequence[int]) -> list[Refusal]:
    """Sparse rows whose `top_n[row]` best raw logprobs (the `logprobs` setting) are not
    provably all sent: they are when N ≤ K and the N-th sent logit is above the tail's max
    (strictly: a tie could rank a tail id first), or when the tail is empty or all −inf."""
    n = torch.tensor(top_n, dtype=torch.int64, device=sparse.values.device)
    width = sparse.width
    nth = sparse.values.gather(1, (n.clamp(min=1, max=width) - 1).unsqueeze(1)).squeeze(1)
    known = (n == 0) | torch.isneginf(sparse.tail_max) | ((n <= width) & (nth > sparse.tail_max))
    return [Refusal(row, f"logprobs: the {top_n[row]} best raw tokens are not all among the "
                         f"K = {width} sent entries (tail max {fmt(sparse.tail_max[row])})")
            for row in (~known).nonzero().flatten().tolist()]


def _check_choosable(states: Sequence[SequenceState], candidates: Candidates) -> None:
    """FAILED_PRECONDITION naming the first row whose chain masked every token."""
    emptied = torch.isneginf(candidates.max_values())
    if bool(emptied.any()):
        state = states[int(emptied.nonzero()[0])]
        raise FailedPrecondition(
            f"policy {state.policy.name or '(flat parameters)'} masked every token of sequence "
            f"{state.sequence_id!r} at step {state.position} (e.g. min_tokens masked the only "
            "finite logits): no token can be chosen", "logits")


def _top(candidates: Candidates, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's n best (token ids, values), −inf entries dropped, as Python lists."""
    rows = candidates.rows
    n = min(n, candidates.values.shape[1])
    if n == 0:
        return [[] for _ in range(rows)], [[] for _ in range(rows)]
    values, columns = torch.topk(candidates.values, n, dim=1)
    return _finite_lists(values, columns if candidates.ids is None
                         else candidates.ids.gather(1, columns))


def _finite_lists(values: torch.Tensor, ids: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """(ids, values) [R, N] as Python lists per row, −inf entries dropped."""
    finite = torch.isfinite(values).tolist()
    return ([[t for t, f in zip(r, ok) if f] for r, ok in zip(ids.tolist(), finite)],
            [[v for v, f in zip(r, ok) if f] for r, ok in zip(values.tolist(), finite)])


class ProcessedDistributions:
    """The processed distribution of each row of an engine step (the one its selector draws
    from), kept as its group's log-probabilities (`Candidates`, −inf = masked): nothing dense
    is made until asked for."""

    def __init__(self, rows: int):
        self._of: list[tuple[Candidates, int]] = [None] * rows  # type: ignore[list-item]

    def add(self, rows: Sequence[int], log_p: Candidates) -> None:
        """Rows `rows` of the step are rows 0, 1, … of `log_p`."""
        for j, i in enumerate(rows):
            self._of[i] = (log_p, j)

    def log_at(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """float64 [n]: log p of `tokens[n]` in row `rows[n]`."""
        out = torch.empty(len(rows), dtype=torch.float64)
        for log_p, wanted in self._by_group(rows).items():
            at = torch.zeros(log_p.rows, dtype=torch.int64, device=log_p.values.device)
            at[torch.tensor([j for j, _ in wanted])] = torch.tensor(
                [tokens[n] for _, n in wanted])
            values = log_p.at(at.to(log_p.values.device)).double().cpu()
            for j, n in wanted:
                out[n] = values[j]
        return out

    def dense(self, rows: Sequence[int]) -> torch.Tensor:
        """float64 [n, vocab]: p of every token in each row of `rows`."""
        parts: dict[int, torch.Tensor] = {}
        for log_p, wanted in self._by_group(rows).items():
            values = log_p.to_dense().index_select(0, torch.tensor(
                [j for j, _ in wanted], device=log_p.values.device)).double().exp().cpu()
            parts.update((n, values[r]) for r, (_, n) in enumerate(wanted))
        return torch.stack([parts[n] for n in range(len(rows))])

    def _by_group(self, rows: Sequence[int]) -> dict[Candidates, list[tuple[int, int]]]:
        """(row in the group, position in `rows`) of each asked row, by group."""
        groups: dict[Candidates, list[tuple[int, int]]] = {}
        for n, i in enumerate(rows):
            log_p, j = self._of[i]
            groups.setdefault(log_p, []).append((j, n))
        return groups


class Engine:
    """Applies sequences' resolved policies to their logits on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        #: `_stage_args` results by the identities of their links, which an entry holds weakly
        #: (a released sequence's policy is not kept alive here; a reused identity is told
        #: apart by its dead reference): a group whose rows keep their policies reuses its
        #: argument tensors, already on the device, step after step.
        self._args: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], dict[str, Any]]] = {}

    def _stage_args(self, stage: Stage, links: Sequence[Link]) -> dict[str, Any]:
        """Each parameter of `stage` across the group's rows: scalars as one [rows] tensor on
        the device, the other kinds as a list with one value per row. Stages never write
        into their arguments, so they are cached (`ARGS_CACHE_ENTRIES`)."""
        key = tuple(map(id, links))
        cached = self._args.get(key)
        if cached is not None and all(ref() is link for ref, link in zip(cached[0], links)):
            return cached[1]
        args = {p.name: torch.tensor([l.values[p.name] for l in links],
                                     dtype=torch.float64 if p.float64 else _TENSOR_DTYPES[p.kind],
                                     device=self.device)
                if p.kind in _TENSOR_DTYPES else [l.values[p.name] for l in links]
                for p in stage.params}
        if len(self._args) >= ARGS_CACHE_ENTRIES:
            self._args.pop(next(iter(self._args)))  # the oldest entry
        self._args[key] = (tuple(map(weakref.ref, links)), args)
        return args

    def process(self, states: Sequence[SequenceState], logits: torch.Tensor,
                inputs: RowInputs, shared: bool = False,
                maxima: torch.Tensor | None = None) -> tuple[Candidates, RowBatch]:
        """Runs the (shared-signature) chain of `states` over `logits`, which it may modify
        unless `shared` (then the first write copies them); `inputs` holds the untouched raw
        rows and what else the worker sent for them; `maxima` [R]: each row's max of `logits`
        when known (no pass to find them)."""
        candidates = Candidates(logits, shared=shared, maxima=maxima)
        batch = self._run_chain(states, candidates, inputs, None)
        if not batch.pristine:  # raw rows were checked on arrival: each has a finite logit
            _check_choosable(states, candidates)
        return candidates, batch

    def _process_sparse(self, states: Sequence[SequenceState], inputs: RowInputs
                        ) -> tuple[Candidates, RowBatch, TailBound]:
        """The chain of `states` over a copy of their sparse rows (`inputs.sparse`), with every
        stage's exactness rule; the returned bound holds the rows' refusals."""
        sparse = inputs.sparse
        candidates = Candidates(sparse.values.clone(), sparse.ids.clone(), sparse.vocab)
        tail = TailBound(sparse)
        return candidates, self._run_chain(states, candidates, inputs, tail), tail

    def _run_chain(self, states: Sequence[SequenceState], candidates: Candidates,
                   inputs: RowInputs, tail: TailBound | None) -> RowBatch:
        """Applies the chain in place; on sparse rows (`tail` given) each stage's rule first."""
        batch = RowBatch(states, self.device, inputs)
        for position, link in enumerate(states[0].policy.active_links):
            args = self._stage_args(link.stage, [s.policy.active_links[position] for s in states])
            if tail is None or link.stage.sparse_tail(candidates, args, batch, tail):
                if link.stage.key in PLUGIN_KEYS:  # may write into `values` itself
                    candidates.writable()
                link.stage.apply(candidates, args, batch)
            batch.pristine = False
        return batch

    @staticmethod
    def _groups(states: Sequence[SequenceState]) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for row, state in enumerate(states):
            groups.setdefault(state.policy.signature, []).append(row)
        return list(groups.values())

    @torch.inference_mode()
    def step(self, states: Sequence[SequenceState], logits: torch.Tensor | SparseLogits,
             processed_logprobs: bool = False, *, reference: torch.Tensor | None = None,
             signals: dict[str, torch.Tensor] | None = None,
             distributions: bool = False, statistics: RawStatistics | None = None):
        """Chooses one token per row. `logits` is float32 [len(states), vocab] on the device,
        or every row sent sparse (`SparseLogits`, see the module docstring: raises `NotExact`
        naming each refused row by its index in `states`); `reference` ([rows, vocab]) and
        `signals` (name -> [rows]) are the worker's optional extras; `statistics`: the dense
        rows' `raw_statistics` when already computed (by validation). With `distributions`
        (dense rows only) returns (outcomes, `ProcessedDistributions`): each row's processed
        distribution, the one its selector draws from (speculative verification)."""
        rows = len(states)
        sparse = logits if isinstance(logits, SparseLogits) else None
        top_n = [s.policy.settings["logprobs"] for s in states]
        if sparse is not None:
            stats = sparse.statistics()
        elif statistics is not None:
            stats = statistics.with_top(logits, max(top_n, default=0))
        else:
            stats = raw_statistics(logits, max(top_n, default=0))
        inputs = RowInputs(None if sparse is not None else logits, stats, reference, signals,
                           sparse)
        explanations: list[dict[str, Any]] = [{} for _ in range(rows)]
        tokens = torch.empty(rows, dtype=torch.int64, device=self.device)
        processed_chosen = torch.zeros(rows, device=self.device)
        processed_top: list[TopList] = [()] * rows
        processed_stats: list[tuple[float, float] | None] = [None] * rows
        memory: list[dict[str, Any]] = [{} for _ in range(rows)]
        refusals = [] if sparse is None else _raw_top_refusals(sparse, top_n)
        probs = ProcessedDistributions(rows) if distributions and sparse is None else None
        groups = self._groups(states)
        for row_list in groups:
            index = torch.tensor(row_list, device=self.device)
            group = [states[i] for i in row_list]
            whole = len(groups) == 1
            own_inputs = inputs if whole else inputs.select(index)
            selector = group[0].policy.selector
            args = self._stage_args(selector.stage, [s.policy.selector for s in group])
            if sparse is None:
                # The chain works on its own copy (made at its first write when the group is
                # the whole batch): the raw logits are needed below.
                own = logits if whole else logits.index_select(0, index)
                best = own_inputs.statistics.best_id  # the rows' first argmax: their maxima
                candidates, batch = self.process(group, own, own_inputs, shared=whole,
                                                 maxima=own.gather(1, best.unsqueeze(1))[:, 0])
            else:
                candidates, batch, tail = self._process_sparse(group, own_inputs)
                selector.stage.sparse_tail(candidates, args, batch, tail)
                refusals.extend(replace(r, row=row_list[r.row]) for r in tail.refusals.values())
                if refusals:
                    continue  # the step fails: nothing is chosen
                _check_choosable(group, candidates)
            chosen = selector.stage.select(candidates, args, batch)
            tokens.index_copy_(0, index, chosen)
            for j, i in enumerate(row_list):
                memory[i] = batch.pending_for(j)
                explanations[i] = batch.explanation_for(j)
            dist = (selector.stage.distribution(candidates, args, batch)
                    if probs is not None or processed_logprobs else None)
            if probs is not None:
                probs.add(row_list, dist)
            if processed_logprobs:
                processed_chosen.index_copy_(0, index, dist.at(chosen))
                for i, (top, dist_stats) in zip(row_list, processed_reports(
                        dist, [top_n[i] for i in row_list])):
                    processed_top[i], processed_stats[i] = top, dist_stats

        if refusals:
            raise NotExact.of(refusals)
        if sparse is None:
            reports = report_rows(logits, top_n, stats)
            chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        else:  # the rules keep every chosen token among the sent ones
            reports = _reports(Candidates(sparse.values, sparse.ids, sparse.vocab), top_n, stats)
            chosen = sparse.logits_at(tokens.unsqueeze(1)).squeeze(1).tolist()
        outcomes = [RowOutcome(
            token_id=token, logprob=value - report.log_normalizer,
            top_logprobs=report.top_logprobs, entropy=report.entropy,
            varentropy=report.varentropy,
            processed_logprob=p_logprob if processed_logprobs else None,
            processed_top_logprobs=processed_top[i], processed_stats=processed_stats[i],
            memory=memory[i], explanation=explanations[i])
            for i, (token, value, report, p_logprob) in enumerate(
                zip(tokens.tolist(), chosen, reports, processed_chosen.tolist()))]
        return (outcomes, probs) if distributions else outcomes

    @torch.inference_mode()
    def distribution(self, state: SequenceState, logits: torch.Tensor,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
        """log p [vocab] of the distribution `state`'s policy would draw from (−inf = masked);
        `reference` [vocab]: the reference logits, for policies that read them."""
        raw = logits.unsqueeze(0)
        inputs = RowInputs(raw, reference=None if reference is None else reference.unsqueeze(0))
        candidates, batch = self.process([state], raw, inputs, shared=True)
        selector = state.policy.selector
        if not isinstance(selector.stage, Selector):  # a group selector ranks the chain's output
            return candidates.log_softmax().to_dense().squeeze(0)
        args = self._stage_args(selector.stage, [selector])
        return selector.stage.distribution(candidates, args, batch).to_dense().squeeze(0)
