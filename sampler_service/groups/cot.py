"""CoT decoding (Wang & Zhou 2024, "Chain-of-Thought Reasoning Without Prompting").

The first step takes the prompt's one row and branches on its k most likely tokens (of the
distribution the policy's chain leaves; ties to the lowest id), answering k rows that all name
that row as parent. Each branch then continues greedily (the chain still applies) until it
finishes. With `branch_at: chaotic_point` the group first decodes one greedy row (the trunk)
and branches at the first step the chain's `sed` stage flags as chaotic (SED, Luo et al.
2024): the branches share the trunk's tokens, and a trunk that finishes without a chaotic
point is the only path. Each path gets the confidence
    Δ = mean over its answer tokens x_t of ( p(x_t¹ | x_<t) − p(x_t² | x_<t) ),
p the model's raw distribution and x¹, x² its two most likely tokens at that step. The answer
span is every generated token (the final EOS or stop id excluded), or, with `answer_after`,
the tokens after the first occurrence of that id sequence (a path without it has an empty
span and Δ = 0). The result lists the paths best first by Δ (ties: branch order) and the
answers aggregated as the paper's "sum of Δ over paths with the same answer", best first.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.groups.base import (AnswerVote, Group, GroupRecord, GroupResult, GroupStep,
                                         Hypothesis, history, restore_branch, row_records)
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import GroupSelector, RowInputs
from sampler_service.policy.resolved import Link
from sampler_service.policy.selectors.greedy import Greedy
from sampler_service.policy.statistics import top_two_logits
from sampler_service.state import FinishReason, SequenceState
from sampler_service.state.resume import Reader, row_state

if TYPE_CHECKING:
    from sampler_service.engine import Engine


def top2_margins(logits: torch.Tensor) -> list[float]:
    """p(top1) − p(top2) of each row's raw distribution (a one-token vocabulary gives p(top1))."""
    first, second = top_two_logits(logits)
    normalizer = torch.logsumexp(logits, dim=1)
    return (torch.exp(first - normalizer) - torch.exp(second - normalizer)).tolist()


def answer_span(output: tuple[int, ...], stop_ids: frozenset[int], marker: tuple[int, ...]
                ) -> tuple[int, int]:
    """[start, end) of the answer span in `output` (see the module docstring)."""
    end = len(output) - 1 if output and output[-1] in stop_ids else len(output)
    if not marker:
        return 0, end
    for start in range(end - len(marker) + 1):
        if output[start:start + len(marker)] == marker:
            return start + len(marker), end
    return end, end


class CotGroup(Group):
    """k greedy branches from the k best tokens of the branching step (see the module
    docstring). Before it branches, the group is one greedy row, the trunk (`branches[0]`)."""

    kind = "cot"
    drafts_refusal = ("CoT decoding branches on the top-k of its first step and ranks paths by "
                      "answer confidence: its branches take one token per step")

    def __init__(self, root: SequenceState, k: int, answer_after: tuple[int, ...],
                 at_chaotic_point: bool):
        super().__init__(root)
        self.k = k
        self.answer_after = answer_after
        self.at_chaotic_point = at_chaotic_point
        trunk = self.branch_state(0)
        trunk.policy = replace(trunk.policy, selector=Link(Greedy(), {}))
        self.branches: list[SequenceState] = [trunk]
        self.margins: list[list[float]] = [[]]
        self.sums: list[float] = [0.0]
        self.branched = False

    @property
    def running_rows(self) -> int:
        return len(self._live())

    def _live(self) -> list[int]:
        return [i for i, b in enumerate(self.branches) if not b.finished]

    def running(self) -> list[Hypothesis]:
        return [Hypothesis(tuple(self.branches[i].output_ids), self.sums[i], self.sums[i],
                           FinishReason.NONE, i, **history(self.branches[i]))
                for i in self._live()]

    def hypotheses(self) -> list[Hypothesis]:
        if self.result:
            return list(self.result.hypotheses)
        return self._paths(self.branches, self.margins, self.sums, only_finished=True)

    def _paths(self, branches, margins, sums, only_finished: bool) -> list[Hypothesis]:
        paths = []
        for i, (branch, margin, total) in enumerate(zip(branches, margins, sums)):
            if only_finished and not branch.finished:
                continue
            output = tuple(branch.output_ids)
            start, end = answer_span(output, branch.stop_ids, self.answer_after)
            confidence = sum(margin[start:end]) / (end - start) if end > start else 0.0
            paths.append(Hypothesis(output, confidence, total, branch.finish_reason, i,
                                    confidence, output[start:end], **history(branch)))
        paths.sort(key=lambda h: -h.score)
        return paths

    def resume_state(self) -> dict[str, Any]:
        """`branches`: each branch's row state with its `output_ids` and their statistics (the
        trunk alone before it branched); `margins`: each branch's top-2 margin per token;
        `sums`: their cumulative raw logprobs; `branched`."""
        return {"branches": [row_state(b, with_tokens=True) for b in self.branches],
                "margins": [list(m) for m in self.margins], "sums": list(self.sums),
                "branched": self.branched}

    def load_state(self, reader: Reader, position: int) -> None:
        branched = reader.flag("branched")
        rows = reader.readers("branches")
        if not (1 <= len(rows) <= self.k) or (not branched and len(rows) != 1):
            raise InvalidArgument(f"{len(rows)} branches: the trunk alone before the group "
                                  f"branches, 1 to k = {self.k} after", reader.where("branches"))
        trunk = self.branches[0]
        branches = [trunk.branch(f"{self.sequence_id}#{i}") for i in range(len(rows))]
        for branch, data in zip(branches, rows):
            restore_branch(branch, data, position, "branch")
        self.margins = reader.number_lists("margins", [len(b.output_ids) for b in branches])
        self.branches, self.branched = branches, branched
        self.sums = reader.numbers("sums", len(rows), scores=True)

    def plan(self, engine: "Engine", inputs: RowInputs, processed_logprobs: bool) -> GroupStep:
        logits = inputs.raw
        margins_in = top2_margins(logits)
        live = self._live()
        if not self.branched and not self.at_chaotic_point:
            return self._fan_out(engine, inputs, margins_in[0], processed_logprobs)
        outcomes = engine.step([self.branches[i] for i in live], logits, processed_logprobs,
                               reference=inputs.reference, signals=inputs.signals)
        if not self.branched and outcomes[0].explanation.get("sed", {}).get("chaotic"):
            return self._fan_out(engine, inputs, margins_in[0], processed_logprobs)
        branches, margins, sums = list(self.branches), [list(m) for m in self.margins], list(self.sums)
        records = []
        for row, (i, outcome) in enumerate(zip(live, outcomes)):
            branches[i] = self.branches[i].branch(self.branches[i].sequence_id)
            sums[i] += outcome.logprob
            margins[i].append(margins_in[row])
            records.append(branches[i].record_step(outcome, logits.shape[1], row, sums[i]))
        return self._step(tuple(records), branches, margins, sums, branched=self.branched,
                          inputs=inputs)

    def _fan_out(self, engine: "Engine", inputs: RowInputs, margin: float,
                 processed_logprobs: bool) -> GroupStep:
        """Branches the trunk on the k best tokens of the chain's distribution (ties: lowest
        id), each branch a copy of the trunk plus its token. With `processed_logprobs`, each
        branch reports its token under that distribution, log_softmax of the chain's output
        (the one `Engine.distribution` gives for a group selector), not under the greedy
        point mass its later steps report."""
        logits, trunk = inputs.raw, self.branches[0]
        # The root's policy: the trunk's greedy selector drops the chain's trailing
        # argmax-keeping truncations (`ResolvedPolicy.active_links`), which bound the branches.
        ranking = copy.copy(trunk)
        ranking.policy = self.root.policy
        candidates, batch = engine.process([ranking], logits.clone(), inputs)
        processed = candidates.to_dense()[0]
        finite = int(torch.isfinite(processed).sum())
        tokens = torch.sort(processed, descending=True, stable=True).indices[
            :min(self.k, finite)].tolist()
        records = row_records(logits, self.step_number, [0] * len(tokens), tokens,
                              [0.0] * len(tokens), self.root.policy.settings["logprobs"],
                              explanations=[batch.explanation_for(0)],
                              processed=candidates.log_softmax().to_dense()
                              if processed_logprobs else None)
        branches, margins, sums = [], [], []
        for i, record in enumerate(records):
            branch = trunk.branch(f"{self.sequence_id}#{i}")
            branch.vocab_size = logits.shape[1]
            branch.accept(record.token_id, record.entropy, record.varentropy)
            branches.append(branch)
            margins.append(self.margins[0] + [margin])
            sums.append(self.sums[0] + record.logprob)
        records = tuple(replace(r, score=total, finished=b.finished, finish_reason=b.finish_reason,
                                stop_token_id=b.stop_token_id)
                        for r, b, total in zip(records, branches, sums))
        return self._step(records, branches, margins, sums, branched=True, inputs=inputs)

    def _step(self, records, branches, margins, sums, branched: bool,
              inputs: RowInputs) -> GroupStep:
        result = None
        if all(b.finished for b in branches):
            paths = self._paths(branches, margins, sums, only_finished=False)
            result = GroupResult(tuple(paths), _votes(paths))

        def apply() -> None:
            self.branches, self.margins, self.sums = branches, margins, sums
            self.branched = branched

        return GroupStep(GroupRecord(self.step_number, inputs.raw.shape[0], records, result),
                         inputs.raw.shape[1], apply)


def _votes(paths: list[Hypothesis]) -> tuple[AnswerVote, ...]:
    totals: dict[tuple[int, ...], list[float]] = defaultdict(list)
    for path in paths:
        totals[path.answer_ids].append(path.confidence or 0.0)
    votes = [AnswerVote(answer, sum(deltas), len(deltas)) for answer, deltas in totals.items()]
    votes.sort(key=lambda v: -v.total_confidence)
    return tuple(votes)


class CotDecoding(GroupSelector):
    """CoT decoding (Wang & Zhou 2024): branch on the k best first tokens, continue each branch
    greedily, rank paths by the answer span's mean top-1 − top-2 probability margin Δ and vote
    answers by summed Δ. See `sampler_service.groups.cot`. Per-sequence state: the branches
    (full row states), their margins and cumulative raw logprobs."""

    key = "cot"
    kind = "cot"
    params = (
        Param("k", "int", default=10, off=None, minimum=1,
              doc="branches: the k most likely first tokens (the paper's default is 10)"),
        Param("answer_after", "int_list", default=(), off=(),
              doc="token ids that open the answer span (e.g. the ids of \"The answer is\"); "
                  "empty = every generated token"),
        Param("branch_at", "choice", default="first_step", off=None,
              choices=("first_step", "chaotic_point"),
              doc="first_step: the paper's rule; chaotic_point: decode greedily until the "
                  "chain's `sed` stage flags a chaotic point (SED), and branch there"),
    )

    def new_group(self, root: SequenceState, values: Mapping[str, Any], max_rows: int,
                  field: str, params_field: str) -> CotGroup:
        if values["k"] > max_rows:
            raise InvalidArgument(f"k = {values['k']} exceeds this service's cap of {max_rows} "
                                  "rows per group (--max-group-rows)", f"{field}.k")
        at_chaotic_point = values["branch_at"] == "chaotic_point"
        if at_chaotic_point and not any(l.stage.key == "sed" for l in root.policy.links):
            raise InvalidArgument("branch_at: chaotic_point needs a `sed` stage in the chain to "
                                  "flag chaotic points", f"{field}.branch_at")
        return CotGroup(root, values["k"], tuple(values["answer_after"]), at_chaotic_point)
