"""Final-logit soft-capping as a Sampler Sidecar processor."""
from __future__ import annotations

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch


class LogitSoftcap(Processor):
    """Soft-caps the logits into (−c, c): l' = c · tanh(l / c).

    Peer: Gemma 2's final-logit soft-capping (Gemma Team 2024; Hugging Face
    `Gemma2ForCausalLM`, `final_logit_softcapping` = 30). Use it for a model that does not cap
    its own logits (Gemma 2 in Hugging Face already does). tanh is increasing, so the order of
    the tokens is kept (up to float32 saturation for |l| ≫ c); the head of the distribution
    gets flatter, the more so the smaller c. Masked tokens (−inf) stay masked. Transform; keeps
    no per-sequence state. Off: c = 0.
    """

    key = "logit_softcap"
    role = "transform"
    params = (Param("cap", "float", default=0.0, off=0.0, minimum=0.0,
                    doc="c, the bound on |l'|; 0 turns it off"),)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        cap = args["cap"]
        rows = (cap > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        values = candidates.values.index_select(0, rows)
        c = cap.index_select(0, rows).unsqueeze(1).to(values.dtype)
        capped = torch.where(torch.isneginf(values), values, c * torch.tanh(values / c))
        # Through `writable()`: the values may still be the raw logits, shared with the engine.
        candidates.writable().index_copy_(0, rows, capped)  # increasing: a sparse batch stays sorted
