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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sampler_service.errors import FailedPrecondition
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors.base import RowBatch, RowInputs, Selector, Stage
from sampler_service.policy.statistics import RawStatistics, raw_statistics
from sampler_service.policy.resolved import Link
from sampler_service.state import SequenceState

_TENSOR_DTYPES = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}
TopList = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RowOutcome:
    """What the engine chose for one row and what it measured."""

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
class RawRowReport:
    """The raw-distribution facts of one input row that every choice continuing it reports."""

    log_normalizer: float
    entropy: float
    varentropy: float
    top_logprobs: TopList


def report_rows(logits: torch.Tensor, top_n: Sequence[int],
                stats: RawStatistics | None = None) -> list[RawRowReport]:
    """Per row of `logits`: log-normaliser, entropy, varentropy and its `top_n[row]` best raw
    logprobs (best first). `stats`: the rows' statistics when already computed."""
    stats = raw_statistics(logits) if stats is None else stats
    top_ids, top_values = _top(Candidates(logits), max(top_n, default=0))
    return [RawRowReport(norm, h, v, tuple((t, value - norm) for t, value in
                                           zip(top_ids[row][:top_n[row]], top_values[row])))
            for row, (norm, h, v) in enumerate(zip(stats.log_normalizer.tolist(),
                                                   stats.entropy.tolist(),
                                                   stats.varentropy.tolist()))]


def _top(candidates: Candidates, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's n best (token ids, values), −inf entries dropped, as Python lists."""
    rows = candidates.rows
    n = min(n, candidates.values.shape[1])
    if n == 0:
        return [[] for _ in range(rows)], [[] for _ in range(rows)]
    values, columns = torch.topk(candidates.values, n, dim=1)
    ids = columns if candidates.ids is None else candidates.ids.gather(1, columns)
    finite = torch.isfinite(values).tolist()
    return ([[t for t, f in zip(r, ok) if f] for r, ok in zip(ids.tolist(), finite)],
            [[v for v, f in zip(r, ok) if f] for r, ok in zip(values.tolist(), finite)])


class Engine:
    """Applies sequences' resolved policies to their logits on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def _stage_args(self, stage: Stage, links: Sequence[Link]) -> dict[str, Any]:
        """Each parameter of `stage` across the group's rows: scalars as one [rows] tensor on
        the device, the other kinds as a list with one value per row."""
        return {p.name: torch.tensor([l.values[p.name] for l in links], dtype=_TENSOR_DTYPES[p.kind],
                                     device=self.device)
                if p.kind in _TENSOR_DTYPES else [l.values[p.name] for l in links]
                for p in stage.params}

    def process(self, states: Sequence[SequenceState], logits: torch.Tensor,
                inputs: RowInputs) -> tuple[Candidates, RowBatch]:
        """Runs the (shared-signature) chain of `states` over `logits`, which it may modify;
        `inputs` holds the untouched raw rows and what else the worker sent for them."""
        batch = RowBatch(states, self.device, inputs)
        candidates = Candidates(logits)
        for position, link in enumerate(states[0].policy.links):
            args = self._stage_args(link.stage, [s.policy.links[position] for s in states])
            link.stage.apply(candidates, args, batch)
            batch.pristine = False
        emptied = torch.isneginf(candidates.max_values())
        if bool(emptied.any()):
            state = states[int(emptied.nonzero()[0])]
            raise FailedPrecondition(
                f"policy {state.policy.name or '(flat parameters)'} masked every token of sequence "
                f"{state.sequence_id!r} at step {state.position} (e.g. min_tokens masked the only "
                "finite logits): no token can be chosen", "logits")
        return candidates, batch

    @staticmethod
    def _groups(states: Sequence[SequenceState]) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for row, state in enumerate(states):
            groups.setdefault(state.policy.signature, []).append(row)
        return list(groups.values())

    @torch.inference_mode()
    def step(self, states: Sequence[SequenceState], logits: torch.Tensor,
             processed_logprobs: bool = False, *, reference: torch.Tensor | None = None,
             signals: dict[str, torch.Tensor] | None = None) -> list[RowOutcome]:
        """Chooses one token per row. `logits` is float32 [len(states), vocab] on the device;
        `reference` (same shape) and `signals` (name -> [rows]) are the worker's optional extras."""
        rows = len(states)
        stats = raw_statistics(logits)
        inputs = RowInputs(logits, stats, reference, signals)
        explanations: list[dict[str, Any]] = [{} for _ in range(rows)]
        tokens = torch.empty(rows, dtype=torch.int64, device=self.device)
        processed_chosen = torch.zeros(rows, device=self.device)
        processed_top: list[TopList] = [()] * rows
        processed_stats: list[tuple[float, float] | None] = [None] * rows
        memory: list[dict[str, Any]] = [{} for _ in range(rows)]
        top_n = [s.policy.settings["logprobs"] for s in states]
        groups = self._groups(states)
        for row_list in groups:
            index = torch.tensor(row_list, device=self.device)
            group = [states[i] for i in row_list]
            # The chain works in place on its own copy: the raw logits are needed below.
            whole = len(groups) == 1
            own = logits.clone() if whole else logits.index_select(0, index)
            candidates, batch = self.process(group, own, inputs if whole else inputs.select(index))
            selector = group[0].policy.selector
            args = self._stage_args(selector.stage, [s.policy.selector for s in group])
            chosen = selector.stage.select(candidates, args, batch)
            tokens.index_copy_(0, index, chosen)
            for j, i in enumerate(row_list):
                memory[i] = batch.pending_for(j)
                explanations[i] = batch.explanation_for(j)
            if processed_logprobs:
                dist = selector.stage.distribution(candidates, args, batch)
                processed_chosen.index_copy_(0, index, dist.at(chosen))
                ids, values = _top(dist, max(top_n[i] for i in row_list))
                dist_stats = raw_statistics(dist.values)
                for j, (i, h, v) in enumerate(zip(row_list, dist_stats.entropy.tolist(),
                                                  dist_stats.varentropy.tolist())):
                    processed_top[i] = tuple(zip(ids[j][:top_n[i]], values[j][:top_n[i]]))
                    processed_stats[i] = (h, v)

        reports = report_rows(logits, top_n, stats)
        chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        return [RowOutcome(
            token_id=token, logprob=value - report.log_normalizer,
            top_logprobs=report.top_logprobs, entropy=report.entropy,
            varentropy=report.varentropy,
            processed_logprob=p_logprob if processed_logprobs else None,
            processed_top_logprobs=processed_top[i], processed_stats=processed_stats[i],
            memory=memory[i], explanation=explanations[i])
            for i, (token, value, report, p_logprob) in enumerate(
                zip(tokens.tolist(), chosen, reports, processed_chosen.tolist()))]

    @torch.inference_mode()
    def distribution(self, state: SequenceState, logits: torch.Tensor,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
        """log p [vocab] of the distribution `state`'s policy would draw from (−inf = masked);
        `reference` [vocab]: the reference logits, for policies that read them."""
        raw = logits.unsqueeze(0)
        inputs = RowInputs(raw, reference=None if reference is None else reference.unsqueeze(0))
        candidates, batch = self.process([state], raw.clone(), inputs)
        selector = state.policy.selector
        if not isinstance(selector.stage, Selector):  # a group selector ranks the chain's output
            return candidates.log_softmax().to_dense().squeeze(0)
        args = self._stage_args(selector.stage, [selector])
        return selector.stage.distribution(candidates, args, batch).to_dense().squeeze(0)
