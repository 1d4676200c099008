"""Seeded sampling from the processed distribution."""
from __future__ import annotations

import math

import torch

from sampler_service.policy.candidates import Candidates, row_maxima, sort_ascending
from sampler_service.policy.noise import uniform_noise
from sampler_service.policy.processors.base import RowBatch, Selector
from sampler_service.policy.sparse import TailBound

#: The token-id coordinate of the one uniform a row draws per step.
ROW_UNIFORM_TOKEN = -1


def token_id_order(candidates: Candidates) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values [R, C], ids [R, C] or None) of `candidates` in ascending token-id order: a dense
    batch as it is (ids None: column = token), a sparse one sorted by id. A copy is made for a
    sparse batch only; callers must not write into the values of a dense one."""
    if candidates.ids is None:
        return candidates.values, None
    ids, order = sort_ascending(candidates.ids)
    return candidates.values.gather(1, order), ids


def draw_inverse_cdf(values: torch.Tensor, batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(column [R], its log-probability [R]) drawn from softmax(values), one uniform per row:
    `draw_inverse_cdf_reference`'s draw, by the numba kernel (`sampler_service.kernels.cpu_draw`:
    float64 sums in column order, no [R, C] temporaries but one row) on float32 CPU rows. The
    two agree except where U·Σw lies within float32 rounding of a cumulative boundary (the
    kernel's float64 sums are the closer to exact arithmetic); each alone draws the same token
    from a dense row and from its truncation."""
    if values.device.type == "cpu" and values.dtype == torch.float32:
        try:
            from sampler_service.kernels.cpu_draw import draw_columns
        except ImportError:  # numba absent: the `server` extra is not installed
            return draw_inverse_cdf_reference(values, batch)
        u = uniform_noise(batch.seeds, batch.positions,
                          torch.full_like(batch.seeds, ROW_UNIFORM_TOKEN).unsqueeze(1))
        columns, log_probs = draw_columns(values.contiguous().numpy(), row_maxima(values).numpy(),
                                          u.squeeze(1).numpy(), torch.get_num_threads())
        return torch.from_numpy(columns), torch.from_numpy(log_probs).to(values.dtype)
    return draw_inverse_cdf_reference(values, batch)


def draw_inverse_cdf_reference(values: torch.Tensor, batch: RowBatch
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(column [R], its log-probability [R]) drawn from softmax(values), one uniform per row.

    `values` [R, C] must be in token-id order (see `token_id_order`). With w_i = exp(l_i − max l)
    and U the counter-based uniform of (seed, position) at token coordinate `ROW_UNIFORM_TOKEN`,
    the column is the first i with Σ_{j≤i} w_j > U · Σ_j w_j: the `sample` selector's draw, so
    both give the same token for the same row and distribution. −inf entries add exact zeros:
    they are never drawn and change neither the draw nor the log-probability, whatever the
    width of the batch. The log-probability is log(w_i / Σ_j w_j), from the same sum.
    """
    best = values.amax(dim=1, keepdim=True)
    cumulative = values.clone().sub_(best).exp_().cumsum(dim=1)  # in place: no extra [R, C] pass
    total = cumulative[:, -1:]
    u = uniform_noise(batch.seeds, batch.positions,
                      torch.full_like(total, ROW_UNIFORM_TOKEN, dtype=torch.int64))
    target = torch.minimum((u * total).to(cumulative.dtype),
                           torch.nextafter(total, torch.zeros_like(total)))
    column = torch.searchsorted(cumulative, target, right=True)
    log_prob = values.gather(1, column) - best - torch.log(total)
    return column.squeeze(1), log_prob.squeeze(1)


def refuse_unless_drawn_exactly(key: str, candidates: Candidates, batch: RowBatch,
                                tail: TailBound) -> None:
    """The rule of a selector that draws from the candidates' distribution and takes the argmax
    of greedy rows: greedy rows need their best candidate above the tail's max bound, drawn
    rows need the tail excluded (the draw's CDF runs over every token)."""
    tail.refuse_unless_best_above(candidates.max_values(), batch.greedy, key)
    tail.refuse_unless_excluded(~batch.greedy, f"{key}: draws from the whole row")


class Sample(Selector):
    """Draws a token from softmax(l) by inverting its CDF with one uniform per row.

    Tokens are taken in token-id order; with w_i = exp(l_i − max l) and U a counter-based hash
    of (seed, position), the token is the first i with Σ_{j≤i} w_j > U · Σ_j w_j. The draw
    depends only on the row itself (not its batch mates, not the process), and a truncated
    batch gives the same token as a dense one: masked tokens add exact zeros to the sums.
    Rows the temperature processor marked greedy take the argmax. Peer: vLLM's random
    sampling (same law; vLLM draws exponential noise from torch generators). Selects; keeps no
    state besides the seed.
    Sparse rows: drawn rows need the tail excluded by an earlier truncation; greedy rows need
    their best candidate above the tail's max bound.
    """

    key = "sample"

    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        greedy = batch.greedy
        if bool(greedy.all()):
            return candidates.argmax()
        values, ids = token_id_order(candidates)
        column, _ = draw_inverse_cdf(values, batch)
        drawn = column if ids is None else ids.gather(1, column.unsqueeze(1)).squeeze(1)
        return torch.where(greedy, candidates.argmax(), drawn) if bool(greedy.any()) else drawn

    def distribution(self, candidates: Candidates, args: dict[str, torch.Tensor],
                     batch: RowBatch) -> Candidates:
        if bool(batch.greedy.all()):
            return candidates.one_hot(candidates.argmax())
        dist = candidates.log_softmax()
        if bool(batch.greedy.any()):
            hit = dist.token_ids() == candidates.argmax().unsqueeze(1)
            point = torch.zeros_like(dist.values).masked_fill_(~hit, -math.inf)
            dist.values = torch.where(batch.greedy.unsqueeze(1), point, dist.values)
        return dist

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        refuse_unless_drawn_exactly(self.key, candidates, batch, tail)
        return True
