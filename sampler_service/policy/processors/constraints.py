"""Constraints on which tokens may be produced at a step."""
from __future__ import annotations

import math

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch


class MinTokens(Processor):
    """Masks the sequence's EOS and stop ids to −inf while fewer than `min_tokens` were generated.

    Peer: vLLM `min_tokens` (Hugging Face `MinNewTokensLengthLogitsProcessor`). The stop set is
    the sequence's `eos_token_ids` ∪ `stop_token_ids`. Constraint; reads the output length.
    Off: min_tokens = 0.
    """

    key = "min_tokens"
    role = "constraint"
    params = (Param("min_tokens", "int", default=0, off=0, minimum=0,
                    doc="tokens generated before EOS / stop ids are allowed"),)
    flat_names = {"min_tokens": "min_tokens"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        active = batch.positions < args["min_tokens"]
        if not bool(active.any()):
            return
        rows, tokens = batch.stop_token_pairs()
        on = active[rows]
        rows, tokens = rows[on], tokens[on]
        present, columns = candidates.locate(rows, tokens)
        candidates.update(rows[present], columns, torch.full_like(columns, -math.inf,
                                                                  dtype=candidates.values.dtype))
