"""One batched step over many rows of many sequences.

Order of operations for a step (`Engine.step`):
  1. Raw statistics of every row, in one vectorised pass: log-normaliser, entropy H and
     varentropy V (nats), the chosen token's raw logprob and the top-N raw logprobs.
  2. Rows are grouped by their policy's signature (the keys of its stages). Per group, every
     stage's parameters become [rows] tensors once, the processors run in chain order on a
     float32 copy of the group's logits, and the selector picks one token per row.
  3. Optionally, processed logprobs (of the distribution the selector drew from).
The engine reads sequence state but never changes it: the caller accepts the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sampler_service.policy.processors.base import RowBatch, Stage
from sampler_service.policy.resolved import Link
from sampler_service.state import SequenceState

_TENSOR_DTYPES = {"float": torch.float32, "int": torch.int64}


@dataclass(frozen=True)
class RowOutcome:
    """What the engine chose for one row and what it measured."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]
    entropy: float
    varentropy: float
    processed_logprob: float | None = None
    processed_top_logprobs: tuple[tuple[int, float], ...] = ()


def entropy_and_varentropy(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = −Σ p log p and V = Σ p (log p + H)² per row, in nats; −inf entries count as p = 0."""
    probs = torch.exp(log_probs)
    safe = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * safe).sum(dim=1)
    deviation = torch.where(probs > 0, safe + entropy.unsqueeze(1), torch.zeros_like(safe))
    return entropy, (probs * deviation * deviation).sum(dim=1)


def _top(log_probs: torch.Tensor, n: int) -> tuple[list, list]:
    if n == 0:
        return [[] for _ in range(log_probs.shape[0])], [[] for _ in range(log_probs.shape[0])]
    values, ids = torch.topk(log_probs, n, dim=1)
    return ids.tolist(), values.tolist()


class Engine:
    """Applies sequences' resolved policies to their logits on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _stage_args(stage: Stage, links: Sequence[Link]) -> dict[str, torch.Tensor]:
        """Each tensor-valued parameter of `stage` across the group's rows, as a [rows] tensor."""
        return {p.name: torch.tensor([l.values[p.name] for l in links], dtype=_TENSOR_DTYPES[p.kind])
                for p in stage.params if p.kind in _TENSOR_DTYPES}

    def _process(self, states: Sequence[SequenceState],
                 logits: torch.Tensor) -> tuple[torch.Tensor, RowBatch]:
        """Runs the (shared-signature) chain of `states` over a copy of `logits`."""
        batch = RowBatch(states, self.device)
        work = logits.clone()
        chain = states[0].policy.links
        for position, link in enumerate(chain):
            args = self._stage_args(link.stage, [s.policy.links[position] for s in states])
            link.stage.apply(work, {k: v.to(self.device) for k, v in args.items()}, batch)
        return work, batch

    def _groups(self, states: Sequence[SequenceState]) -> dict[tuple, list[int]]:
        groups: dict[tuple, list[int]] = {}
        for row, state in enumerate(states):
            groups.setdefault(state.policy.signature, []).append(row)
        return groups

    @torch.inference_mode()
    def step(self, states: Sequence[SequenceState], logits: torch.Tensor,
             processed_logprobs: bool = False) -> list[RowOutcome]:
        """Chooses one token per row. `logits` is float32 [len(states), vocab] on the device."""
        rows = len(states)
        tokens = torch.empty(rows, dtype=torch.int64, device=self.device)
        processed_chosen = torch.zeros(rows, device=self.device)
        processed_top: list[tuple] = [()] * rows
        for row_list in self._groups(states).values():
            index = torch.tensor(row_list, device=self.device)
            group = [states[i] for i in row_list]
            work, batch = self._process(group, logits.index_select(0, index))
            selector = group[0].policy.selector
            args = self._stage_args(selector.stage, [s.policy.selector for s in group])
            chosen = selector.stage.select(work, {k: v.to(self.device) for k, v in args.items()},
                                           batch)
            tokens.index_copy_(0, index, chosen)
            if processed_logprobs:
                dist = selector.stage.distribution(work, batch)
                processed_chosen.index_copy_(0, index, dist.gather(1, chosen.unsqueeze(1)).squeeze(1))
                n = max(s.policy.settings["logprobs"] for s in group)
                ids, values = _top(dist, n)
                for j, i in enumerate(row_list):
                    k = states[i].policy.settings["logprobs"]
                    processed_top[i] = tuple(zip(ids[j][:k], values[j][:k]))

        log_probs = torch.log_softmax(logits, dim=1)
        entropy, varentropy = entropy_and_varentropy(log_probs)
        chosen_logprob = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top_ids, top_values = _top(log_probs, max(s.policy.settings["logprobs"] for s in states))
        token_list = tokens.tolist()
        columns = zip(token_list, chosen_logprob.tolist(), entropy.tolist(), varentropy.tolist(),
                      processed_chosen.tolist())
        outcomes = []
        for i, (token, logprob, h, v, p_logprob) in enumerate(columns):
            n = states[i].policy.settings["logprobs"]
            outcomes.append(RowOutcome(
                token_id=token, logprob=logprob,
                top_logprobs=tuple(zip(top_ids[i][:n], top_values[i][:n])),
                entropy=h, varentropy=v,
                processed_logprob=p_logprob if processed_logprobs else None,
                processed_top_logprobs=processed_top[i]))
        return outcomes

    @torch.inference_mode()
    def distribution(self, state: SequenceState, logits: torch.Tensor) -> torch.Tensor:
        """log p [vocab] of the distribution `state`'s policy would draw from (−inf = masked)."""
        work, batch = self._process([state], logits.unsqueeze(0))
        return state.policy.selector.stage.distribution(work, batch).squeeze(0)
