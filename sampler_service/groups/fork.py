"""Forks: `n` parallel samples of one prompt and vLLM's `best_of`.

The first step takes the prompt's one row and answers `best_of` rows (n when best_of is not
set), all naming that row as parent; the worker copies its KV cache into each. Fork i is an
independent sequence with seed + i (vLLM's rule for seeded requests), so its tokens are the
same on every run and differ from its siblings'. Later steps send one row per running fork;
a fork that finishes stops sending rows. When every fork finished, the result lists the forks
in fork order with their cumulative raw logprob as score, or, with best_of > n, the n forks
with the highest cumulative raw logprob, best first (vLLM's best_of ranking; its v1 reports raw
logprobs).

Forks verify speculative drafts (docs/speculative.md): each
running fork verifies its own row's drafts as the plain sequence with its seed would, and at
the first step every fork verifies the prompt row's; a fork then advances by the tokens it
emitted and the group by one step, so after verifications a running fork holds at least one
token per step.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.groups.base import (Group, GroupRecord, GroupResult, GroupStep, Hypothesis,
                                         history, restore_branch)
from sampler_service.policy.processors.base import RowInputs
from sampler_service.state import FinishReason, RowOutcome, SequenceState
from sampler_service.state.resume import Reader, row_state

if TYPE_CHECKING:
    from sampler_service.engine import Engine

SEED_SPACE = 2 ** 64


class ForkGroup(Group):
    """`best_of` sampling branches of one root sequence (see the module docstring)."""

    kind = "fork"
    drafts_refusal = None

    def __init__(self, root: SequenceState, n: int, best_of: int):
        super().__init__(root)
        self.n = n
        self.forks = [self.branch_state(i, (root.seed + i) % SEED_SPACE) for i in range(best_of)]
        self.sums = [0.0] * best_of

    @classmethod
    def create(cls, root: SequenceState, max_rows: int, field: str) -> "ForkGroup":
        """Checks `n` and `best_of` of the root's settings; `field` prefixes the parameters."""
        n, best_of = root.policy.settings["n"], root.policy.settings["best_of"]
        best_of = best_of or n
        if best_of < n:
            raise InvalidArgument(f"best_of = {best_of} must be >= n = {n}", f"{field}best_of")
        if best_of > max_rows:
            raise InvalidArgument(f"{best_of} forks exceed this service's cap of {max_rows} rows "
                                  "per group (--max-group-rows)", f"{field}best_of")
        return cls(root, n, best_of)

    def _live(self) -> list[int]:
        return [i for i, fork in enumerate(self.forks) if not fork.finished]

    @property
    def running_rows(self) -> int:
        return 1 if self.step_number == 0 else len(self._live())

    def running(self) -> list[Hypothesis]:
        return [Hypothesis(tuple(self.forks[i].output_ids), self.sums[i], self.sums[i],
                           FinishReason.NONE, i, **history(self.forks[i])) for i in self._live()]

    def _finished(self, forks: list[SequenceState], sums: list[float]) -> list[Hypothesis]:
        done = [Hypothesis(tuple(f.output_ids), total, total, f.finish_reason, i, **history(f))
                for i, (f, total) in enumerate(zip(forks, sums)) if f.finished]
        if len(forks) > self.n:  # best_of: the n best by cumulative logprob
            done.sort(key=lambda h: -h.score)
            return done[:self.n]
        return done

    def hypotheses(self) -> list[Hypothesis]:
        return list(self.result.hypotheses) if self.result else self._finished(self.forks, self.sums)

    def resume_state(self) -> dict[str, Any]:
        """`forks`: each fork's row state with its `output_ids` and their statistics; `sums`:
        their cumulative raw logprobs."""
        return {"forks": [row_state(f, with_tokens=True) for f in self.forks],
                "sums": list(self.sums)}

    def load_state(self, reader: Reader, position: int) -> None:
        rows = reader.readers("forks", len(self.forks))
        self.sums = reader.numbers("sums", len(self.forks), scores=True)
        for fork, row in zip(self.forks, rows):
            restore_branch(fork, row, position, "fork", verifies=True)

    def _lanes(self) -> tuple[list[int], list[int]]:
        """The running forks and the input row each continues (the prompt's at the first step)."""
        live = self._live()
        return live, [0] * len(live) if self.step_number == 0 else list(range(len(live)))

    def plan(self, engine: "Engine", inputs: RowInputs, processed_logprobs: bool) -> GroupStep:
        live, parents = self._lanes()
        rows = inputs.select(torch.tensor(parents, device=inputs.raw.device))
        outcomes = engine.step([self.forks[i] for i in live], rows.raw, processed_logprobs,
                               reference=rows.reference, signals=rows.signals)
        return self._planned(live, parents, [[o] for o in outcomes], inputs.raw.shape[1],
                             inputs.raw.shape[0], verified=False)

    def draft_lanes(self) -> list[tuple[SequenceState, int]]:
        """Each running fork verifies the drafts of the row it continues (at the first step
        every fork verifies the prompt row's, with its own seed)."""
        live, parents = self._lanes()
        return [(self.forks[i], parent) for i, parent in zip(live, parents)]

    def plan_verified(self, outcomes: Sequence[Sequence[RowOutcome]], vocab: int,
                      rows_in: int) -> Callable[[], GroupRecord]:
        live, parents = self._lanes()
        step = self._planned(live, parents, outcomes, vocab, rows_in, verified=True)
        return lambda: self.commit(step)

    def _planned(self, live: list[int], parents: list[int],
                 outcomes: Sequence[Sequence[RowOutcome]], vocab: int, rows_in: int,
                 verified: bool) -> GroupStep:
        """The step in which running fork live[n] continues input row parents[n] with the
        tokens outcomes[n] (one, or a verification's 1 … k + 1)."""
        forks, sums = list(self.forks), list(self.sums)
        records = []
        for i, parent, emitted in zip(live, parents, outcomes):
            forks[i] = self.forks[i].branch(self.forks[i].sequence_id)
            sums[i] += sum(o.logprob for o in emitted)
            record = (forks[i].record_tokens(emitted, vocab, parent, sums[i]) if verified
                      else forks[i].record_step(emitted[0], vocab, parent, sums[i]))
            records.append(replace(record, step=self.step_number))  # the group's step
        result = None
        if all(f.finished for f in forks):
            result = GroupResult(tuple(self._finished(forks, sums)))

        def apply() -> None:
            self.forks, self.sums = forks, sums

        record = GroupRecord(self.step_number, rows_in, tuple(records), result)
        return GroupStep(record, vocab, apply)
