"""Truncation processors: they keep a subset of tokens and mask the rest to −inf.

None of them sorts the whole vocabulary (a kept set too large for a best-first prefix comes
from a histogram, `mass_cut_column`). When a truncation that keeps
a best-first prefix is on for every row of a batch, it turns the batch sparse
(`Candidates.restrict`): later stages then work on the survivors only. A row whose parameter is off is not touched.

Every truncation takes `min_keep` (Hugging Face's `min_tokens_to_keep`, llama.cpp's
`min_keep`; default 1): it never leaves fewer than `min_keep` of the row's finite tokens.
Processors that keep the tokens above a threshold get it from one helper (`_at_least`), which
lowers a row's threshold to the value of its `min_keep`-th best token; tokens tied with that
token stay too, as top-k keeps ties. Typical sampling ranks by typicality and XTC removes the
best tokens, so those two apply `min_keep` the way their peers do (see their docstrings).

On sparse rows (`sampler_service.policy.sparse`) a truncation that provably keeps the same
tokens with the tail as without it, all above the tail's max bound, excludes the tail: from
then on the K entries are the whole row. Each rule compares what running on the K entries
alone keeps with what the whole row keeps under every tail its bounds allow. The rules that
decide on sums (masses, entropies, σ) also refuse a row whose decision lies within rounding
of its boundary once the tail is excluded: the K columns are summed in another order than
the dense row, so only a margin makes the float32 result the same.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from sampler_service.policy.candidates import NUMBA, Candidates
from sampler_service.policy.noise import uniform_noise
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch
from sampler_service.policy.sparse import (TailBound, candidates_entropy, cumulative_margin,
                                           fmt, log_margin, same_probable_set)

#: Top-p's (and typical's) first best-first prefix on a dense batch; grown 4x until it holds
#: the mass.
TOP_P_FIRST_PREFIX = 1024
#: Top-H looks at this many best tokens (Hugging Face's `TopHLogitsWarper.top_n`).
TOP_H_CANDIDATES = 100
#: Token coordinate of XTC's one uniform per row and step (the sample selector uses −1).
XTC_NOISE_TOKEN = -0x787463

#: How `top_p` computes its boundary (see `TopP`).
TOP_P_RULES = ("exact", "hf")

#: Hugging Face's `min_tokens_to_keep` / llama.cpp's `min_keep`, shared by every truncation.
MIN_KEEP = Param("min_keep", "int", default=1, off=1, minimum=1,
                 doc="fewest finite tokens the truncation leaves (HF min_tokens_to_keep)")


def _min_keep(args: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The rows' `min_keep` [R]; 1 for every row when the caller gave none (direct calls)."""
    given = args.get("min_keep")
    return torch.ones_like(like, dtype=torch.int64) if given is None else given


def _truncate(candidates: Candidates, on: torch.Tensor, threshold: torch.Tensor,
              best: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keeps values ≥ threshold in the rows that are `on`; `best` is the best-first prefix the
    threshold came from. All rows on: the batch may turn sparse. Otherwise masks in place."""
    if bool(on.all()):
        candidates.restrict(threshold, best)
    else:
        _mask_rows(candidates, on, threshold)


def _mask_rows(candidates: Candidates, on: torch.Tensor, threshold: torch.Tensor) -> None:
    """Keeps values ≥ threshold in the rows that are `on`, in place (the batch stays as it is)."""
    candidates.mask_below(torch.where(on, threshold, torch.full_like(threshold, -math.inf)))


def _at_least(candidates: Candidates, threshold: torch.Tensor, min_keep: torch.Tensor,
              best: tuple[torch.Tensor, torch.Tensor] | None = None, bounded: bool = False
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`threshold` [R] lowered so that values ≥ it keep at least `min_keep` [R] finite tokens.

    Each row's threshold becomes min(threshold, value of its min_keep-th best token); a row
    with fewer finite tokens keeps them all. `best` is a best-first prefix to reuse, if any;
    `bounded` says the threshold never exceeds the row's best value, so min_keep = 1 needs no
    work. Returns (threshold, the best-first prefix, widened when it had to be)."""
    most = int(min_keep.max())
    if most <= 1:
        if bounded:
            return threshold, best
        top = best[0][:, 0] if best is not None and best[0].shape[1] else candidates.max_values()
        return torch.minimum(threshold, top), best
    if best is None or best[0].shape[1] < min(most, candidates.values.shape[1]):
        best = candidates.best_first(most)
    values = best[0]
    nth = values.gather(1, (min_keep.clamp(max=values.shape[1]) - 1).unsqueeze(1)).squeeze(1)
    return torch.minimum(threshold, nth), best


def _mask_tokens(candidates: Candidates, remove: torch.Tensor) -> None:
    """Sets the entries where `remove` [R, K] is true to −inf (any entries, not only a tail)."""
    if candidates.dense:
        candidates.mask(remove)
        return
    rows, columns = remove.nonzero(as_tuple=True)
    if rows.numel():
        candidates.update(rows, columns, torch.full(rows.shape, -math.inf,
                                                    dtype=candidates.values.dtype,
                                                    device=candidates.values.device))


class TopK(Processor):
    """Keeps the tokens whose logit is ≥ the k'-th largest logit of the row (ties kept), with
    k' = max(k, min_keep).

    Peer: vLLM / Hugging Face `top_k` (`TopKLogitsWarper` keeps max(top_k,
    min_tokens_to_keep) the same way). Filter; no per-sequence state.
    Off: k = 0 (Hugging Face's and llama.cpp's off; vLLM's -1 is taken too, and stored as 0),
    or k' ≥ vocabulary size; `min_keep` alone never turns it on. Any other k < 0 is refused.
    Sparse rows: exact when k' ≤ K and the k'-th best sent logit is above the tail's max
    bound; the tail is then excluded.
    """

    key = "top_k"
    role = "filter"
    keeps_argmax = True
    params = (Param("k", "int", default=0, off=0, minimum=0, aliases=((-1, 0),),
                    doc="number of best tokens kept; 0 (or vLLM's -1) = off"),
              MIN_KEEP)
    flat_names = {"k": "top_k"}

    @staticmethod
    def _kept(args: dict[str, torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k' [R], whether the row is on [R])."""
        k = args["k"]
        k = torch.where(k > 0, torch.maximum(k, _min_keep(args, k)), k)
        return k, (k > 0) & (k < vocab)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        k, on = self._kept(args, candidates.vocab)
        if not bool(on.any()):
            return
        # One column past the largest k shows whether ties spill over the k-th value.
        best = candidates.best_first(int(k[on].max()) + 1)
        width = best[0].shape[1]
        kth = best[0].gather(1, (k.clamp(min=1, max=width) - 1).unsqueeze(1)).squeeze(1)
        # A sparse row with fewer than k candidates keeps them all.
        _truncate(candidates, on & (k <= width), kth, best)

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The k'-th best sent logit above every tail logit makes the whole row's k' best the
        sent ones (ties included: none reaches into the tail), so the tail is excluded."""
        k, on = self._kept(args, candidates.vocab)
        tail.mark_truncated(on)
        live = tail.live(on)
        if not bool(live.any()):
            return True
        width = candidates.values.shape[1]
        values, _ = candidates.best_first(width)
        kth = values.gather(1, (k.clamp(min=1, max=width) - 1).unsqueeze(1)).squeeze(1)
        fits = k <= width
        exact = fits & (kth > tail.max)
        tail.refuse(live & ~exact, lambda r: (
            f"top_k: the k-th best sent logit (k = {int(k[r])}) {fmt(kth[r])} is not above the "
            f"tail's max bound {fmt(tail.max[r])}" if fits[r] else
            f"top_k: k = {int(k[r])} is more than the K = {width} sent entries"))
        tail.exclude(on & exact)
        return True


class MinP(Processor):
    """Keeps tokens with p_i ≥ p · p_max, p the distribution at this point of the chain, and
    at least the `min_keep` best.

    Computed in logit space, l_i ≥ max(l) + ln(p), which needs no softmax.
    Peer: vLLM `min_p` (Hugging Face `MinPLogitsWarper`, llama.cpp `llama_sampler_min_p`).
    Filter; no per-sequence state. Off: p = 0.
    Sparse rows: exact when the threshold (lowered for min_keep ≤ K) is above the tail's max
    bound; the tail is then excluded.
    """

    key = "min_p"
    role = "filter"
    keeps_argmax = True
    params = (Param("p", "float", default=0.0, off=0.0, minimum=0.0, maximum=1.0,
                    doc="fraction of the best token's probability a token needs"), MIN_KEEP)
    flat_names = {"p": "min_p"}

    @staticmethod
    def _threshold(candidates: Candidates, args: dict[str, torch.Tensor]) -> torch.Tensor:
        """[R] the logit a kept token needs (−inf where p = 0)."""
        p = args["p"]
        threshold = candidates.max_values() + torch.log(p)  # log 0 = −inf: off
        return _at_least(candidates, threshold, _min_keep(args, p), bounded=True)[0]

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        if bool((args["p"] > 0).any()):
            candidates.mask_below(self._threshold(candidates, args))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """A threshold above the tail's max bound is below the best sent logit, which is then
        the whole row's best: the threshold is the same and no tail token reaches it."""
        p = args["p"]
        on = p > 0
        tail.mark_truncated(on)
        live = tail.live(on)
        if not bool(live.any()):
            return True
        threshold = self._threshold(candidates, args)
        exact = (threshold > tail.max) & (_min_keep(args, p) <= candidates.values.shape[1])
        tail.refuse(live & ~exact, lambda r: (
            f"min_p: the threshold {fmt(threshold[r])} (best sent logit + ln p) is not above the "
            f"tail's max bound {fmt(tail.max[r])}"))
        tail.exclude(on & exact)
        return True


class TopP(Processor):
    """Nucleus sampling: keeps the best-first tokens whose preceding mass is < p, and at least
    the `min_keep` best. `rule` says how the boundary is computed.

    `rule: exact` (the default): with tokens sorted by probability, best first, token i is kept
    iff Σ_{j<i} p_j < p; the best token always stays. This is vLLM's, Hugging Face's and
    llama.cpp's rule in exact arithmetic (vLLM and Hugging Face sort ascending and drop tokens
    whose ascending cumulative probability is ≤ 1 − p; llama.cpp keeps best-first tokens until
    their sum reaches p), written from the best end. Tokens tied with the last kept token are
    kept too, so the result never depends on how a sort orders equal values. On a dense
    float32 CPU batch the nucleus comes from a numba kernel
    (`sampler_service.kernels.cpu_mass_cut`: three passes, float64 sums, no sort); elsewhere
    from the best 1024 tokens when they hold the mass (or from the survivors of an earlier
    truncation), else from `mass_cut_column` (no sort). The peers' float32 sums round
    differently, so a token whose boundary lies within rounding of p may differ from theirs.

    `rule: hf`: Hugging Face's `TopPLogitsWarper` operation for operation, so the kept set is
    its own, rounding and ties included: the row (the whole vocabulary, −inf where an earlier
    stage removed a token) is sorted ascending with `torch.sort`, softmaxed and cumsummed in
    float32; a token is removed iff its cumulative probability is ≤ 1 − p, with 1 − p computed
    in float64 from p as written and rounded to float32 (as torch compares a float32 tensor with
    a Python float), and the last `min_keep` of the ascending order always stay. It costs a
    full-vocabulary sort per row (what Hugging Face pays), and matches Hugging Face on the same
    device and dtype (float32), after the same earlier stages.

    Peer: vLLM / Hugging Face `top_p`, llama.cpp `llama_sampler_top_p` (`exact`); Hugging
    Face `TopPLogitsWarper` (`hf`). Filter; no state. Off: p = 1.0 (for `hf` too: Hugging
    Face's `generate` adds no top-p warper at 1.0).
    Sparse rows: `exact` is exact when the nucleus closes inside the K entries with the tail's
    largest possible mass, keeping the tokens the K entries alone keep, all above the tail's
    max bound; the tail is then excluded. `hf` sums the whole row in its own order, so it is
    exact only once an earlier truncation excluded the tail.
    """

    key = "top_p"
    role = "filter"
    keeps_argmax = True
    params = (Param("p", "float", default=1.0, off=1.0, minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, float64=True, doc="probability mass kept"), MIN_KEEP,
              Param("rule", "choice", default="exact", off=None, choices=TOP_P_RULES,
                    doc="how the boundary is computed: `exact` (Σ of the better tokens < p, "
                        "float64 sums) or `hf` (Hugging Face's TopPLogitsWarper, bit for bit)"))
    flat_names = {"p": "top_p", "rule": "top_p_rule"}

    @staticmethod
    def _hf_rows(args: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """[R] bool: the rows whose rule is `hf` (none when the caller gave no rule)."""
        rules = args.get("rule")
        if rules is None:
            return torch.zeros_like(like, dtype=torch.bool)
        return torch.tensor([rule == "hf" for rule in rules], dtype=torch.bool,
                            device=like.device)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        on = args["p"] < 1.0
        if not bool(on.any()):
            return
        hf = on & self._hf_rows(args, on)
        if bool(hf.any()):
            _hf_top_p(candidates, hf, args["p"], _min_keep(args, on))
            on = on & ~hf
            if not bool(on.any()):
                return
        p = args["p"].float()  # the exact rule compares float32 p, whatever the tensor's dtype
        mass = torch.where(on, p, torch.zeros_like(p)).unsqueeze(1)
        cut = _fast_mass_cut(candidates, mass, typical=False)
        if cut is not None:
            threshold = candidates.values.gather(1, cut[2].unsqueeze(1)).squeeze(1)
            threshold, _ = _at_least(candidates, threshold, _min_keep(args, p), bounded=True)
            _mask_rows(candidates, on, threshold)
            return
        log_total = torch.logsumexp(candidates.values, dim=1, keepdim=True)
        values, ids = candidates.best_first(
            TOP_P_FIRST_PREFIX if candidates.dense else candidates.values.shape[1])
        probs = torch.exp(values - log_total)
        kept = ((probs.cumsum(dim=1) - probs) < mass).sum(dim=1, keepdim=True).clamp(min=1)
        threshold = values.gather(1, kept - 1).squeeze(1)
        # A dense row whose mass lies beyond the prefix: its nucleus from a histogram instead.
        short = (probs.sum(dim=1, keepdim=True) < mass).squeeze(1)
        if bool(short.any()) and values.shape[1] < candidates.vocab:
            rows = short.nonzero().squeeze(1)
            logits = candidates.values.index_select(0, rows)
            surprise = log_total.index_select(0, rows) - logits
            column = mass_cut_column(surprise, torch.exp(-surprise), mass.index_select(0, rows))
            threshold = threshold.index_copy(0, rows, logits.gather(1, column).squeeze(1))
            threshold, _ = _at_least(candidates, threshold, _min_keep(args, p), bounded=True)
            _mask_rows(candidates, on, threshold)
            return
        threshold, best = _at_least(candidates, threshold, _min_keep(args, p), (values, ids),
                                    bounded=True)
        _truncate(candidates, on, threshold, best)

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """With the entries best first, w their weights and Z their sum, the K entries alone
        keep the n entries whose preceding weight is < p·Z; the whole row keeps those whose
        preceding weight is < p·(Z + T), T the tail's weight (≤ its upper bound). Counting with
        both (the tail after the entries) gives the same n only when the
        nucleus closes inside the entries whatever T; its last value (lowered for min_keep)
        above the tail's max bound then keeps the tail out, ties included. Both counts allow
        for the running sums' rounding (`cumulative_margin`)."""
        p = args["p"].float()
        on = p < 1.0
        tail.mark_truncated(on)
        hf = on & self._hf_rows(args, on)
        tail.refuse_unless_excluded(hf, "top_p (rule hf): sums the whole row in Hugging Face's "
                                        "order")
        on = on & ~hf
        if not bool(on.any()):
            return True
        width = candidates.values.shape[1]
        values = candidates.best_first(width)[0].double()
        top = values[:, :1]
        weights = torch.exp(values - top)
        total = weights.sum(dim=1, keepdim=True)
        before = torch.cat([weights.cumsum(dim=1) - weights, total], dim=1)
        tail_weight = torch.exp(tail.lse_high.unsqueeze(1) - top)
        mass = p.double().unsqueeze(1)
        margin = cumulative_margin(width + 1, values.device)
        alone = (before < mass * total * (1 - margin)).sum(dim=1).clamp(min=1)
        whole = (before < mass * (total + tail_weight) * (1 + margin)).sum(dim=1).clamp(min=1)
        min_keep = _min_keep(args, p)
        last = torch.maximum(alone, min_keep).clamp(max=width)
        threshold = values.gather(1, (last - 1).unsqueeze(1)).squeeze(1)
        closes = alone == whole
        exact = closes & (tail.excluded | (min_keep <= width) & (threshold > tail.max.double()))
        share = (tail_weight / (total + tail_weight)).squeeze(1)
        tail.refuse(on & ~exact, lambda r: (
            "top_p: the kept set's boundary lies within rounding of p" if not share[r] else
            f"top_p: the kept set does not close inside the K = {width} sent entries (tail mass "
            f"up to {fmt(share[r])}, p = {fmt(p[r])})" if not closes[r] else
            f"top_p: the kept set's last logit {fmt(threshold[r])} is not above the tail's max "
            f"bound {fmt(tail.max[r])}"))
        tail.exclude(on & exact)
        return True


def _hf_top_p(candidates: Candidates, rows: torch.Tensor, p: torch.Tensor,
              min_keep: torch.Tensor) -> None:
    """Top-p by Hugging Face's `TopPLogitsWarper` operations on the `rows` [R] bool (see
    `TopP`, `rule: hf`): each row whole (−inf where no longer listed), sorted ascending,
    softmaxed and cumsummed in float32; a token is removed iff its cumulative probability is
    ≤ float32(1 − p) (1 − p in float64), except the last `min_keep` of the ascending order."""
    index = rows.nonzero().squeeze(1)
    dense = candidates.to_dense().index_select(0, index)
    sorted_logits, sorted_indices = torch.sort(dense, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    limit = (1 - p.index_select(0, index).double()).to(cumulative.dtype)
    remove = cumulative <= limit.unsqueeze(1)
    width = remove.shape[1]
    kept = torch.arange(width, device=remove.device) >= (
        width - min_keep.index_select(0, index).clamp(max=width)).unsqueeze(1)
    remove &= ~kept
    remove = remove.scatter(1, sorted_indices, remove)  # back to token-id order
    if not candidates.dense:  # the columns a sparse batch lists
        remove = remove.gather(1, candidates.ids.index_select(0, index))
    everywhere = torch.zeros_like(candidates.values, dtype=torch.bool)
    _mask_tokens(candidates, everywhere.index_copy_(0, index, remove))


#: Bins per nat, and nats covered, of the histogram `mass_cut_column` uses; keys beyond 48
#: nats share the last bin.
MASS_CUT_BINS_PER_NAT = 32
MASS_CUT_NATS = 48


def _fast_mass_cut(candidates: Candidates, mass: torch.Tensor, typical: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """On a dense float32 CPU batch, the numba mass cut (`sampler_service.kernels.cpu_mass_cut`:
    no prefix, no sort) of top-p (`typical` False) or typical-p: (best [R], center [R],
    column [R] and key [R] of each row's last kept token), `mass` [R, 1] the p of each row (0:
    the first token alone). None where it does not apply (sparse or GPU batches, numba absent),
    for the torch path."""
    if not candidates.dense or candidates.values.device.type != "cpu" \
            or candidates.values.dtype != torch.float32:
        return None
    try:
        from sampler_service.kernels.cpu_mass_cut import mass_cuts
        from sampler_service.kernels.cpu_statistics import row_moments
    except ImportError:
        return None
    values = candidates.values.contiguous().numpy()
    best = candidates.max_values().numpy()
    threads = torch.get_num_threads()
    if typical:
        moments = row_moments(values, best, threads)
        center = (moments[:, 1] / moments[:, 0]).astype(np.float32)
    else:
        center = np.zeros(values.shape[0], dtype=np.float32)
    columns, keys = mass_cuts(values, best, center, mass.squeeze(1).double().numpy(), threads)
    return (torch.from_numpy(best), torch.from_numpy(center), torch.from_numpy(columns),
            torch.from_numpy(keys))


def mass_cut_column(key: torch.Tensor, probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """[R, 1] column of the last token kept when tokens are taken in ascending `key` order
    (key ≥ 0 in nats, +inf for masked tokens) while the mass before them is < `mass` [R, 1].

    Exact and sort-free, for rows whose kept set is too large for a best-first prefix: the
    tokens are binned by key (1/32 nat per bin) and the bins' masses summed (one scatter); only
    the bin where the mass is reached needs ordering, so only it is ranked (a top-k over that
    bin). Top-p uses key = surprise −log p, typical-p the distance |−log p − H|.
    """
    rows, bins_total = key.shape[0], MASS_CUT_BINS_PER_NAT * MASS_CUT_NATS
    bins = (key * MASS_CUT_BINS_PER_NAT).clamp_(min=0, max=bins_total - 1).long()
    bin_mass = torch.zeros(rows, bins_total, device=key.device).scatter_add_(1, bins, probs)
    bin_count = torch.zeros(rows, bins_total, dtype=torch.int64, device=key.device).scatter_add_(
        1, bins, torch.ones_like(bins))
    before = bin_mass.cumsum(dim=1) - bin_mass  # mass of the bins with smaller keys
    # The last bin with mass whose preceding mass is below `mass`, and at least the first bin
    # with mass (rounding can put `mass` above every bin's preceding mass, or it may be 0).
    position = torch.arange(bins_total, device=key.device).expand(rows, -1)
    weighted = bin_mass > 0
    first = torch.where(weighted, position, bins_total).amin(dim=1, keepdim=True)
    cut = torch.where(weighted & (before < mass), position, -1).amax(dim=1, keepdim=True)
    cut = torch.maximum(cut, first)
    width = int(bin_count.gather(1, cut).max())
    in_cut = torch.where(bins == cut, key, torch.full_like(key, math.inf))
    columns = torch.topk(in_cut, width, dim=1, largest=False).indices
    probs_in = probs.gather(1, columns)
    preceding = before.gather(1, cut) + probs_in.cumsum(dim=1) - probs_in
    kept = (preceding < mass).sum(dim=1, keepdim=True).clamp(min=1)
    return columns.gather(1, kept - 1)


class TypicalP(Processor):
    """Locally typical sampling (Meister et al. 2022): keeps the most typical tokens, those
    whose surprise −log p_i is closest to the entropy H = −Σ p log p, until their mass reaches p.

    With s_i = |−log p_i − H| sorted ascending and C_j the mass of the first j+1 tokens in that
    order, j* is the first j with C_j ≥ p, and the tokens with s_i ≤ s_(j*) stay (ties kept).
    The kept set can exclude the most likely token. `min_keep` counts in typicality order, as
    both peers do: the min_keep most typical tokens stay (s_i ≤ s_(min_keep−1)).
    Peer: Hugging Face `TypicalLogitsWarper` (llama.cpp's `llama_sampler_typical` stops at
    C_j > p instead and keeps no ties). On a dense float32 CPU batch with min_keep 1 the set
    comes from a numba kernel (`sampler_service.kernels.cpu_mass_cut`: s_i = |l_i − m − c|
    with c = Σ w·z / Σ w, three passes, float64 sums); elsewhere only the 1024 most typical
    tokens are ranked (a top-k over s), or `mass_cut_column` runs when they hold less than p;
    no sort. Filter; no
    per-sequence state. Off: p = 1.0.
    Sparse rows: exact while the whole row's entropy is known (no stage changed the tail yet)
    and the typical set, the same with and without the tail, closes inside the K entries
    before any tail token's distance; the tail is then excluded.
    """

    key = "typical_p"
    role = "filter"
    params = (Param("p", "float", default=1.0, off=1.0, minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, doc="probability mass of the most typical tokens kept"),
              MIN_KEEP)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        p = args["p"]
        min_keep = _min_keep(args, p)
        on = p < 1.0
        if not bool(on.any()):
            return
        mass = torch.where(on, p, torch.zeros_like(p)).unsqueeze(1)
        cut = _fast_mass_cut(candidates, mass, typical=True) if int(min_keep.max()) <= 1 else None
        if cut is not None:
            from sampler_service.kernels.cpu_mass_cut import keys_beyond
            best, center, _, key = cut
            key = torch.where(on, key, torch.full_like(key, math.inf))
            candidates.mask(torch.from_numpy(keys_beyond(
                candidates.values.contiguous().numpy(), best.numpy(), center.numpy(),
                key.numpy(), torch.get_num_threads())))
            return
        values = candidates.values
        log_probs = torch.log_softmax(values, dim=1)
        entropy = -(log_probs * log_probs.exp()).nansum(dim=1, keepdim=True)  # 0·(−inf) skipped
        surprise_gap = (-log_probs - entropy).abs()  # +inf for masked tokens
        probs = torch.softmax(values, dim=1)
        total = values.shape[1]
        width = total if not candidates.dense else min(
            total, max(TOP_P_FIRST_PREFIX, int(min_keep.max())))
        neg_gap, order = torch.topk(-surprise_gap, width, dim=1)  # most typical first
        cumulative = probs.gather(1, order).cumsum(dim=1)
        gaps = -neg_gap
        last = (cumulative < mass).sum(dim=1, keepdim=True).clamp(max=width - 1)
        cut = gaps.gather(1, last)
        # A row whose typical set is larger than the prefix: its cut from a histogram instead.
        short = (cumulative[:, -1:] < mass).squeeze(1)
        if width < total and bool(short.any()):
            rows = short.nonzero().squeeze(1)
            row_gaps = surprise_gap.index_select(0, rows)
            column = mass_cut_column(row_gaps, probs.index_select(0, rows), mass.index_select(0, rows))
            cut = cut.index_copy(0, rows, row_gaps.gather(1, column))
        floor = (min_keep.clamp(max=width) - 1).unsqueeze(1)
        cut = torch.maximum(cut, gaps.gather(1, floor))
        _mask_tokens(candidates, (surprise_gap > cut) & on.unsqueeze(1))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The whole row's typical set, computed in float64 from the exact entropy H and
        log-normaliser L, must equal the one of the K entries alone (both robust to rounding:
        see `_typical_set`) and close inside them: every tail token has a surprise ≥ L − M
        (M the tail's max bound), so its distance is ≥ L − M − H, which must exceed the cut."""
        p = args["p"]
        on = p < 1.0
        tail.mark_truncated(on)
        if not bool(on.any()):
            return True
        tail.refuse(on & ~tail.known_entropy(), lambda _: (
            "typical_p: needs the whole row's entropy, unknown once a stage changed the tail"))
        values = candidates.values.double()
        min_keep = _min_keep(args, p)
        lse_k, lse, _ = tail.row_lse(candidates.values)
        entropy = tail.entropy(candidates.values)
        kept, robust, cut, closes = _typical_set(values - lse.unsqueeze(1), entropy, p, min_keep)
        kept_k, robust_k, _, _ = _typical_set(values - lse_k.unsqueeze(1),
                                              candidates_entropy(candidates.values), p, min_keep)
        tail_gap = lse - tail.max.double() - entropy
        exact = robust & robust_k & (tail.excluded | closes & (kept == kept_k).all(dim=1)
                                     & (tail_gap > cut + log_margin(cut))
                                     & (min_keep <= values.shape[1]))
        tail.refuse(on & ~exact, lambda r: (
            "typical_p: the typical set is not provably the same inside the K sent entries "
            f"(or within rounding; tail distance ≥ {fmt(max(float(tail_gap[r]), 0.0))})"))
        tail.exclude(on & exact)
        return True


def _typical_set(log_p: torch.Tensor, entropy: torch.Tensor, p: torch.Tensor,
                 min_keep: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Typical sampling's kept set over `log_p` [S, K] (float64 log-probabilities) with the
    entropy [S]: (kept [S, K], robust [S], cut [S], closes [S]).

    robust: the decision holds under rounding (no cumulative mass within `cumulative_margin`
    of p, and no other distance within `log_margin` of the cut); closes: the mass reaches p
    inside the K entries."""
    gap = (-log_p - entropy.unsqueeze(1)).abs()
    gaps, order = torch.sort(gap, dim=1)
    cumulative = torch.exp(log_p).gather(1, order).cumsum(dim=1)
    mass = p.double().unsqueeze(1)
    width = gap.shape[1]
    margin = cumulative_margin(width, log_p.device)
    first = (cumulative < mass * (1 - margin)).sum(dim=1)
    stable = first == (cumulative < mass * (1 + margin)).sum(dim=1)
    last = first.clamp(max=width - 1).unsqueeze(1)
    floor = (min_keep.clamp(max=width) - 1).unsqueeze(1)
    cut = torch.maximum(gaps.gather(1, last), gaps.gather(1, floor)).squeeze(1)
    below = gaps.masked_fill(gaps >= cut.unsqueeze(1), -math.inf).amax(dim=1)
    above = gaps.masked_fill(gaps <= cut.unsqueeze(1), math.inf).amin(dim=1)
    separated = (cut - below > log_margin(cut)) & (above - cut > log_margin(cut))
    return gap <= cut.unsqueeze(1), stable & separated, cut, first < width


class _ProbableCutoff(Processor):
    """A cut that keeps the tokens whose probability reaches a row's threshold (`_threshold`:
    the logit each row keeps down to), on the rows whose `epsilon` is on (> 0)."""

    keeps_argmax = True

    @abstractmethod
    def _threshold(self, candidates: Candidates, args: dict[str, torch.Tensor]) -> torch.Tensor:
        """[R] the smallest logit each row keeps."""

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        on = args["epsilon"] > 0
        if bool(on.any()):
            _mask_rows(candidates, on, self._threshold(candidates, args))


class EpsilonCutoff(_ProbableCutoff):
    """Epsilon sampling (Hewitt et al. 2022): keeps tokens with p_i ≥ ε, and at least the
    `min_keep` best.

    p = softmax of the row at this point of the chain. Peer: Hugging Face
    `EpsilonLogitsWarper` (which keeps the min_tokens_to_keep best and their ties the same
    way). Filter; no per-sequence state. Off: ε = 0.
    Sparse rows: exact when the kept tokens are the same with the tail's mass (within its
    bounds) as without it and no tail token can reach ε; the tail is then excluded.
    """

    key = "epsilon_cutoff"
    role = "filter"
    params = (Param("epsilon", "float", default=0.0, off=0.0, minimum=0.0, maximum=1.0,
                    doc="probability a token needs (paper: 3e-4 to 9e-4)"), MIN_KEEP)

    @staticmethod
    def _threshold(candidates: Candidates, args: dict[str, torch.Tensor]) -> torch.Tensor:
        epsilon = args["epsilon"]
        probs = torch.softmax(candidates.values, dim=1)
        return _probable_threshold(candidates, probs >= epsilon.unsqueeze(1),
                                   _min_keep(args, epsilon))


    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """p_i ≥ ε is l_i ≥ ln ε + L, L the log-normaliser: the K entries alone use their own
        L_K, the whole row an L within the tail's bounds (`same_probable_set`)."""
        epsilon = args["epsilon"]
        on = epsilon > 0
        tail.mark_truncated(on)
        if not bool(on.any()):
            return True
        lse_k, low, high = tail.row_lse(candidates.values)
        log_epsilon = torch.log(epsilon.double())
        same, below = same_probable_set(candidates.values, log_epsilon + lse_k, log_epsilon + low,
                                        log_epsilon + high, tail)
        _refuse_probable(candidates, args, tail, on, same & below,
                         self._threshold(candidates, args), "epsilon_cutoff")
        return True


class EtaCutoff(_ProbableCutoff):
    """Eta sampling (Hewitt et al. 2022): keeps tokens with p_i ≥ η, η = min(ε, √ε · e^(−H)),
    H = −Σ p log p in nats, and at least the `min_keep` best.

    p and H are of the row at this point of the chain. Peer: Hugging Face `EtaLogitsWarper`
    (its code's formula; its docstring's √(ε·e^(−H)) differs from it). Filter; no per-sequence
    state. Off: ε = 0.
    Sparse rows: exact while the whole row's entropy is known (no stage changed the tail yet),
    when the kept tokens are the same with the tail as without it and no tail token reaches
    η; the tail is then excluded.
    """

    key = "eta_cutoff"
    role = "filter"
    params = (Param("epsilon", "float", default=0.0, off=0.0, minimum=0.0, maximum=1.0,
                    doc="ε (paper: 3e-4 to 2e-3)"), MIN_KEEP)

    @staticmethod
    def _eta(epsilon: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return torch.minimum(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))

    def _threshold(self, candidates: Candidates, args: dict[str, torch.Tensor]) -> torch.Tensor:
        epsilon = args["epsilon"]
        values = candidates.values
        probs = torch.softmax(values, dim=1)
        log_probs = torch.log_softmax(values, dim=1).clamp(min=torch.finfo(values.dtype).min)
        entropy = -(log_probs * probs).sum(dim=1)
        eta = self._eta(epsilon, entropy)
        return _probable_threshold(candidates, probs >= eta.unsqueeze(1), _min_keep(args, epsilon))


    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """As epsilon's rule, with η from the whole row's exact entropy (known while the tail
        is pristine) against η from the K entries' own entropy."""
        epsilon = args["epsilon"]
        on = epsilon > 0
        tail.mark_truncated(on)
        if not bool(on.any()):
            return True
        tail.refuse(on & ~tail.known_entropy(), lambda _: (
            "eta_cutoff: needs the whole row's entropy, unknown once a stage changed the tail"))
        lse_k, lse, _ = tail.row_lse(candidates.values)
        wide = epsilon.double()
        log_eta = torch.log(self._eta(wide, tail.entropy(candidates.values)))
        log_eta_k = torch.log(self._eta(wide, candidates_entropy(candidates.values)))
        same, below = same_probable_set(candidates.values, log_eta_k + lse_k, log_eta + lse,
                                        log_eta + lse, tail)
        _refuse_probable(candidates, args, tail, on, same & below,
                         self._threshold(candidates, args), "eta_cutoff")
        return True


def _probable_threshold(candidates: Candidates, probable: torch.Tensor,
                        min_keep: torch.Tensor) -> torch.Tensor:
    """[R] the threshold that keeps the tokens marked `probable` [R, K] (a set closed upwards
    in value, as p ≥ cut is) and at least the `min_keep` best."""
    values = candidates.values
    lowest = values.masked_fill(~probable, math.inf).amin(dim=1)  # +inf: none probable
    return _at_least(candidates, lowest, min_keep)[0]


def _refuse_probable(candidates: Candidates, args: dict[str, torch.Tensor], tail: TailBound,
                     on: torch.Tensor, same: torch.Tensor, threshold: torch.Tensor,
                     key: str) -> None:
    """Epsilon's and eta's verdict: rows whose probable set is `same` with and without the
    tail (and robust to rounding), and whose threshold on the K entries (lowered for
    min_keep ≤ K) is above the tail's max bound, exclude the tail; the other `on` rows are
    refused."""
    fits = _min_keep(args, threshold) <= candidates.values.shape[1]
    exact = same & (tail.excluded | fits & (threshold > tail.max))
    tail.refuse(on & ~exact, lambda r: (
        f"{key}: the kept set is not provably the same with the tail's mass (or within "
        f"rounding; threshold {fmt(threshold[r])}, tail max ≤ {fmt(tail.max[r])})"))
    tail.exclude(on & exact)


def finite_std(values: torch.Tensor) -> torch.Tensor:
    """[R] population standard deviation of each row's finite entries: on float32 CPU rows
    the numba kernel (`sampler_service.kernels.cpu_statistics.row_std`, two passes, float64
    across blocks), elsewhere `finite_std_reference`."""
    if NUMBA and values.device.type == "cpu" and values.dtype == torch.float32 \
            and values.shape[1] > 0:
        from sampler_service.kernels.cpu_statistics import row_std
        return torch.from_numpy(row_std(values.contiguous().numpy(),
                                        torch.get_num_threads())).to(values.dtype)
    return finite_std_reference(values)


def finite_std_reference(values: torch.Tensor) -> torch.Tensor:
    """`finite_std` in torch. When no entry is masked (the usual untruncated row): a sum, then
    the centred sum of squares as a batched dot product (4x faster than torch.var_mean here);
    masked sums otherwise."""
    if bool(torch.isfinite(values.amin(dim=1)).all()):
        centred = values - values.mean(dim=1, keepdim=True)
        squares = torch.bmm(centred.unsqueeze(1), centred.unsqueeze(2)).view(-1)
        return torch.sqrt(squares / values.shape[1])
    finite = torch.isfinite(values)
    count = finite.sum(dim=1).clamp(min=1)
    mean = torch.where(finite, values, torch.zeros_like(values)).sum(dim=1) / count
    deviation = torch.where(finite, values - mean.unsqueeze(1), torch.zeros_like(values))
    return torch.sqrt(deviation.square().sum(dim=1) / count)


class TopNSigma(Processor):
    """Top-nσ (Tang et al. 2024): keeps l_i ≥ max(l) − n·σ, σ the population standard
    deviation of the row's finite logits at this point of the chain, and at least the
    `min_keep` best.

    Works on logits (before or after temperature gives the same set when T > 0 scales both
    sides). After a truncation σ is over the surviving tokens only, as llama.cpp computes it
    over its current candidates. Peer: llama.cpp `llama_sampler_top_n_sigma` (no `min_keep`
    there; 1 matches it). Filter; no per-sequence state. Off: n ≤ 0 (llama.cpp's default −1).
    Sparse rows: σ is over every finite logit, so exact only once an earlier truncation
    excluded the tail.
    """

    key = "top_n_sigma"
    role = "filter"
    keeps_argmax = True
    params = (Param("n", "float", default=0.0, off=0.0,
                    doc="how many standard deviations below the best logit a token may be"),
              MIN_KEEP)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        n = args["n"]
        on = n > 0
        if not bool(on.any()):
            return
        threshold = candidates.max_values() - n * finite_std(candidates.values)
        threshold, _ = _at_least(candidates, threshold, _min_keep(args, n), bounded=True)
        _mask_rows(candidates, on, threshold)

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """σ over the K entries is σ over the whole row only when the tail is all −inf; then
        no candidate may lie within rounding of the threshold (σ is summed in float64 here)."""
        n = args["n"]
        on = n > 0
        tail.refuse_unless_excluded(on, "top_n_sigma: σ is over every finite logit")
        if bool(on.any()):
            values = candidates.values.double()
            finite = torch.isfinite(values)
            count = finite.sum(dim=1).clamp(min=1)
            mean = torch.where(finite, values, torch.zeros_like(values)).sum(dim=1) / count
            spread = torch.where(finite, values - mean.unsqueeze(1), torch.zeros_like(values))
            sigma = torch.sqrt(spread.square().sum(dim=1) / count)
            threshold = values.amax(dim=1) - n.double() * sigma
            margin = log_margin(threshold) * (1 + n.double())
            near = ((values - threshold.unsqueeze(1)).abs() < margin.unsqueeze(1)).any(dim=1)
            tail.refuse(on & near, lambda r: (
                f"top_n_sigma: a logit lies within rounding of the threshold {fmt(threshold[r])}"),
                structural=False)
        return True


class Xtc(Processor):
    """XTC, "exclude top choices": with probability `probability` per step, removes every
    token with p_i ≥ `threshold` except the least likely of them.

    p = softmax of the row at this point of the chain. Nothing happens when fewer than two
    tokens reach the threshold, or when the removal would leave fewer than `min_keep` finite
    tokens (then the row is left whole, as llama.cpp does; min_keep = 1 never blocks it).
    Tokens tied with the least likely one above the threshold all stay, so the result does not
    depend on how a sort orders equal values (llama.cpp keeps one of them).
    The per-step decision is a counter-based uniform U of (seed, position) (token coordinate
    `XTC_NOISE_TOKEN`); the row is cut iff U ≤ probability, so it is deterministic and the same
    in any batch. The seed is the sequence's unless `seed` ≥ 0 is given.
    Peer: llama.cpp `llama_sampler_xtc` (`llama_sample_xtc_apply`). Filter; keeps no
    per-sequence state (the draw is keyed by position, not by an RNG that advances).
    Ranges are llama.cpp's, which checks none: any probability (≥ 1: every step), any
    threshold (≤ 0: every finite token is a top choice), and `min_keep` 0 (llama.cpp's default,
    which behaves as 1 there: stored as 1).
    Off: probability ≤ 0 or threshold > 0.5 (llama.cpp's off values).
    Sparse rows: exact when the top choices are the same with the tail's mass (within its
    bounds) as without it and no tail token can be one (min_keep 1); the tail stays as it is.
    """

    key = "xtc"
    role = "filter"
    params = (Param("probability", "float", default=0.0, off=0.0,
                    doc="chance per step that the top choices are excluded; ≤ 0 is off"),
              Param("threshold", "float", default=0.1, off=1.0,
                    doc="probability that makes a token a top choice; > 0.5 turns XTC off"),
              Param("seed", "int", default=-1, off=-1, minimum=-1, maximum=2 ** 63 - 1,
                    doc="seed of the per-step decision; -1 uses the sequence's seed"),
              Param("min_keep", "int", default=1, off=1, minimum=1, aliases=((0, 1),),
                    doc="fewest finite tokens a cut leaves, or it is not made (llama.cpp "
                        "min_keep; 0 behaves as 1)"))

    @staticmethod
    def _cut_rows(args: dict[str, torch.Tensor], batch: RowBatch) -> torch.Tensor:
        """[R] bool: the rows XTC cuts at this step (on, and their per-step draw says so)."""
        probability, threshold = args["probability"], args["threshold"]
        on = (probability > 0) & (threshold <= 0.5)
        if not bool(on.any()):
            return on
        seeds = torch.where(args["seed"] >= 0, args["seed"], batch.seeds)
        coordinate = torch.full((batch.rows, 1), XTC_NOISE_TOKEN, dtype=torch.int64,
                                device=seeds.device)
        chance = uniform_noise(seeds, batch.positions, coordinate).squeeze(1)
        return on & (chance <= probability.to(torch.float64))

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        threshold = args["threshold"]
        on = self._cut_rows(args, batch)
        if not bool(on.any()):
            return
        # At most 1/threshold tokens reach the threshold: a short best-first prefix holds them
        # all and one more, so everything outside it is below the threshold.
        lowest = float(threshold[on].min())
        width = candidates.values.shape[1] if lowest <= 0 else min(
            candidates.values.shape[1], math.floor(1 / lowest) + 2)
        values, ids = candidates.best_first(width)
        log_total = torch.logsumexp(candidates.values, dim=1, keepdim=True)
        top = (torch.exp(values - log_total) >= threshold.unsqueeze(1)) & (values > -math.inf)
        least = values.masked_fill(~top, math.inf).amin(dim=1, keepdim=True)
        # The top choices but the least likely one and its ties: none when fewer than two.
        remove = values > least
        cut = on
        min_keep = _min_keep(args, threshold)
        if int(min_keep.max()) > 1:
            left = (candidates.values > -math.inf).sum(dim=1) - remove.sum(dim=1)
            cut &= left >= min_keep
        rows, columns = (remove & cut.unsqueeze(1)).nonzero(as_tuple=True)
        present, located = candidates.locate(rows, ids[rows, columns])
        rows = rows[present]
        candidates.update(rows, located, torch.full(rows.shape, -math.inf,
                                                    dtype=candidates.values.dtype,
                                                    device=rows.device))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """p_i ≥ threshold is l_i ≥ ln threshold + L (`same_probable_set`, as epsilon's rule);
        min_keep > 1 counts the row's finite tokens, tail included, so it is refused."""
        on = self._cut_rows(args, batch)
        if not bool(on.any()):
            return True
        lse_k, low, high = tail.row_lse(candidates.values)
        log_threshold = torch.log(args["threshold"].double().clamp(min=0.0))  # ≤ 0: all
        same, below = same_probable_set(candidates.values, log_threshold + lse_k,
                                        log_threshold + low, log_threshold + high, tail)
        counted = _min_keep(args, args["threshold"]) > 1
        tail.refuse(tail.live(on) & counted, lambda _: "xtc: min_keep > 1 counts the tail's "
                                                       "tokens", structural=False)
        tail.refuse(on & ~(same & below), lambda _: (
            "xtc: its top choices are not provably the same with the tail's mass (or within "
            "rounding)"), structural=False)
        return True


class TopH(Processor):
    """Top-H (Potraghloo et al. 2025): keeps the shortest best-first prefix whose entropy stays
    within a budget, among the row's 100 best tokens.

    With q the softmax of the 100 best logits (renormalised over them), best first, and
    τ = top_h · H(q), token i is kept iff Σ_{j≤i} −q_j log q_j ≤ τ; the best token always
    stays, and tokens tied with the last kept token stay too. Every token outside the 100 best
    is removed. Peer: Hugging Face `TopHLogitsWarper` (which has no `min_tokens_to_keep`;
    min_keep = 1 matches it). Filter; no per-sequence state.
    Off: top_h = 0 (Hugging Face accepts (0, 1] and has no off value but leaving it unset; 1.0
    still keeps only the 100 best).
    Sparse rows: exact when the row's max(100, min_keep) best are sent and above the tail's
    max bound; the tail is then excluded.
    """

    key = "top_h"
    role = "filter"
    params = (Param("top_h", "float", default=0.0, off=0.0, minimum=0.0, maximum=1.0,
                    doc="fraction of the entropy of the 100 best tokens the kept ones may use"),
              MIN_KEEP)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        top_h = args["top_h"]
        on = top_h > 0
        if not bool(on.any()):
            return
        values, ids = candidates.best_first(TOP_H_CANDIDATES)
        log_q = values - torch.logsumexp(values, dim=1, keepdim=True)
        q = torch.softmax(log_q, dim=1)
        entropy = -(log_q.clamp(min=torch.finfo(values.dtype).min) * q).sum(dim=1)
        spent = torch.cumsum(-q * torch.log(q), dim=1)  # NaN past the finite tokens: not kept
        kept = (spent <= (entropy * top_h).unsqueeze(1)).sum(dim=1, keepdim=True).clamp(min=1)
        threshold = values.gather(1, kept - 1).squeeze(1)
        # The 100 best are all a row may keep, so min_keep above 100 reaches past the prefix.
        threshold, best = _at_least(candidates, threshold, _min_keep(args, top_h),
                                    (values, ids), bounded=True)
        _truncate(candidates, on, threshold, best)

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """Top-H reads only the 100 best logits (renormalised over them) and keeps a prefix of
        them (or of the min_keep best): when those are sent and above every tail logit, the
        result is the same and the tail is out."""
        top_h = args["top_h"]
        on = top_h > 0
        tail.mark_truncated(on)
        live = tail.live(on)
        if not bool(live.any()):
            return True
        width = candidates.values.shape[1]
        needed = _min_keep(args, top_h).clamp(min=TOP_H_CANDIDATES)
        values, _ = candidates.best_first(width)
        last = values.gather(1, (needed.clamp(max=width) - 1).unsqueeze(1)).squeeze(1)
        exact = (needed <= width) & (last > tail.max)
        tail.refuse(live & ~exact, lambda r: (
            f"top_h: its {int(needed[r])} best tokens are not all sent above the tail's max "
            f"bound (K = {width})"))
        tail.exclude(on & exact)
        return True
