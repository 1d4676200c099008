"""Truncation processors: they keep a subset of tokens and mask the rest to −inf.

None of them sorts the whole vocabulary. When a truncation is on for every row of a batch, it
turns the batch sparse (`Candidates.restrict`): later stages then work on the survivors only.
A row whose parameter is off is not touched.
"""
from __future__ import annotations

import math

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch

#: Top-p's first best-first prefix on a dense batch; grown 4x until it holds the mass.
TOP_P_FIRST_PREFIX = 1024


def _truncate(candidates: Candidates, on: torch.Tensor, threshold: torch.Tensor,
              best: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keeps values ≥ threshold in the rows that are `on`; `best` is the best-first prefix the
    threshold came from. All rows on: the batch may turn sparse. Otherwise masks in place."""
    if bool(on.all()):
        candidates.restrict(threshold, best)
    else:
        candidates.mask_below(torch.where(on, threshold, torch.full_like(threshold, -math.inf)))


class TopK(Processor):
    """Keeps the tokens whose logit is ≥ the k-th largest logit of the row (ties kept).

    Peer: vLLM / Hugging Face `top_k`. Filter; no per-sequence state.
    Off: k = 0, or k ≥ vocabulary size.
    """

    key = "top_k"
    role = "filter"
    params = (Param("k", "int", default=0, off=0, minimum=0, doc="number of best tokens kept"),)
    flat_names = {"k": "top_k"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        k = args["k"]
        on = (k > 0) & (k < candidates.vocab)
        if not bool(on.any()):
            return
        # One column past the largest k shows whether ties spill over the k-th value.
        best = candidates.best_first(int(k[on].max()) + 1)
        width = best[0].shape[1]
        kth = best[0].gather(1, (k.clamp(min=1, max=width) - 1).unsqueeze(1)).squeeze(1)
        # A sparse row with fewer than k candidates keeps them all.
        _truncate(candidates, on & (k <= width), kth, best)


class MinP(Processor):
    """Keeps tokens with p_i ≥ p · p_max, p the distribution at this point of the chain.

    Computed in logit space, l_i ≥ max(l) + ln(p), which needs no softmax.
    Peer: vLLM `min_p` (Hugging Face `MinPLogitsWarper`). Filter; no per-sequence state.
    Off: p = 0.
    """

    key = "min_p"
    role = "filter"
    params = (Param("p", "float", default=0.0, off=0.0, minimum=0.0, maximum=1.0,
                    doc="fraction of the best token's probability a token needs"),)
    flat_names = {"p": "min_p"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        p = args["p"]
        if bool((p > 0).any()):
            candidates.mask_below(candidates.max_values() + torch.log(p))  # log 0 = −inf: off


class TopP(Processor):
    """Nucleus sampling: keeps the best-first tokens whose preceding mass is < p.

    With tokens sorted by probability, best first, token i is kept iff
    Σ_{j<i} p_j < p; the best token always stays. This is Hugging Face's / vLLM's rule (sort
    ascending, drop tokens whose ascending cumulative probability is ≤ 1 − p) written from the
    other end. Tokens tied with the last kept token are kept too, so the result never depends
    on how a sort orders equal values. Peer: vLLM / Hugging Face `top_p`. Filter; no state.
    Off: p = 1.0.
    """

    key = "top_p"
    role = "filter"
    params = (Param("p", "float", default=1.0, off=1.0, minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, doc="probability mass kept"),)
    flat_names = {"p": "top_p"}

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        p = args["p"]
        on = p < 1.0
        if not bool(on.any()):
            return
        mass = torch.where(on, p, torch.zeros_like(p)).unsqueeze(1)
        values, ids, probs = best_first_holding(candidates, mass)
        kept = ((probs.cumsum(dim=1) - probs) < mass).sum(dim=1, keepdim=True).clamp(min=1)
        _truncate(candidates, on, values.gather(1, kept - 1).squeeze(1), (values, ids))


def best_first_holding(candidates: Candidates, mass: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shortest best-first prefix of each row holding at least `mass` [R, 1] probability.

    Returns (logits, ids, probabilities) of the prefix, [R, W], best first. A sparse batch
    gives all its candidates; a dense one starts at `TOP_P_FIRST_PREFIX` and grows 4x.
    """
    log_total = torch.logsumexp(candidates.values, dim=1, keepdim=True)
    width = candidates.values.shape[1] if not candidates.dense else TOP_P_FIRST_PREFIX
    while True:
        values, ids = candidates.best_first(width)
        probs = torch.exp(values - log_total)
        if width >= candidates.vocab or not candidates.dense or bool(
                (probs.sum(dim=1, keepdim=True) >= mass).all()):
            return values, ids, probs
        width *= 4
