"""Mirostat v1 and v2: sampling that steers the surprise of the chosen tokens toward a target."""
from __future__ import annotations

import math

import torch

from sampler_service.errors import InvalidArgument, echo
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import RowBatch, Selector
from sampler_service.policy.selectors.sample import (draw_inverse_cdf,
                                                     refuse_unless_drawn_exactly, token_id_order)
from sampler_service.policy.sparse import TailBound

LN2 = math.log(2.0)
#: `SequenceState.processor_state` key of a sequence's mu (a float, in bits).
MEMORY_KEY = "mirostat"


class Mirostat(Selector):
    """Mirostat (Basu et al. 2021, arXiv:2007.14966): samples from a truncation of softmax(l)
    whose size adapts so that the surprise of the chosen tokens, S = −log₂ p(token), averages
    the target τ.

    Each sequence keeps μ (bits), initially 2τ. A step, with p = softmax(l) over the finite
    candidates sorted best first:
    - v1: s = Σ tᵢbᵢ / Σ tᵢ² over the m best tokens, with tᵢ = ln((i+2)/(i+1)) and
      bᵢ = ln(pᵢ/pᵢ₊₁) (i = 0 … min(m, n) − 2, n = number of finite candidates); ε = s − 1,
      k = (ε · 2^μ / (1 − V^(−ε)))^(1/s) with V the vocabulary size; keep the ⌊k⌋ best tokens
      (at least 1; ties at the k-th value go to the lowest ids).
    - v2: keep the tokens with −log₂ pᵢ ≤ μ (the best one if none).
    Then draw a token from the kept tokens renormalised (q), by the `sample` selector's
    inverse-CDF draw (one counter-based uniform per row, tokens in id order), and update
    μ ← μ − η · (−log₂ q(token) − τ).

    Peer: llama.cpp `src/llama-sampling.cpp`, `llama_sampler_mirostat_apply` (v1) and
    `llama_sampler_mirostat_v2_apply` (v2), float32 math as there. Deliberate differences:
    tokens masked to −inf by the chain are not candidates (llama.cpp's array may still list
    them with p = 0, which makes its v1 slope ∞ or NaN); bᵢ is taken as lᵢ − lᵢ₊₁ (equal to
    ln(pᵢ/pᵢ₊₁) without float32 underflow); where llama.cpp's `int(k)` is undefined (k = ∞ or
    beyond int32) k saturates to keep every candidate, and a NaN k (one candidate, or s = 1
    exactly) keeps 1 as llama.cpp does on common hardware; ties are broken by token id, not by
    the order of a sort.
    Rows the temperature processor marked greedy take the argmax (ties to the lowest id); their
    distribution is a point mass, so their S is 0 and μ grows by ητ (as llama.cpp's mirostat
    does after a zero temperature).

    Selects. State: μ per sequence, under `mirostat` in the sequence's processor state; it
    changes only when a step's token is accepted (a retried step does not update it twice).
    Mirostat has no off value: choose `sample` for untruncated sampling.
    Ranges are llama.cpp's (`llama_sampler_init_mirostat(_v2)` checks none): any τ and η (a
    negative τ starts μ below 0, where v2 keeps the best token alone; a negative η moves μ away
    from the target). `m` must be ≥ 2: with fewer tokens v1's slope is 0 / 0, which llama.cpp
    does not define.
    Sparse rows: drawn rows need the tail excluded by an earlier truncation (v1's k and v2's
    cut read the whole distribution); greedy rows need their best candidate above the tail's
    max bound.
    """

    key = "mirostat"
    params = (
        Param("version", "int", default=2, off=None, minimum=1, maximum=2,
              doc="1: Zipf-estimated top-k (paper's algorithm 1); 2: surprise cut at μ"),
        Param("tau", "float", default=5.0, off=None,
              doc="τ, target surprise in bits; μ starts at 2τ"),
        Param("eta", "float", default=0.1, off=None,
              doc="η, learning rate of μ (0 keeps μ at 2τ)"),
        Param("m", "int", default=100, off=None, minimum=2,
              doc="v1 only: best tokens used to estimate the Zipf exponent s"),
    )

    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        truncated, ids, mu = self._truncated(candidates, args, batch)
        column, log_q = draw_inverse_cdf(truncated, batch)
        surprise = -log_q / LN2
        tau, eta = args["tau"].to(mu.dtype), args["eta"].to(mu.dtype)
        batch.remember(MEMORY_KEY, (mu - eta * (surprise - tau)).tolist())
        return column if ids is None else ids.gather(1, column.unsqueeze(1)).squeeze(1)

    def distribution(self, candidates: Candidates, args: dict[str, torch.Tensor],
                     batch: RowBatch) -> Candidates:
        """The kept tokens renormalised (point mass for greedy rows), best first if sparse."""
        truncated, ids, _ = self._truncated(candidates, args, batch)
        log_q = torch.log_softmax(truncated, dim=1)
        if ids is None:
            return Candidates(log_q, None, candidates.vocab)
        log_q, order = torch.sort(log_q, dim=1, descending=True)
        return Candidates(log_q, ids.gather(1, order), candidates.vocab)

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        refuse_unless_drawn_exactly(self.key, candidates, batch, tail)
        return True

    # -- μ in resume records ---------------------------------------------------------------------
    def saved_memory(self, value: float) -> float:
        return float(value)

    def restored_memory(self, value, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgument(f"mirostat's mu must be a finite number, got {echo(value)}",
                                  field)
        return float(value)

    # -- the truncation -------------------------------------------------------------------------
    @staticmethod
    def _mu(tau: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        """[R] float32 μ of each row: its stored value, else 2τ."""
        stored = [math.nan if mu is None else mu for mu in batch.memory(MEMORY_KEY, None)]
        stored_t = torch.tensor(stored, dtype=torch.float32, device=batch.device)
        return torch.where(torch.isnan(stored_t), 2.0 * tau, stored_t)

    def _truncated(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(kept logits with the rest −inf [R, C] in token-id order, their ids or None, μ [R]).

        Each row keeps the values ≥ a threshold; a row that must keep exactly `limit` tokens
        (v1's k, or the one best token) and has more ties at the threshold keeps the lowest ids.
        """
        tau = args["tau"].to(torch.float32)
        mu = self._mu(tau, batch)
        v1 = (args["version"] == 1) & ~batch.greedy
        v2 = (args["version"] == 2) & ~batch.greedy
        values, ids = token_id_order(candidates)
        best = candidates.max_values()
        threshold = best.clone()  # greedy rows: the best token
        limit = torch.zeros_like(mu, dtype=torch.int64)
        one = batch.greedy.clone()
        if bool(v2.any()):  # −log₂ p > μ is cut, i.e. l < log Σ exp l − μ·ln 2
            cut = torch.logsumexp(values, dim=1) - mu * LN2
            threshold = torch.where(v2 & (cut <= best), cut, threshold)
            one |= v2 & (cut > best)  # nothing under μ: the best token alone
        spill = torch.zeros_like(one)
        if bool(v1.any()):
            kth, k, spill = self._kth_value(candidates, args["m"], mu, v1)
            threshold = torch.where(v1, kth, threshold)
            limit = torch.where(v1, k, limit)
        if bool(one.any()):
            top = candidates.best_first(2)[0]
            limit = torch.where(one, torch.ones_like(limit), limit)
            spill |= one & (top[:, 0] == top[:, -1]) if top.shape[1] == 2 else spill
        if bool(spill.any()):  # more ties at the threshold than room: the lowest ids stay
            rows = spill.nonzero().squeeze(1)
            part, bound = values.index_select(0, rows), threshold.index_select(0, rows).unsqueeze(1)
            room = limit.index_select(0, rows) - (part > bound).sum(dim=1)
            tie = part == bound
            part = part.masked_fill(tie & (tie.cumsum(dim=1) > room.unsqueeze(1)), -math.inf)
            values = values.index_copy(0, rows, part)
        return values.masked_fill(values < threshold.unsqueeze(1), -math.inf), ids, mu

    @staticmethod
    def _kth_value(candidates: Candidates, m: torch.Tensor, mu: torch.Tensor, v1: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mirostat v1's k-th best value, k, and whether ties at it exceed k, per row. Rows that
        keep every candidate get (−inf, 0, False)."""
        best, _ = candidates.best_first(int(m[v1].max()))
        width = best.shape[1]
        i = torch.arange(width - 1, device=best.device)
        t = torch.log((i + 2).to(torch.float32) / (i + 1).to(torch.float32))
        valid = (i + 1 < m.unsqueeze(1)) & torch.isfinite(best[:, 1:])
        b = torch.where(valid, best[:, :-1] - best[:, 1:], torch.zeros_like(best[:, 1:]))
        s_hat = (t * b).sum(dim=1) / torch.where(valid, t * t, torch.zeros_like(b)).sum(dim=1)
        epsilon = s_hat - 1
        k = torch.pow(epsilon * torch.pow(2.0, mu) / (1 - torch.pow(float(candidates.vocab),
                                                                    -epsilon)), 1 / s_hat)
        k = torch.where(torch.isnan(k), torch.ones_like(k), k)  # llama.cpp: int(NaN) -> 1
        columns = candidates.values.shape[1]
        k = torch.where(v1, k.floor().clamp(min=1.0, max=columns), torch.full_like(k, columns))
        k = k.to(torch.int64)
        # Truncate where a (k+1)-th finite candidate exists; one past the k-th also shows ties.
        maybe = k < columns
        if not bool(maybe.any()):
            return torch.full_like(mu, -math.inf), torch.zeros_like(k), torch.zeros_like(maybe)
        needed = int(k[maybe].max()) + 1
        if needed > width:
            best, _ = candidates.best_first(needed)
        at = best.gather(1, torch.stack([k - 1, k], dim=1).clamp(max=best.shape[1] - 1))
        cut = maybe & torch.isfinite(at[:, 1])
        kth = torch.where(cut, at[:, 0], torch.full_like(mu, -math.inf))
        return kth, torch.where(cut, k, torch.zeros_like(k)), cut & (at[:, 1] == at[:, 0])
