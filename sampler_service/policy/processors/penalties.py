"""Penalties on tokens the sequence has already seen.

- vLLM / OpenAI semantics (`repetition_penalty`, `frequency_penalty`, `presence_penalty`): they
  read the per-sequence token counts kept in `TokenHistory`, so a step costs
  O(rows × distinct tokens).
- llama.cpp semantics (`penalties`, `dry`): they read the last `last_n` tokens of prompt +
  output, so a step costs O(rows × window).

All of them touch only the (row, token) pairs that occurred, in one scatter over the batch.
Each describes its change as a `TokenChange` (the pairs and a map increasing in the logit),
which `apply` writes into the candidates and, on sparse rows, `sparse_tail` applies to the
tail's max bound: exact on sent tokens; a tail token it lowers leaves the bound valid, one it
may raise lifts the bound to the map of it (`TailBound.touch`).

A change never makes a logit +inf or NaN: a result beyond float32's range saturates at its
largest value (where the peers' float32 arithmetic gives +inf, and their softmax NaN), and a
token already at −inf stays there. A result below float32's range is −inf, as the peers'.
"""
from __future__ import annotations

import functools
from abc import abstractmethod
from typing import Callable, NamedTuple

import numpy as np
import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch
from sampler_service.policy.sparse import TailBound

#: rule(values [P], rows [P], extra [P] or None) -> new values [P] (float32, increasing in values).
Rule = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class TokenChange(NamedTuple):
    """A change of the logits at (rows[i], tokens[i]) pairs [P]: `rule(values, rows, extra)`
    gives their new values (increasing in the values); `extra` [P] is per-pair data for it
    (counts, biases) or None; `rises` [P] bool says which pairs may be raised."""

    rows: torch.Tensor
    tokens: torch.Tensor
    extra: torch.Tensor | None
    rule: Rule
    rises: torch.Tensor

    @classmethod
    def of(cls, active: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
           extra: torch.Tensor | None, rule: Rule, rises: torch.Tensor) -> "TokenChange":
        """The change restricted to the pairs of `active` rows (`rises` is per row [R])."""
        on = active[rows]
        rows = rows[on]
        return cls(rows, tokens[on], None if extra is None else extra[on], rule, rises[rows])

    def _at(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.rows[pairs], None if self.extra is None else self.extra[pairs]

    def _new_values(self, values: torch.Tensor, rows: torch.Tensor,
                    extra: torch.Tensor | None) -> torch.Tensor:
        """`rule`'s values, never +inf or NaN: past float32's max they saturate at it, and a
        value at −inf stays −inf (a penalty that overflowed to −inf would make it NaN)."""
        new = self.rule(values, rows, extra).clamp(max=torch.finfo(values.dtype).max)
        return torch.where(torch.isneginf(values), values, new)

    def apply(self, candidates: Candidates) -> None:
        """Writes the new values, in one scatter over the batch (pairs a sparse batch lacks
        are −inf already and stay so)."""
        present, columns = candidates.locate(self.rows, self.tokens)
        rows, extra = self._at(present.nonzero().squeeze(1))
        values = candidates.values[rows, columns]
        candidates.update(rows, columns, self._new_values(values, rows, extra))

    def bound(self, tail: TailBound) -> None:
        """The pairs in sparse rows' tails, applied to the tail's bounds (`TailBound.touch`)."""
        tail.touch(self.rows, self.tokens,
                   lambda values, pairs: self._new_values(values, *self._at(pairs)), self.rises)


class TokenChangeProcessor(Processor):
    """A processor that changes the logits of some (row, token) pairs (`change`)."""

    @abstractmethod
    def change(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> TokenChange | None:
        """The step's change of `candidates`, or None when every row is off."""

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        change = self.change(candidates, args, batch)
        if change is not None:
            change.apply(candidates)

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """Exact on sent tokens; tail tokens bound as `TokenChange.bound` says."""
        change = self.change(candidates, args, batch)
        if change is not None:
            change.bound(tail)
        return True


class RepetitionPenalty(TokenChangeProcessor):
    """CTRL repetition penalty over prompt ∪ output: l/θ if l > 0 else l·θ.

    Applied once per distinct token whatever its count. Peer: vLLM `repetition_penalty`
    (identical to Hugging Face's `RepetitionPenaltyLogitsProcessor` over the full input ids).
    Transform; reads the sequence's distinct prompt and output tokens, which grow by one
    token per accepted step. Off: θ = 1.0.
    Sparse rows: exact; θ < 1 lifts the tail's max bound M to M/θ (M > 0) or M·θ.
    """

    key = "repetition_penalty"
    role = "transform"
    params = (Param("penalty", "float", default=1.0, off=1.0, minimum=0.0, exclusive_minimum=True,
                    doc="θ; > 1 discourages repeats"),)
    flat_names = {"penalty": "repetition_penalty"}

    def change(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> TokenChange | None:
        theta = args["penalty"]
        active = theta != 1.0
        if not bool(active.any()):
            return None
        rows, tokens = batch.seen_token_pairs()
        return TokenChange.of(active, rows, tokens, None,
                              lambda v, r, _: torch.where(v > 0, v / theta[r], v * theta[r]),
                              theta < 1.0)


class FrequencyPenalty(TokenChangeProcessor):
    """OpenAI frequency penalty: l − c·f, c = how often the token occurs in the output.

    Peer: vLLM `frequency_penalty` (the prompt does not count). Transform; reads the sequence's
    output token counts. Off: f = 0.
    Sparse rows: exact; f < 0 lifts the tail's max bound by the largest −c·f.
    """

    key = "frequency_penalty"
    role = "transform"
    params = (Param("penalty", "float", default=0.0, off=0.0, minimum=-2.0, maximum=2.0,
                    doc="f, subtracted once per occurrence"),)
    flat_names = {"penalty": "frequency_penalty"}

    def change(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> TokenChange | None:
        f = args["penalty"]
        active = f != 0.0
        if not bool(active.any()):
            return None
        rows, tokens, counts = batch.output_count_pairs()
        return TokenChange.of(active, rows, tokens, counts, lambda v, r, c: v - c * f[r],
                              f < 0.0)


class PresencePenalty(TokenChangeProcessor):
    """OpenAI presence penalty: l − r for every token that occurs in the output.

    Peer: vLLM `presence_penalty` (the prompt does not count). Transform; reads the sequence's
    output tokens. Off: r = 0.
    Sparse rows: exact; r < 0 lifts the tail's max bound by −r.
    """

    key = "presence_penalty"
    role = "transform"
    params = (Param("penalty", "float", default=0.0, off=0.0, minimum=-2.0, maximum=2.0,
                    doc="r, subtracted once if the token occurred"),)
    flat_names = {"penalty": "presence_penalty"}

    def change(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> TokenChange | None:
        r = args["penalty"]
        active = r != 0.0
        if not bool(active.any()):
            return None
        rows, tokens, _ = batch.output_count_pairs()
        return TokenChange.of(active, rows, tokens, None, lambda v, rr, _: v - r[rr], r < 0.0)


# -- llama.cpp: penalties over a window, DRY -----------------------------------------------------
def _window(state, last_n: int) -> list[int]:
    """The last `last_n` tokens of the sequence's prompt + output; all of them when last_n < 0."""
    prompt, output = state.prompt_ids, state.output_ids
    if last_n < 0 or last_n >= len(prompt) + len(output):
        return [*prompt, *output]
    if last_n <= len(output):
        return output[len(output) - last_n:]
    return [*prompt[len(prompt) - (last_n - len(output)):], *output]


def _distinct(rows: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None,
              device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (row, token) pairs with their count, or with their largest `values` when given,
    as tensors on `device`. (NumPy's sort is the fastest here; torch.unique is 2x slower.)"""
    stride = int(tokens.max()) + 1
    keys = rows * stride + tokens
    if values is None:
        keys, counts = np.unique(keys, return_counts=True)
    else:
        order = np.lexsort((values, keys))  # by key, then value: a key's largest comes last
        keys, counts = keys[order], values[order]
        ends = np.append(keys[1:] != keys[:-1], True)
        keys, counts = keys[ends], counts[ends]
    return tuple(torch.from_numpy(x).to(device) for x in (keys // stride, keys % stride, counts))


class Penalties(TokenChangeProcessor):
    """llama.cpp's penalties sampler: repeat, frequency and presence over the last `last_n` tokens.

    For every token with count c > 0 among the last `last_n` tokens of prompt + output:
    l ← l/θ if l > 0 else l·θ (CTRL repeat penalty, θ = `repeat`), then
    l ← l − (c·f + r) (f = `frequency`, r = `presence`). Tokens outside the window are untouched.

    Peer: llama.cpp `src/llama-sampling.cpp`, `llama_sampler_penalties_apply` (the `penalties`
    sampler behind `--repeat-last-n`, `--repeat-penalty`, `--frequency-penalty`,
    `--presence-penalty`). The prompt counts: llama.cpp's server accepts the prompt tokens into
    the sampler, so the window is the last `last_n` tokens of prompt + output.
    `last_n = -1` means the whole context (llama.cpp's server maps -1 to the context size).
    Ranges are llama.cpp's: `frequency` and `presence` take any finite value (llama.cpp caps
    neither; the flat `frequency_penalty` / `presence_penalty` keep vLLM's [-2, 2]), and
    `last_n` ≥ -1 (its server refuses less). `repeat` must be > 0: llama.cpp does not check it,
    but θ = 0 divides positive logits by zero and θ < 0 turns the ranking over.
    This differs from `repetition_penalty` / `frequency_penalty` / `presence_penalty` (vLLM),
    which see the whole sequence and whose frequency and presence count the output only.

    Transform. No state of its own: the window is read from the sequence's prompt and output
    ids at each step, so it slides by one token per accepted step.
    Off: `last_n` = 0, or `repeat` = 1 with `frequency` = `presence` = 0.
    Sparse rows: exact; a change that may raise a tail token lifts the tail's max bound to
    the penalised bound.
    """

    key = "penalties"
    role = "transform"
    params = (
        Param("last_n", "int", default=64, off=0, minimum=-1,
              doc="window: the last n tokens of prompt + output (-1: all of them; 0: off)"),
        Param("repeat", "float", default=1.0, off=1.0, minimum=0.0, exclusive_minimum=True,
              doc="θ, CTRL repeat penalty; > 1 discourages repeats"),
        Param("frequency", "float", default=0.0, off=0.0,
              doc="f, subtracted once per occurrence in the window (no cap, as llama.cpp)"),
        Param("presence", "float", default=0.0, off=0.0,
              doc="r, subtracted once if the token occurs in the window (no cap, as llama.cpp)"),
    )

    def change(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> TokenChange | None:
        last_n, theta, f, r = args["last_n"], args["repeat"], args["frequency"], args["presence"]
        active = (last_n != 0) & ((theta != 1.0) | (f != 0.0) | (r != 0.0))
        if not bool(active.any()):
            return None
        on = active.nonzero().flatten().tolist()
        windows = [np.array(_window(batch.states[i], n), dtype=np.int64)
                   for i, n in zip(on, last_n[on].tolist())]
        rows = np.repeat(np.array(on, dtype=np.int64), [len(w) for w in windows])
        if not rows.size:
            return None
        rows, tokens, counts = _distinct(rows, np.concatenate(windows), device=batch.device)
        counts = counts.to(torch.float32)

        def rule(values, rows, counts):
            t = theta[rows]
            return torch.where(values > 0, values / t, values * t) - (counts * f[rows] + r[rows])

        change = TokenChange.of(active, rows, tokens, counts, rule, theta < 1.0)
        return change._replace(rises=change.rises | (change.extra * f[change.rows]
                                                     + r[change.rows] < 0))


#: ln of the largest float32: llama.cpp caps DRY's exponent at this / ln(base).
_FLOAT_MAX_LOG = 88.7228391


@functools.lru_cache(maxsize=256)
def _breaker_table(breakers: tuple[tuple[int, ...], ...]
                   ) -> tuple[dict[int, tuple[tuple[int, ...], ...]], np.ndarray, np.ndarray]:
    """(head → tails, head ids, single-token breaker ids) of a row's sequence breakers, as
    llama.cpp's `dry_processed_breakers` multimap holds them (tail = breaker minus its head)."""
    tails: dict[int, tuple[tuple[int, ...], ...]] = {}
    for sequence in breakers:
        tails[sequence[0]] = tails.get(sequence[0], ()) + (sequence[1:],)
    singles = [head for head, ends in tails.items() if () in ends]
    return tails, np.array(list(tails), dtype=np.int64), np.array(singles, dtype=np.int64)


def _restart_limit(window: np.ndarray, tails: dict, heads: np.ndarray) -> int:
    """llama.cpp DRY step 1: the number of tokens after the breaker sequence nearest the end of
    the window (a repeat may not reach back across it); the window length when there is none.

    Scanning back from the end, the first position holding a breaker's head whose whole tail
    follows it decides, with its longest matching tail (llama.cpp's rule, kept as it is)."""
    n = len(window)
    for position in np.flatnonzero(np.isin(window, heads))[::-1].tolist():
        behind = n - 1 - position  # tokens after the head
        longest = -1
        for tail in tails[int(window[position])]:
            if longest < len(tail) <= behind and tuple(
                    window[position + 1:position + 1 + len(tail)].tolist()) == tail:
                longest = len(tail)
        if longest >= 0:
            return behind - longest
    return n


def _repeat_lengths(flat: np.ndarray, last: np.ndarray, first: np.ndarray,
                    limit: np.ndarray) -> np.ndarray:
    """For windows laid end to end in `flat` (window r spans first[r]..last[r]): at each index
    j, how many tokens ending at j equal the tokens ending at its window's last index, counted
    within the window and capped at the window's `limit` (0 at each window's last index).

    This is the Z-function of the reversed window, which llama.cpp computes with the
    Z-algorithm. Here the matches of all windows grow together, one token per round, over the
    indices still matching, so a step costs min(longest match, limit) rounds of NumPy calls.
    """
    sizes = last - first + 1
    window = np.repeat(np.arange(len(sizes)), sizes)
    own_last, own_first, own_limit = last[window], first[window], limit[window]
    lengths = np.zeros(len(flat), dtype=np.int64)
    alive = np.flatnonzero((flat == flat[own_last]) & (np.arange(len(flat)) < own_last)
                           & (own_limit > 0))
    matched = 0
    while alive.size:
        matched += 1
        lengths[alive] = matched
        alive = alive[(own_limit[alive] > matched) & (alive - matched >= own_first[alive])]
        alive = alive[flat[alive - matched] == flat[own_last[alive] - matched]]
    return lengths


class Dry(TokenChangeProcessor):
    """DRY ("Don't Repeat Yourself", p-e-w): penalises tokens that would extend a repeat.

    Let w be the last `last_n` tokens of prompt + output. When the m tokens ending at an earlier
    position j of w equal the last m tokens of w (m as large as possible), emitting w[j+1] would
    make that repeat m + 1 long. With M(t) the largest such m for token t, every t with
    M(t) ≥ `allowed_length` gets l ← l − multiplier · base^(M(t) − allowed_length); the exponent
    is capped at ⌊88.72 / ln base⌋ (for base > 1.000001) so the penalty stays finite. (With
    allowed_length 0, m = 0 counts too: every token of w after the first is penalised, as in
    llama.cpp.) Example: w = [1, 2, 3, 1, 2], allowed_length 2: [1, 2] repeats with 3 after
    it, so token 3 loses multiplier · base^0.

    Sequence breakers interrupt repeats: a repeat never reaches back across the last occurrence
    of a breaker sequence in w, and a single-token breaker is never penalised itself. Breakers
    given as strings (llama.cpp's defaults are "\\n", ":", "\\"", "*") are processed as
    llama.cpp does with the sequence's tokenizer: every token whose text contains the string is
    a single-token breaker, and a token ending with a proper prefix of it starts a sequence
    whose tail is the rest encoded (at most 40 bytes per string, 20 tail ids;
    `sampler_service.text.encode`). Token-id sequences are taken as they are. The default is no
    breakers.

    Peer: llama.cpp `src/llama-sampling.cpp`, `llama_sampler_dry_apply` (ported from
    koboldcpp), with the prompt accepted into the window as llama.cpp's server does.
    `last_n` = -1 means the whole context (llama.cpp: the model's context size). The results
    are llama.cpp's; the repeat lengths are found by growing all matches one token per round
    instead of its Z-algorithm, and lengths past the exponent cap, which change nothing, are not
    computed. Cost per row: O(window), plus one round per token of the longest repeat (at most
    allowed_length + ⌊88.72 / ln base⌋ rounds, shared by the whole batch).

    Ranges are llama.cpp's (`llama_sampler_init_dry` checks none): any `multiplier` (a
    negative one raises the tokens that would extend a repeat, as llama.cpp's subtraction
    does), any `base` (< 1 is off), `last_n` ≥ -1 (its server refuses less).
    `allowed_length` must be ≥ 0: a repeat cannot be shorter than no token.

    Transform. No state of its own: the window is read from the sequence's prompt and output
    ids at each step. Off: `multiplier` = 0, or `base` < 1, or `last_n` = 0 (llama.cpp's
    library rule; its server instead replaces base < 1 with 1.75).
    Sparse rows: exact; a positive multiplier only lowers logits, so the tail's max bound stays
    valid; a negative one lifts it to the penalised bound.
    """

    key = "dry"
    role = "transform"
    params = (
        Param("multiplier", "float", default=0.0, off=0.0,
              doc="penalty scale; 0 is off (llama.cpp suggests 0.8); < 0 raises repeats"),
        Param("base", "float", default=1.75, off=0.0,
              doc="growth of the penalty per token of repeat beyond allowed_length; < 1 is off"),
        Param("allowed_length", "int", default=2, off=None, minimum=0,
              doc="longest repeat left unpenalised"),
        Param("last_n", "int", default=-1, off=0, minimum=-1,
              doc="window: the last n tokens of prompt + output (-1: all of them; 0: off)"),
        Param("breakers", "int_lists", default=(), off=None, text_rule="breakers",
              doc="sequence breakers: strings (llama.cpp's `dry_sequence_breakers`, e.g. "
                  "\"\\n\", \":\", \"\\\"\", \"*\"; need the sequence's tokenizer) or "
                  "token-id sequences"),
    )

    def change(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> TokenChange | None:
        multiplier, base, allowed = args["multiplier"], args["base"], args["allowed_length"]
        active = (multiplier != 0.0) & (base >= 1.0) & (args["last_n"] != 0)
        if not bool(active.any()):
            return None
        # int(FLOAT_MAX_LOG / logf(base)) when base > 1.000001f, else 0 (no cap), in float32.
        steep = base > 1.000001
        max_exponent = torch.where(steep, torch.trunc(_FLOAT_MAX_LOG / torch.log(
            torch.where(steep, base, torch.full_like(base, 2.0)))), torch.zeros_like(base)
        ).to(torch.int64)
        on = active.nonzero().flatten().tolist()
        rows, windows, limits = [], [], []
        breakers: dict[int, tuple[tuple[int, ...], ...]] = {}
        for i, n, a, top, b in zip(on, args["last_n"][on].tolist(), allowed[on].tolist(),
                                   max_exponent[on].tolist(), base[on].tolist()):
            window = np.array(_window(batch.states[i], n), dtype=np.int64)
            if len(window) <= a:
                continue
            breakers[i] = batch.token_sequences(i, "breakers", args["breakers"][i], "dry.breakers")
            tails, heads, _ = _breaker_table(breakers[i])
            limit = _restart_limit(window, tails, heads) if heads.size else len(window)
            if limit < a:
                continue
            # Lengths past allowed + max_exponent (past allowed when base is 1) add nothing.
            flat_from = a + top if top > 0 else (a if b == 1.0 else limit)
            rows.append(i)
            windows.append(window)
            limits.append(min(limit, flat_from))
        if not rows:
            return None
        flat = np.concatenate(windows)
        last = np.cumsum([len(w) for w in windows]) - 1
        first = last - [len(w) - 1 for w in windows]
        lengths = _repeat_lengths(flat, last, first, np.array(limits, dtype=np.int64))
        # Index j extends a repeat with token flat[j + 1] when its length reaches allowed_length.
        row_of = np.repeat(np.array(rows, dtype=np.int64), [len(w) for w in windows])
        extends = lengths >= allowed.cpu().numpy()[row_of]
        extends[last] = False  # nothing follows a window's last token
        extends = np.flatnonzero(extends)
        row_of, tokens, lengths = row_of[extends], flat[extends + 1], lengths[extends]
        singles = [(i, t) for i in rows for t in _breaker_table(breakers[i])[2].tolist()]
        if singles:  # a single-token breaker is never penalised itself
            stride = int(max(flat.max(), max(t for _, t in singles))) + 1
            free = ~np.isin(row_of * stride + tokens, [i * stride + t for i, t in singles])
            row_of, tokens, lengths = row_of[free], tokens[free], lengths[free]
        if not tokens.size:
            return None
        rows, tokens, longest = _distinct(row_of, tokens, lengths, device=batch.device)

        def rule(values, rows, longest):
            # The lengths are capped at allowed + max_exponent already: no exponent clamp here.
            exponent = (longest - allowed[rows]).double()
            # llama.cpp: float penalty = multiplier * std::pow(base, int), a double product.
            penalty = multiplier[rows].double() * torch.pow(base[rows].double(), exponent)
            return values - penalty.float()

        return TokenChange.of(active, rows, tokens, longest, rule,
                              multiplier < 0)  # a penalty is >= 0 unless the multiplier is < 0
