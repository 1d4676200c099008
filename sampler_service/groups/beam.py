"""Beam search with Hugging Face's semantics, and diverse (group) beam search.

Per step, for W running beams with processed log-probabilities s[b, t] and running scores
S[b] (HF `generate(num_beams=W)`, transformers 5.x `_beam_search`, batch of one):
  1. K = max(2, 1 + #stop ids) · W candidates: the top K of S[b] + s[b, t] over all W × V.
  2. A candidate "hits" when t is an EOS/stop id or the output reaches max_tokens.
  3. Running beams: the top W candidates after adding −1e9 to those that hit.
  4. Finished slots (W of them): a hitting candidate among the first W competes with score
     (S[b] + s[b, t]) / L^α, L = generated length including t, α = length_penalty
     (or GNMT's ((5 + L)^α / 6^α)); −1e9 is added when early_stopping is true and every slot
     is filled, or when the heuristic below says no improvement is possible.
  5. Improvement heuristic (HF `_check_early_stop_heuristic`): the best running score divided
     by the penalty of L (or of max_tokens when early_stopping is "never" and α > 0) must beat
     the worst finished slot (any empty slot counts as −1e9).
  6. The search ends when no improvement is possible, when early_stopping is true and every
     slot is filled, or when every candidate hit.
The same tensor operations as HF run in the same order, so the tokens match `generate()`
exactly. The first step takes W identical rows (the prompt expanded, as HF does), the first
beam scoring 0 and the others −1e9.

Diverse beam search (Vijayakumar et al. 2016; HF `num_beam_groups`, `diversity_penalty`, in
transformers 4.x `_group_beam_search`): W beams form G groups of W/G; the groups step one after
another, each running the step above on its own beams and slots after subtracting
diversity_penalty × (how many beams of earlier groups chose t at this step) from s[·, t].
A group that finished stops sending rows; the result merges every group's slots, best first.
"""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.engine import report_rows
from sampler_service.groups.base import (Group, GroupRecord, GroupResult, GroupStep, Hypothesis,
                                         history, row_records)
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import GroupSelector, RowInputs
from sampler_service.state import FinishReason, SequenceState
from sampler_service.state.resume import Reader, packed_doubles, restore_row, row_state

if TYPE_CHECKING:
    from sampler_service.engine import Engine

#: HF's stand-in for "impossible" scores; kept identical so ties and sums behave the same.
NEG = -1.0e9


@dataclass(frozen=True)
class BeamSettings:
    width: int
    groups: int
    length_penalty: float
    gnmt: bool
    early_stopping: str  # "true" | "false" | "never"
    num_return_sequences: int
    diversity_penalty: float
    max_tokens: int

    def penalty(self, length: int) -> float:
        """The length normaliser of a hypothesis of `length` generated tokens."""
        if self.gnmt:
            return ((5 + length) ** self.length_penalty) / (6 ** self.length_penalty)
        return length ** self.length_penalty


def _doubles(values: Sequence[float] = ()) -> array:
    return array("d", values)


@dataclass(frozen=True)
class Slot:
    """One finished-hypothesis slot of a beam group (HF `sequences` / `beam_scores` entry),
    with the raw entropy and varentropy of each of its tokens (GetSequence's history), kept
    as arrays of doubles: 16 bytes per token, at most W slots per beam group."""

    token_ids: tuple[int, ...] = ()
    sum_logprobs: float = NEG
    finish_reason: FinishReason = FinishReason.NONE
    branch: int = 0
    entropies: array = field(default_factory=_doubles)
    varentropies: array = field(default_factory=_doubles)


@dataclass(frozen=True)
class Beams:
    """The state of one group of beams between steps (tensors are float32 / bool, on CPU)."""

    rows: tuple[SequenceState, ...]
    scores: torch.Tensor          # [w] running scores
    slots: tuple[Slot, ...]       # [w] finished slots, best first
    slot_scores: torch.Tensor     # [w]
    slot_finished: torch.Tensor   # [w] bool
    improvable: bool = True
    done: bool = False

    @classmethod
    def start(cls, rows: tuple[SequenceState, ...]) -> "Beams":
        width = len(rows)
        scores = torch.zeros(width)
        scores[1:] = NEG
        return cls(rows, scores, (Slot(),) * width, torch.full((width,), NEG),
                   torch.zeros(width, dtype=torch.bool))


@dataclass(frozen=True)
class Advance:
    """One group's step: its new state and, per new running beam, parent and token."""

    beams: Beams
    parents: list[int]
    tokens: list[int]


def advance(beams: Beams, scores: torch.Tensor, stop_ids: torch.Tensor, generated: int,
            settings: BeamSettings, slot_offset: int,
            row_stats: Sequence[tuple[float, float]] | None = None) -> Advance:
    """One HF beam-search step of `beams` over processed log-probabilities `scores` [w, V].

    `generated` is the output length once this step's token is appended; `slot_offset` the
    index of this group's first beam among all the group's rows (for `Slot.branch`);
    `row_stats` the raw (entropy, varentropy) of each beam's row at this step, which a
    hypothesis finishing from it appends to the beam's history (None: NaN)."""
    width, vocab = scores.shape
    keep = max(2, 1 + stop_ids.numel()) * width
    accumulated = (scores + beams.scores[:, None]).reshape(1, -1)
    top_scores, top_indices = torch.topk(accumulated, k=keep)
    parents, tokens = top_indices // vocab, top_indices % vocab
    hits = torch.isin(tokens, stop_ids) | (settings.max_tokens <= generated)

    running_scores = top_scores + hits.to(torch.float32) * NEG
    chosen = torch.topk(running_scores, k=width)[1]
    new_scores = running_scores.gather(1, chosen)[0]
    new_parents, new_tokens = parents.gather(1, chosen)[0].tolist(), tokens.gather(1, chosen)[0].tolist()

    just_finished = hits & (torch.arange(keep) < width)[None, :]
    finished_scores = top_scores / settings.penalty(generated)
    slots_full = bool(beams.slot_finished.all()) and settings.early_stopping == "true"
    finished_scores += torch.tensor(float(slots_full)) * NEG
    finished_scores += torch.tensor(float(not beams.improvable)) * NEG
    finished_scores += (~just_finished).to(torch.float32) * NEG
    merged_scores = torch.cat((beams.slot_scores[None, :], finished_scores), dim=1)
    merged_finished = torch.cat((beams.slot_finished[None, :], just_finished), dim=1)
    best = torch.topk(merged_scores, k=width)[1][0]
    slot_scores = merged_scores[0, best]
    slot_finished = merged_finished[0, best]
    stop_set = set(stop_ids.tolist())
    candidate_parents, candidate_tokens = parents[0].tolist(), tokens[0].tolist()
    slots = []
    for index in best.tolist():
        if index < width:
            slots.append(beams.slots[index])
            continue
        parent, token = candidate_parents[index - width], candidate_tokens[index - width]
        row = beams.rows[parent]
        entropy, varentropy = (math.nan, math.nan) if row_stats is None else row_stats[parent]
        slots.append(Slot(tuple(row.output_ids) + (token,),
                          float(top_scores[0, index - width]),
                          FinishReason.STOP if token in stop_set else FinishReason.LENGTH,
                          slot_offset + parent, _doubles(row.entropies + [entropy]),
                          _doubles(row.varentropies + [varentropy])))

    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_length = settings.max_tokens
    else:
        best_length = generated
    best_possible = new_scores[:1] / settings.penalty(best_length)
    worst_finished = torch.where(slot_finished, torch.min(slot_scores), torch.tensor(NEG))
    improvable = beams.improvable and bool((best_possible > worst_finished).any())
    done = (not improvable or (bool(slot_finished.all()) and settings.early_stopping == "true")
            or bool(hits.all()))
    new_beams = Beams(beams.rows, new_scores, tuple(slots), slot_scores, slot_finished,
                      improvable, done)
    return Advance(new_beams, new_parents, new_tokens)


class BeamGroup(Group):
    """A beam-search group: W rows per step in beam order (see the module docstring)."""

    kind = "beam"
    drafts_refusal = ("beam search ranks the continuations of every row together, so a row's "
                      "next tokens are not its own policy's choice: drafts cannot be verified")

    def __init__(self, root: SequenceState, settings: BeamSettings):
        super().__init__(root)
        self.settings = settings
        size = settings.width // settings.groups
        self.beams: tuple[Beams, ...] = tuple(
            Beams.start(tuple(self.branch_state(g * size + i) for i in range(size)))
            for g in range(settings.groups))

    @property
    def running_rows(self) -> int:
        return sum(len(b.rows) for b in self.beams if not b.done)

    def running(self) -> list[Hypothesis]:
        return [Hypothesis(tuple(row.output_ids), score, score, FinishReason.NONE, index,
                           **history(row))
                for b in self.beams if not b.done
                for index, (row, score) in enumerate(zip(b.rows, b.scores.tolist()))]

    def hypotheses(self) -> list[Hypothesis]:
        if self.result is not None:
            return list(self.result.hypotheses)
        return _ranked(self.beams, only_filled=True)

    def resume_state(self) -> dict[str, Any]:
        """`groups`: per beam group (one without diversity), its `rows` (row states with their
        `output_ids` and statistics, in beam order), running `scores`, finished `slots`
        (`token_ids`, `sum_logprobs`, `finish_reason`, `branch`, `entropies`, `varentropies`),
        `slot_scores`, `slot_finished`, `improvable` and `done`."""
        return {"groups": [{
            "rows": [row_state(row, with_tokens=True) for row in b.rows],
            "scores": b.scores.tolist(),
            "slots": [{"token_ids": list(slot.token_ids), "sum_logprobs": slot.sum_logprobs,
                       "finish_reason": int(slot.finish_reason), "branch": slot.branch,
                       "entropies": packed_doubles(slot.entropies),
                       "varentropies": packed_doubles(slot.varentropies)}
                      for slot in b.slots],
            "slot_scores": b.slot_scores.tolist(), "slot_finished": b.slot_finished.tolist(),
            "improvable": b.improvable, "done": b.done} for b in self.beams]}

    def load_state(self, reader: Reader, position: int) -> None:
        beams = []
        for b, group in zip(self.beams, reader.readers("groups", len(self.beams))):
            width = len(b.rows)
            for row, data in zip(b.rows, group.readers("rows", width)):
                ids = data.token_ids("output_ids")
                if len(ids) != position:
                    raise InvalidArgument(f"a running beam has one token per step: {len(ids)} "
                                          f"tokens after {position} steps", data.where("output_ids"))
                restore_row(row, ids, data, data.where("output_ids"), data.history(len(ids)),
                            data.where("entropies"), past_finish=True)
            slots = tuple(_slot(s, self.settings.width) for s in group.readers("slots", width))
            beams.append(Beams(
                b.rows, torch.tensor(group.numbers("scores", width, scores=True)), slots,
                torch.tensor(group.numbers("slot_scores", width, scores=True)),
                torch.tensor(group.flags("slot_finished", width)),
                group.flag("improvable"), group.flag("done")))
        self.beams = tuple(beams)

    def plan(self, engine: "Engine", inputs: RowInputs, processed_logprobs: bool) -> GroupStep:
        """With `processed_logprobs`, each output row reports the value its beam's score added
        for its token: its parent row's processed log-probability (the chain's output on the
        raw log-probabilities, less the diversity penalty; not renormalised), which is what
        Hugging Face's beam search reports in `generate(..., output_scores=True,
        return_dict_in_generate=True).scores` (see `Choice.processed_logprob` in the proto)."""
        settings, logits = self.settings, inputs.raw
        size = settings.width // settings.groups
        live = [g for g, b in enumerate(self.beams) if not b.done]
        rows = [row for g in live for row in self.beams[g].rows]
        top_n = self.root.policy.settings["logprobs"]
        reports = report_rows(logits, [top_n] * len(rows))
        candidates, batch = engine.process(rows, torch.log_softmax(logits, dim=-1), inputs)
        processed = candidates.to_dense().cpu()
        stop_ids = torch.tensor(sorted(self.root.stop_ids), dtype=torch.int64)
        generated = self.step_number + 1
        steps: dict[int, Advance] = {}
        chosen_so_far: list[int] = []
        ranked: list[torch.Tensor] = []  # the scores each live group chose by, in row order
        for order, g in enumerate(live):
            scores = processed[order * size:(order + 1) * size]
            if settings.diversity_penalty > 0 and chosen_so_far:
                frequency = torch.bincount(torch.tensor(chosen_so_far), minlength=scores.shape[1])
                scores = scores - settings.diversity_penalty * frequency
            ranked.append(scores)
            steps[g] = advance(self.beams[g], scores, stop_ids, generated, settings, g * size,
                               [(r.entropy, r.varentropy)
                                for r in reports[order * size:(order + 1) * size]])
            chosen_so_far += steps[g].tokens

        parents = [order * size + p for order, g in enumerate(live) for p in steps[g].parents]
        tokens = [t for g in live for t in steps[g].tokens]
        records = row_records(logits, self.step_number, parents, tokens,
                              [s for g in live for s in steps[g].beams.scores.tolist()],
                              top_n, reports=reports,
                              explanations=[batch.explanation_for(r) for r in range(len(rows))],
                              processed=torch.cat(ranked) if processed_logprobs else None)
        reason = FinishReason.LENGTH if generated >= settings.max_tokens else FinishReason.STOP
        done = [steps[g].beams.done for g in live for _ in range(size)]
        records = tuple(replace(r, finished=True, finish_reason=reason) if d else r
                        for r, d in zip(records, done))
        new_beams = list(self.beams)
        for order, g in enumerate(live):
            new_rows = []
            for i in range(size):
                record, source = records[order * size + i], parents[order * size + i]
                row = rows[source].branch(f"{self.sequence_id}#{g * size + i}")
                row.processor_state.update(batch.pending_for(source))
                row.accept(record.token_id, record.entropy, record.varentropy)
                new_rows.append(row)
            new_beams[g] = replace(steps[g].beams, rows=tuple(new_rows))
        result = None
        if all(b.done for b in new_beams):
            result = GroupResult(tuple(_ranked(new_beams, only_filled=False)
                                       [:settings.num_return_sequences]))

        def apply() -> None:
            self.beams = tuple(new_beams)

        return GroupStep(GroupRecord(self.step_number, len(rows), records, result),
                         logits.shape[1], apply)


def _ranked(beams, only_filled: bool) -> list[Hypothesis]:
    """Every group's finished slots, best first (ties: group order, then slot order)."""
    slots = [(score, slot) for b in beams
             for slot, score, filled in zip(b.slots, b.slot_scores.tolist(), b.slot_finished.tolist())
             if filled or not only_filled]
    slots.sort(key=lambda pair: -pair[0])
    return [Hypothesis(s.token_ids, score, s.sum_logprobs, s.finish_reason, s.branch,
                       entropies=tuple(s.entropies), varentropies=tuple(s.varentropies))
            for score, s in slots]


def _slot(data: Reader, width: int) -> Slot:
    """A finished slot from its resume data (without statistics: NaN for each token)."""
    ids = data.token_ids("token_ids")
    stats = data.history(len(ids)) or [(math.nan, math.nan)] * len(ids)
    return Slot(ids, data.score("sum_logprobs"), FinishReason(data.integer("finish_reason", 0, 2)),
                data.integer("branch", 0, width - 1), _doubles(h for h, _ in stats),
                _doubles(v for _, v in stats))


class BeamSearch(GroupSelector):
    """Beam search (Hugging Face `generate(num_beams=W)`), optionally diverse (HF
    `num_beam_groups`, `diversity_penalty`): see `sampler_service.groups.beam`.

    The chain runs on log-probabilities (log_softmax of the logits), as HF applies its
    processors in beam search; the sequence's `max_tokens` is required (HF's max_new_tokens),
    EOS and stop ids end hypotheses. Per-sequence state: running beams (each a full row state:
    output, penalty counts, stage memory), their scores and W finished slots.
    """

    key = "beam"
    kind = "beam"
    params = (
        Param("width", "int", default=4, off=None, minimum=1,
              doc="W: beams kept per step (HF num_beams); the group sends W rows per step"),
        Param("length_penalty", "float", default=1.0, off=None,
              doc="α: a finished hypothesis scores sum_logprobs / L^α (L = generated length "
                  "with its EOS); > 0 favours longer outputs"),
        Param("length_normalization", "choice", default="hf", off=None, choices=("hf", "gnmt"),
              doc="hf: L^α; gnmt: ((5 + L)^α / 6^α) (Wu et al. 2016)"),
        Param("early_stopping", "choice", default="false", off=None,
              choices=("false", "true", "never"),
              doc="HF's early_stopping: true stops once W hypotheses finished; false stops when "
                  "the best running beam (at its current length) cannot beat the worst "
                  "finished one; never (with α > 0) assumes it could grow to max_tokens"),
        Param("num_return_sequences", "int", default=1, off=None, minimum=1,
              doc="hypotheses returned, best first; at most W"),
        Param("groups", "int", default=1, off=1, minimum=1,
              doc="G: diverse beam search with G groups of W/G beams (HF num_beam_groups)"),
        Param("diversity_penalty", "float", default=0.0, off=0.0, minimum=0.0,
              doc="subtracted from a token's log-probability once per beam of an earlier group "
                  "that chose it at this step (HF diversity_penalty)"),
    )

    def new_group(self, root: SequenceState, values: Mapping[str, Any], max_rows: int,
                  field: str, params_field: str) -> BeamGroup:
        width = values["width"]
        if width > max_rows:
            raise InvalidArgument(f"width {width} exceeds this service's cap of {max_rows} rows per "
                                  "group (--max-group-rows)", f"{field}.width")
        if values["num_return_sequences"] > width:
            raise InvalidArgument(f"num_return_sequences = {values['num_return_sequences']} must "
                                  f"be at most width = {width}", f"{field}.num_return_sequences")
        if width % values["groups"]:
            raise InvalidArgument(f"groups = {values['groups']} must divide width = {width}",
                                  f"{field}.groups")
        max_tokens = root.policy.settings["max_tokens"]
        if not max_tokens:
            raise InvalidArgument("beam search needs max_tokens > 0 (Hugging Face's "
                                  "max_new_tokens): set it in the policy's defaults or the request",
                                  f"{params_field}.max_tokens")
        return BeamGroup(root, BeamSettings(
            width=width, groups=values["groups"], length_penalty=values["length_penalty"],
            gnmt=values["length_normalization"] == "gnmt",
            early_stopping=values["early_stopping"],
            num_return_sequences=values["num_return_sequences"],
            diversity_penalty=values["diversity_penalty"], max_tokens=max_tokens))
