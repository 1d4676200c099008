"""Truncation processors: they keep a subset of tokens and mask the rest to −inf.

Each works only on the rows whose parameter is on; the other rows are not touched. None of
them sorts the whole vocabulary: top-k uses `torch.topk`, min-p one max, and top-p grows a
best-first prefix until it holds the requested mass.
"""
from __future__ import annotations

import math

import torch

from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch

#: Top-p's first best-first prefix when it knows no smaller bound; grown 4x until it suffices.
TOP_P_FIRST_PREFIX = 1024


def mask_below(logits: torch.Tensor, rows: torch.Tensor, threshold: torch.Tensor) -> None:
    """Sets logits[r, i] = −inf where logits[r, i] < threshold[r], for the given rows."""
    part = logits.index_select(0, rows)
    logits.index_copy_(0, rows, part.masked_fill(part < threshold.unsqueeze(1), -math.inf))


class TopK(Processor):
    """Keeps the tokens whose logit is ≥ the k-th largest logit of the row (ties kept).

    Peer: vLLM / Hugging Face `top_k`. Filter; no per-sequence state.
    Off: k = 0, or k ≥ vocabulary size.
    """

    key = "top_k"
    role = "filter"
    params = (Param("k", "int", default=0, off=0, minimum=0, doc="number of best tokens kept"),)
    flat_names = {"k": "top_k"}

    def apply(self, logits: torch.Tensor, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        k = args["k"]
        rows = ((k > 0) & (k < logits.shape[1])).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        k_rows = k.index_select(0, rows)
        best = torch.topk(logits.index_select(0, rows), int(k_rows.max())).values
        mask_below(logits, rows, best.gather(1, (k_rows - 1).unsqueeze(1)).squeeze(1))


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

    def apply(self, logits: torch.Tensor, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        p = args["p"]
        rows = (p > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        best = logits.index_select(0, rows).amax(dim=1)
        mask_below(logits, rows, best + torch.log(p.index_select(0, rows)))


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

    def apply(self, logits: torch.Tensor, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        p = args["p"]
        rows = (p < 1.0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        part = logits.index_select(0, rows)
        mass = p.index_select(0, rows).unsqueeze(1)
        best, probs = best_first_prefix(part, mass)
        kept = ((probs.cumsum(dim=1) - probs) < mass).sum(dim=1, keepdim=True)
        mask_below(logits, rows, best.gather(1, kept - 1).squeeze(1))


def best_first_prefix(logits: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortest best-first prefix of each row holding at least `mass` probability.

    Returns (logits, probabilities) of the prefix, [R, K], sorted descending. The prefix starts
    at the number of finite logits when that is small (a truncation ran before) and otherwise
    at `TOP_P_FIRST_PREFIX`, growing 4x until every row's prefix holds its mass.
    """
    vocab = logits.shape[1]
    log_total = torch.logsumexp(logits, dim=1, keepdim=True)
    finite = int(torch.isfinite(logits).sum(dim=1).max())
    width = min(vocab, finite if finite <= 4 * TOP_P_FIRST_PREFIX else TOP_P_FIRST_PREFIX)
    while True:
        best = torch.topk(logits, width).values
        probs = torch.exp(best - log_total)
        if width == vocab or bool((probs.sum(dim=1, keepdim=True) >= mass).all()):
            return best, probs
        width = min(vocab, width * 4)
