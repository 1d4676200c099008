"""Repetition, frequency and presence penalties (vLLM / OpenAI semantics).

They read the per-sequence token counts kept in `TokenHistory`, so a step costs
O(rows × distinct tokens), and touch only the (row, token) pairs that occurred.
"""
from __future__ import annotations

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch


def _penalise(candidates: Candidates, active: torch.Tensor, rows: torch.Tensor,
              tokens: torch.Tensor, extra: torch.Tensor | None, rule) -> None:
    """Applies `rule(values, rows, extra)` at the (row, token) pairs of active rows."""
    on = active[rows]
    rows, tokens = rows[on], tokens[on]
    present, columns = candidates.locate(rows, tokens)
    rows = rows[present]
    extra = None if extra is None else extra[on][present]
    values = candidates.values[rows, columns]
    candidates.update(rows, columns, rule(values, rows, extra))


class RepetitionPenalty(Processor):
    """CTRL repetition penalty over prompt ∪ output: l/θ if l > 0 else l·θ.

    Applied once per distinct token whatever its count. Peer: vLLM `repetition_penalty`
    (identical to Hugging Face's `RepetitionPenaltyLogitsProcessor` over the full input ids).
    Transform; reads the sequence's distinct prompt and output tokens, which grow by one
    token per accepted step. Off: θ = 1.0.
    """

    key = "repetition_penalty"
    role = "transform"
    params = (Param("penalty", "float", default=1.0, off=1.0, minimum=0.0, exclusive_minimum=True,
                    doc="θ; > 1 discourages repeats"),)
    flat_names = {"penalty": "repetition_penalty"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        theta = args["penalty"]
        active = theta != 1.0
        if bool(active.any()):
            rows, tokens = batch.seen_token_pairs()
            _penalise(candidates, active, rows, tokens, None,
                      lambda v, r, _: torch.where(v > 0, v / theta[r], v * theta[r]))


class FrequencyPenalty(Processor):
    """OpenAI frequency penalty: l − c·f, c = how often the token occurs in the output.

    Peer: vLLM `frequency_penalty` (the prompt does not count). Transform; reads the sequence's
    output token counts. Off: f = 0.
    """

    key = "frequency_penalty"
    role = "transform"
    params = (Param("penalty", "float", default=0.0, off=0.0, minimum=-2.0, maximum=2.0,
                    doc="f, subtracted once per occurrence"),)
    flat_names = {"penalty": "frequency_penalty"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        f = args["penalty"]
        active = f != 0.0
        if bool(active.any()):
            rows, tokens, counts = batch.output_count_pairs()
            _penalise(candidates, active, rows, tokens, counts, lambda v, r, c: v - c * f[r])


class PresencePenalty(Processor):
    """OpenAI presence penalty: l − r for every token that occurs in the output.

    Peer: vLLM `presence_penalty` (the prompt does not count). Transform; reads the sequence's
    output tokens. Off: r = 0.
    """

    key = "presence_penalty"
    role = "transform"
    params = (Param("penalty", "float", default=0.0, off=0.0, minimum=-2.0, maximum=2.0,
                    doc="r, subtracted once if the token occurred"),)
    flat_names = {"penalty": "presence_penalty"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        r = args["penalty"]
        active = r != 0.0
        if bool(active.any()):
            rows, tokens, _ = batch.output_count_pairs()
            _penalise(candidates, active, rows, tokens, None, lambda v, rr, _: v - r[rr])
