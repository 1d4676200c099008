"""Sparse top-K rows: a row sent as its K best raw logits plus statistics of the other V − K
(its "tail"), and the machinery that decides when a policy's result provably cannot depend on
the tail's missing values.

- `SparseLogits`: the decoded rows (K entries best first + the tail's max, log-sum-exp and
  first two moments). Its `statistics()` are the whole row's exact log-normaliser, entropy and
  varentropy.
- `TailBound`: per row, what the chain knows about the tail as it transforms it: an upper
  bound on the tail's current max logit (float32, −inf once the tail is provably excluded) and
  an interval for its log-sum-exp (float64; exact while no stage touched the tail). The max
  bound is computed with the same float32 operations the stages apply to the logits, and those
  are increasing in the logit, so it bounds the values a dense run would hold exactly.
- The rules: every stage has `sparse_tail(candidates, args, batch, tail)` beside its code
  (`sampler_service.policy.processors.base.Stage`). The engine calls it before the stage runs
  on sparse rows; it updates the bound and refuses each row whose result it cannot prove
  equal to the dense one. A row whose tail is excluded is exact at every later stage that
  reads only the candidates (its K entries are then the whole row).
- `NotExact`: the step's refusals, every row at once (FAILED_PRECONDITION; `rows[i]` when the
  refusal depends on this step's data, `rows[i].policy` when the policy can never run on
  sparse rows), so the worker resends exactly those rows in full.

Decisions about sums (masses, normalisers) are taken in float64 and must hold with a margin
(`ROUNDING`): the dense run sums in float32, so a row whose decision lies within rounding of
its boundary is refused rather than guessed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from sampler_service.errors import FailedPrecondition
from sampler_service.policy.candidates import sort_ascending
from sampler_service.policy.statistics import RawStatistics

#: Relative margin of float64 decisions about float32 sums of a few terms (masses; nats in
#: log space): well above the error of float32 pairwise sums over a vocabulary.
ROUNDING = 1e-5
#: What one float32 operation may add to a relative error (2 units in the last place).
FLOAT32_STEP = 2.0 ** -23
#: Relative slack on the tail's log-sum-exp bounds for float32 rounding of transformed logits.
FLOAT32_SLACK = 1e-6


def log_margin(x: torch.Tensor) -> torch.Tensor:
    """Margin of a log-space boundary at `x` (nats): `ROUNDING` plus float32 rounding of |x|."""
    return ROUNDING + 1e-6 * x.abs()


def cumulative_margin(width: int, device: torch.device) -> torch.Tensor:
    """[1, width] relative margin of the float32 running sums of `width` positive terms: a
    sequential sum's i-th partial sum is off by at most i float32 steps, plus `ROUNDING`."""
    steps = torch.arange(1, width + 1, dtype=torch.float64, device=device)
    return (ROUNDING + steps * FLOAT32_STEP).unsqueeze(0)


def _combine(values: torch.Tensor, tail_lse: torch.Tensor, tail_mean: torch.Tensor,
             tail_mean_square: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-normaliser, entropy, varentropy) [S] float64 of rows made of `values` [S, K]
    (float64, −inf allowed, a finite best) and a tail given by its log-sum-exp, mean and mean
    square under its own softmax (−inf log-sum-exp: no tail).

    With c = the best value, a / b the mass of the entries / of the tail, m the two parts'
    means of l − c and v their variances: E = a·m_K + b·m_T, H = lse − c − E and
    V = a·(v_K + (m_K − E)²) + b·(v_T + (m_T − E)²), the law of total variance (V = Var_p(l))."""
    top = values.amax(dim=1)
    shifted = values - top.unsqueeze(1)
    weights = torch.exp(shifted)
    total = weights.sum(dim=1)
    shifted = shifted.nan_to_num(neginf=0.0)  # masked entries have weight 0
    mean_k = (weights * shifted).sum(dim=1) / total
    var_k = ((weights * shifted * shifted).sum(dim=1) / total - mean_k * mean_k).clamp(min=0.0)
    lse_k = top + torch.log(total)
    lse = torch.logaddexp(lse_k, tail_lse)
    a, b = torch.exp(lse_k - lse), torch.exp(tail_lse - lse)
    mean_t = tail_mean - top
    var_t = (tail_mean_square - tail_mean * tail_mean).clamp(min=0.0)
    mean = a * mean_k + b * mean_t
    varentropy = a * (var_k + (mean_k - mean) ** 2) + b * (var_t + (mean_t - mean) ** 2)
    return lse, lse - top - mean, varentropy


@dataclass(frozen=True, eq=False)
class SparseLogits:
    """S rows of a V-token vocabulary, each as its K best raw logits and its tail's statistics.

    Attributes
    ----------
    ids : int64 [S, K]            each row's K distinct token ids, best value first
    values : float32 [S, K]       their logits, descending (ties in any order)
    tail_max : float32 [S]        max logit of the other V − K ids (−inf: none, or all −inf)
    tail_lse : float64 [S]        log Σ e^l over them (−inf with tail_max)
    tail_mean : float64 [S]       Σ e^l·l / Σ e^l over them (0 without a tail)
    tail_mean_square : float64 [S]  Σ e^l·l² / Σ e^l over them (0 without a tail)
    vocab : int                   V
    All tensors live on the engine's device. `sampler_service.transport.sparse` validates and
    builds them from the wire.
    """

    ids: torch.Tensor
    values: torch.Tensor
    tail_max: torch.Tensor
    tail_lse: torch.Tensor
    tail_mean: torch.Tensor
    tail_mean_square: torch.Tensor
    vocab: int

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        """K, the entries sent per row."""
        return self.values.shape[1]

    def select(self, index: torch.Tensor) -> "SparseLogits":
        """The rows `index` (int64 on the device), in that order."""
        return SparseLogits(*(t.index_select(0, index) for t in (
            self.ids, self.values, self.tail_max, self.tail_lse, self.tail_mean,
            self.tail_mean_square)), vocab=self.vocab)

    def statistics(self) -> RawStatistics:
        """The whole rows' log-normaliser, entropy and varentropy (nats), exact from the K
        entries and the tail statistics: float64 math, float32 results as `raw_statistics`."""
        lse, entropy, varentropy = _combine(self.values.double(), self.tail_lse, self.tail_mean,
                                            self.tail_mean_square)
        return RawStatistics(log_normalizer=lse.float(), entropy=entropy.float(),
                             varentropy=varentropy.float())

    def top_two(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's largest and second largest raw logit [S] (the tail's max is the second
        when K = 1): exact, since the tail's max is known and below every sent logit."""
        second = self.values[:, 1] if self.width > 1 else self.tail_max
        return self.values[:, 0], second

    @functools.cached_property
    def _keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row · V + id of every entry, sorted; each one's flat position in `values`)."""
        rows = torch.arange(self.rows, device=self.ids.device).unsqueeze(1)
        return sort_ascending((rows * self.vocab + self.ids).flatten())

    def find(self, rows: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sent [P] bool, flat position [P]) of the (rows[i], tokens[i]) pairs: whether row
        rows[i] sent token tokens[i], and where (meaningless where not sent). O(P log SK)."""
        keys, positions = self._keys
        wanted = rows * self.vocab + tokens
        at = torch.searchsorted(keys, wanted).clamp(max=keys.numel() - 1)
        return keys[at] == wanted, positions[at]

    def logits_at(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits at `tokens` [A, C] of the rows `rows` [A] (all rows when None); −inf
        where the row did not send the token (its raw logit is not known)."""
        rows = torch.arange(self.rows, device=tokens.device) if rows is None else rows
        sent, positions = self.find(rows.unsqueeze(1).expand_as(tokens).flatten(),
                                    tokens.flatten())
        values = self.values.flatten()[positions]
        return torch.where(sent, values, torch.full_like(values, -math.inf)).view(tokens.shape)


@dataclass(frozen=True, order=True)
class Refusal:
    """One sparse row whose result could depend on its tail. `row` is the row's position among
    the rows it was reported for (the engine's sparse rows; `NotExact.for_request` renumbers).
    `structural`: the row's policy can never run on it sparse (not just this step's data)."""

    row: int
    description: str
    structural: bool = False

    @property
    def field(self) -> str:
        return f"rows[{self.row}].policy" if self.structural else f"rows[{self.row}]"


#: Refused rows a `NotExact` message names (the violations list them all).
MESSAGE_ROWS = 8


class NotExact(FailedPrecondition):
    """Sparse rows whose policy's result could depend on their tails' missing values: resend
    them in full. One violation per row (`Refusal.field`, the rule that refused it)."""

    refusals: tuple[Refusal, ...] = ()

    @classmethod
    def of(cls, refusals: Iterable[Refusal]) -> "NotExact":
        """The error of `refusals` (at least one). The message names the first rows only: the
        reasons travel once, in the violations (a status's details share the response's
        metadata budget, 8 KiB by default on gRPC clients)."""
        ordered = tuple(sorted(refusals))
        named = ", ".join(r.field for r in ordered[:MESSAGE_ROWS])
        more = f" and {len(ordered) - MESSAGE_ROWS} more" if len(ordered) > MESSAGE_ROWS else ""
        error = cls(f"{len(ordered)} sparse row(s) cannot be sampled exactly from their K sent "
                    f"entries; resend them with full logits: {named}{more} (each violation "
                    "says why)", ordered[0].field,
                    violations=tuple((r.field, r.description) for r in ordered))
        error.refusals = ordered
        return error

    def for_request(self, request_rows: Sequence[int]) -> "NotExact":
        """The same refusals with each row renumbered: sparse row j is `request_rows[j]`."""
        return NotExact.of(replace(r, row=request_rows[r.row]) for r in self.refusals)


def fmt(value: float | torch.Tensor) -> str:
    """A number in a refusal's description."""
    return f"{value:.4g}"


class TailBound:
    """What is known of each sparse row's tail as the chain transforms it (see the module
    docstring). All tensors are [S] on the device.

    - `max`: float32 upper bound on the tail's current max logit; −inf: the tail is excluded
      (every tail token is −inf, so the candidates are the whole row).
    - `lse_low`, `lse_high`: float64 bounds of log Σ e^l over the tail (−inf / +inf: unknown).
    - `pristine`: no stage changed a tail logit yet: the bounds are the worker's exact value
      and its moments still hold.
    - `truncated`: a truncation was on for the row, so a later refusal depends on the data
      (otherwise it is structural: no step could pass).
    - `refusals`: the first refusal of each refused row, by row.
    """

    def __init__(self, sparse: SparseLogits):
        self.sparse = sparse
        self.max = sparse.tail_max.clone()
        self.lse_low = sparse.tail_lse.clone()
        self.lse_high = sparse.tail_lse.clone()
        self.pristine = torch.ones(sparse.rows, dtype=torch.bool, device=sparse.values.device)
        self.truncated = torch.zeros_like(self.pristine)
        self.refusals: dict[int, Refusal] = {}
        #: log of the number of tail tokens, the most a tail can hold.
        self.log_size = math.log(sparse.vocab - sparse.width) if sparse.vocab > sparse.width \
            else -math.inf

    @property
    def excluded(self) -> torch.Tensor:
        return torch.isneginf(self.max)

    def live(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[S] bool: the `rows` (all when None) whose tail is not excluded."""
        return ~self.excluded if rows is None else rows & ~self.excluded

    # -- refusals -------------------------------------------------------------------------------
    def refuse(self, rows: torch.Tensor, describe: Callable[[int], str],
               structural: bool | None = None) -> None:
        """Refuses the `rows` [S] bool not refused yet, `describe(row)` starting with the rule's
        stage key. `structural` None: structural unless a truncation was on for the row."""
        if not bool(rows.any()):
            return
        truncated = self.truncated.tolist()
        for row in rows.nonzero().flatten().tolist():
            if row not in self.refusals:
                self.refusals[row] = Refusal(row, describe(row), not truncated[row]
                                             if structural is None else structural)

    def refuse_unless_excluded(self, rows: torch.Tensor, rule: str) -> None:
        """Refuses the `rows` whose tail is not excluded: `rule` says why they need that."""
        self.refuse(self.live(rows), lambda _: f"{rule}; needs the tail excluded first")

    def refuse_unless_best_above(self, best: torch.Tensor, rows: torch.Tensor, key: str) -> None:
        """Refuses the `rows` [S] bool that take an argmax whose best candidate `best` [S] is not
        above the tail's max bound (a tie could go to a lower tail id), tail not excluded."""
        self.refuse(self.live(rows) & ~(best > self.max), lambda r: (
            f"{key}: the best candidate {fmt(best[r])} is not above the tail's max bound "
            f"{fmt(self.max[r])} (greedy ties go to the lowest id)"), structural=False)

    # -- what stages do to the tail -------------------------------------------------------------
    def mark_truncated(self, rows: torch.Tensor) -> None:
        self.truncated |= rows

    def exclude(self, rows: torch.Tensor) -> None:
        """Every tail token of `rows` [S] bool is now −inf."""
        self.max = self.max.masked_fill(rows, -math.inf)
        self.lse_low = self.lse_low.masked_fill(rows, -math.inf)
        self.lse_high = self.lse_high.masked_fill(rows, -math.inf)
        self.pristine &= ~rows

    def lower(self, rows: torch.Tensor) -> None:
        """Some tail logits of `rows` [S] bool were lowered or masked: the max bound and the
        upper bound of the mass still hold, the lower bound is lost."""
        self.lse_low = self.lse_low.masked_fill(rows, -math.inf)
        self.pristine &= ~rows

    def restrict(self, rows: torch.Tensor, lacking: torch.Tensor) -> None:
        """Only listed tokens stay in `rows` [S] bool: those whose list names no tail token
        (`lacking` false) exclude the tail; the others keep a subset of it."""
        self.exclude(rows & ~lacking)
        self.lower(rows & lacking)

    def scale(self, temperature: torch.Tensor, rows: torch.Tensor) -> None:
        """The logits of `rows` [S] bool were divided by `temperature` [S] (float32, > 0).

        With β = 1/T and f(β) = log Σ e^(β·l) over the n tail tokens (convex, f' ≤ max l):
        β > 1: f(β) ≤ f(1) + (β − 1)·max and f(β) ≥ β·f(1) − (β − 1)·ln n (power means);
        β < 1: f(β) ≤ (1 − β)·ln n + β·f(1) (Hölder) and f(β) ≥ f(1) + (β − 1)·max;
        while the tail is pristine also f(β) ≥ f(1) + (β − 1)·mean (the tangent at 1)."""
        rows = self.live(rows)
        if not bool(rows.any()):
            return
        divisor = torch.where(rows, temperature, torch.ones_like(temperature))
        beta = 1.0 / divisor.double()
        bound = self.max.double()
        low, high, n = self.lse_low, self.lse_high, self.log_size
        sharper = beta > 1
        new_high = torch.where(sharper, high + (beta - 1) * bound, (1 - beta) * n + beta * high)
        new_low = torch.where(sharper, beta * low - (beta - 1) * n, low + (beta - 1) * bound)
        tangent = self.sparse.tail_lse + (beta - 1) * self.sparse.tail_mean
        new_low = torch.where(self.pristine, torch.maximum(new_low, tangent), new_low)
        self.lse_high = torch.where(rows, new_high + FLOAT32_SLACK * (1 + new_high.abs()), high)
        self.lse_low = torch.where(rows, new_low - FLOAT32_SLACK * (1 + new_low.abs()), low)
        self.max = self.max / divisor  # the stages' own float32 division: an exact bound
        self.pristine &= ~rows

    def touch(self, rows: torch.Tensor, tokens: torch.Tensor,
              new_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              rises: torch.Tensor) -> None:
        """A stage changes the logits of the (rows[i], tokens[i]) pairs [P] by a map increasing
        in the logit, computed by `new_value(logits, pairs)` (the stage's own float32 map of
        the given logits of the pairs at indices `pairs`). `rises` [P] bool: the pair's change
        may raise its logit. Pairs in the tail: rising ones raise the max bound to their map
        of it and add their most to the mass bound; lowering ones lose the mass's lower bound."""
        in_tail = self._in_tail(rows, tokens)
        self.lower(self.rows_mask(rows[in_tail & ~rises]))
        pairs = (in_tail & rises).nonzero().squeeze(1)
        if not pairs.numel():
            return
        self.pristine &= ~self.rows_mask(rows[pairs])
        up_rows = rows[pairs]
        lifted = new_value(self.max[up_rows], pairs)
        peak = torch.full_like(self.max, -math.inf).scatter_reduce_(0, up_rows, lifted, "amax")
        count = torch.zeros_like(self.lse_high).index_add_(
            0, up_rows, torch.ones_like(up_rows, dtype=self.lse_high.dtype))
        rose = count > 0
        added = torch.log(count) + peak.double()
        self.lse_high = torch.where(rose, torch.logaddexp(self.lse_high, added), self.lse_high)
        self.max = torch.maximum(self.max, peak)

    def mask(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The (rows[i], tokens[i]) pairs [P] became −inf: tail ones lower their row's tail."""
        self.lower(self.rows_mask(rows[self._in_tail(rows, tokens)]))

    def _in_tail(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[P] bool: the pairs whose token is in its row's (not excluded) tail."""
        return ~self.sparse.find(rows, tokens)[0] & self.live()[rows]

    def rows_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """[S] bool: the rows listed in `rows` (int64, repeats allowed)."""
        return torch.zeros_like(self.pristine).index_fill_(0, rows, True)

    # -- what rules read ------------------------------------------------------------------------
    def row_lse(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log Σ e^l over the candidates `values` [S, K], low and high bounds of the whole
        row's), float64 [S] each."""
        lse_k = torch.logsumexp(values.double(), dim=1)
        return lse_k, torch.logaddexp(lse_k, self.lse_low), torch.logaddexp(lse_k, self.lse_high)

    def known_entropy(self) -> torch.Tensor:
        """[S] bool: rows whose whole current distribution has a known entropy (pristine
        tail, or none)."""
        return self.pristine | self.excluded

    def entropy(self, values: torch.Tensor) -> torch.Tensor:
        """[S] float64 entropy (nats) of the whole current rows: the candidates `values`
        [S, K] and the tail; exact where `known_entropy()`, meaningless elsewhere."""
        excluded = self.excluded
        gone = torch.full_like(self.lse_low, -math.inf)
        zero = torch.zeros_like(self.lse_low)
        return _combine(values.double(), torch.where(excluded, gone, self.sparse.tail_lse),
                        torch.where(excluded, zero, self.sparse.tail_mean),
                        torch.where(excluded, zero, self.sparse.tail_mean_square))[1]


def candidates_entropy(values: torch.Tensor) -> torch.Tensor:
    """[S] float64 entropy of the softmax of `values` [S, K] alone (what a stage computes when
    it runs on the K entries)."""
    zero = torch.zeros(values.shape[0], dtype=torch.float64, device=values.device)
    return _combine(values.double(), torch.full_like(zero, -math.inf), zero, zero)[1]


def same_probable_set(values: torch.Tensor, cut_k: torch.Tensor, cut_low: torch.Tensor,
                      cut_high: torch.Tensor, tail: TailBound) -> tuple[torch.Tensor, torch.Tensor]:
    """For a rule "keep l ≥ cut" whose cut (float64 [S]) is `cut_k` when the stage runs on the
    candidates `values` [S, K] alone and lies in [`cut_low`, `cut_high`] on the whole row:
    (the candidates keep the same tokens either way, no tail token reaches the cut), each
    [S] bool, with `log_margin` around every boundary."""
    lowest = torch.minimum(cut_k, cut_low)
    highest = torch.maximum(cut_k, cut_high)
    v = values.double()
    near = (v >= (lowest - log_margin(lowest)).unsqueeze(1)) & \
        (v < (highest + log_margin(highest)).unsqueeze(1))
    tail_below = tail.max.double() < cut_low - log_margin(cut_low)
    return ~near.any(dim=1), tail_below | tail.excluded
