"""Speculative decoding verification: the acceptance rule and the draws it makes.

A plain sequence at position s sends drafts x_0 … x_{k−1} (k ≥ 1), optionally the draft
model's distributions q_j = draft_probs[j] (else q_j is the point mass on x_j: n-gram and
prompt-lookup drafts), and k + 1 logits rows: row j is the target model's logits after the
prompt, the output and x_0 … x_{j−1}. For j = 0, 1, …, with p_j the policy's processed
distribution at position s + j (its chain run on row j with the drafts accepted so far in the
history, exactly as plain decoding would see them; `Selector.distribution`, a point mass on the
argmax for `greedy` and for rows the temperature makes greedy):

- accept x_j iff U_a · q_j(x_j) < p_j(x_j), i.e. with probability min(1, p_j(x_j) / q_j(x_j)),
  where U_a = uniform_noise(seed, s + j, ACCEPT_UNIFORM_TOKEN) (`policy/noise.py`);
- on rejection emit the token drawn from norm(max(0, p_j − q_j)) by inverting its CDF in
  token-id order with U_r = uniform_noise(seed, s + j, ROW_UNIFORM_TOKEN), the coordinate of
  plain sampling's draw (the first i with Σ_{t≤i} w_t > U_r · Σ_t w_t; with q_j a point mass
  this is p_j without x_j, renormalised), and stop;
- when all k drafts are accepted, emit the policy's own token at position s + k from row k
  (`Engine.step`: the bonus token, exactly plain decoding's).

Emission also stops after a token that finishes the sequence (a stop id, EOS, a stop string or
max_tokens). Peer: Leviathan et al. 2023 (Algorithm 1), Chen et al. 2023; vLLM's
`RejectionSampler`. The emitted tokens follow the policy's distribution exactly; with a greedy
policy they are plain greedy decoding's tokens (x_j is accepted iff it is the argmax, lowest id
on ties, and a rejection emits the argmax). Noise is keyed by (seed, position), so a retry and a
restart give the same tokens.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

from sampler_service.policy.noise import seed_to_int64, uniform_noise
from sampler_service.policy.selectors.sample import ROW_UNIFORM_TOKEN
from sampler_service.state import RowOutcome, SequenceState

if TYPE_CHECKING:
    from sampler_service.engine import Engine, ProcessedDistributions

#: The token-id coordinate of the uniform that decides the acceptance of the draft at a
#: position (plain sampling draws with ROW_UNIFORM_TOKEN = −1).
ACCEPT_UNIFORM_TOKEN = -2
#: Selectors whose drafts can be verified (their `distribution` is what `select` draws from).
VERIFIABLE_SELECTORS = ("greedy", "sample")


@dataclass(frozen=True)
class Drafted:
    """One row state to verify: `state` at position s (never changed here), `logits` [k + 1,
    vocab] float32 on the engine's device (the target's logits after each prefix, bonus row
    last), its `drafts` x_0 … x_{k−1} (k ≥ 0: none is one plain step) and `draft_probs`
    [k, vocab] (float32, on the CPU; None: point masses)."""

    state: SequenceState
    logits: torch.Tensor
    drafts: tuple[int, ...]
    draft_probs: torch.Tensor | None = None


def verify(engine: "Engine", rows: Sequence[Drafted],
           processed_logprobs: bool = False) -> list[list[RowOutcome]]:
    """The outcomes each row emits (1 … k + 1, in order) under the rule of the module
    docstring; nothing changes: the caller records them (`SequenceState.record_tokens`) on
    commit. One engine call over every position of every row (`_verify_at_once`) when it
    provably computes what position-by-position verification (`_verify_in_turn`, the
    reference) does; otherwise the latter."""
    at_once = _verify_at_once(engine, rows, processed_logprobs)
    return at_once if at_once is not None else _verify_in_turn(engine, rows, processed_logprobs)


def _verify_in_turn(engine: "Engine", rows: Sequence[Drafted],
                    processed_logprobs: bool) -> list[list[RowOutcome]]:
    """Positions j = 0, 1, … in turn, each one engine call over the rows still verifying, on
    temporary branches holding the drafts accepted so far (ids of their own, so stage memory
    kept by owner is rebuilt for them, never advanced in the row's)."""
    emitted: list[list[RowOutcome]] = [[] for _ in rows]
    current = [row.state for row in rows]
    active = list(range(len(rows)))
    j = 0
    while active:
        states = [current[n] for n in active]
        raw = torch.stack([rows[n].logits[j] for n in active])
        outcomes, probs = engine.step(states, raw, processed_logprobs, distributions=True)
        pairs = [_Pair(i, rows[n], j, states[i].position) for i, n in enumerate(active)
                 if j < len(rows[n].drafts)]
        ok = _accepts(probs, pairs)
        rejected = [pair for pair, kept in zip(pairs, ok) if not kept]
        tokens = dict(zip((pair.i for pair in rejected), _residuals(probs, rejected)))
        accepted = {pair.i for pair, kept in zip(pairs, ok) if kept}
        tokens.update((pair.i, pair.draft) for pair, kept in zip(pairs, ok) if kept)
        normalizers = _normalizers(raw) if pairs else []
        still = []
        for i, n in enumerate(active):
            outcome = _emitted(outcomes[i], tokens.get(i, outcomes[i].token_id), raw[i],
                               normalizers, probs, i)
            emitted[n].append(outcome)
            if i not in accepted:
                continue  # a rejection or the bonus token ends this row's emission
            branch = current[n]
            if branch is rows[n].state:
                branch = branch.branch(f"{branch.sequence_id}\x00draft")
            branch.record_step(outcome, raw.shape[1])
            if not branch.finished:
                current[n] = branch
                still.append(n)
        active = still
        j += 1
    return emitted


def _verify_at_once(engine: "Engine", rows: Sequence[Drafted],
                    processed_logprobs: bool) -> list[list[RowOutcome]] | None:
    """Every position of every row in one engine call, on branches built beforehand as if
    every draft were accepted: position j's state holds x_0 … x_{j−1}, each with its row's
    raw entropy and varentropy (`raw_statistics`), up to the first draft that finishes the
    row. Position j is used only when x_0 … x_{j−1} were all accepted, and then its state is
    the one `_verify_in_turn` builds (record_step of those tokens), provided no stage left
    memory at an earlier position and the engine reports the statistics the branches took:
    both are checked after the call, and None (take the other path) when either fails, or
    at once when a row's stages keep memory already."""
    from sampler_service.policy.statistics import raw_statistics
    if not rows or any(row.state.processor_state for row in rows):
        return None  # stage memory (n-gram index, grammar matcher) is built in turn
    logits = torch.cat([row.logits for row in rows])
    stats = raw_statistics(logits)
    entropies, varentropies = stats.entropy.tolist(), stats.varentropy.tolist()
    normalizers = stats.log_normalizer.tolist()
    lanes: list[list[SequenceState]] = []  # per row: the state of each reachable position
    picks: list[int] = []  # the logits row of each engine row
    at = 0
    for row in rows:
        states = [row.state]
        for j, token in enumerate(row.drafts):
            if states[-1].finished:
                break
            branch = states[-1].branch(f"{row.state.sequence_id}\x00draft{j + 1}")
            branch.vocab_size = row.logits.shape[1]
            branch.accept(token, entropies[at + j], varentropies[at + j])
            states.append(branch)
        if states[-1].finished:
            states.pop()  # the last draft finished the row: nothing is chosen after it
        lanes.append(states)
        picks += range(at, at + len(states))
        at += row.logits.shape[0]
    raw = logits.index_select(0, torch.tensor(picks, device=logits.device))
    outcomes, probs = engine.step([s for states in lanes for s in states], raw,
                                  processed_logprobs, distributions=True)
    starts = list(itertools.accumulate((len(states) for states in lanes), initial=0))
    for states, start in zip(lanes, starts):
        for i in range(start, start + len(states) - 1):  # positions a later one was built on
            outcome, p = outcomes[i], picks[i]
            if outcome.memory or (outcome.entropy, outcome.varentropy) != (entropies[p],
                                                                           varentropies[p]):
                return None
    pairs = [_Pair(start + j, row, j, state.position)
             for row, states, start in zip(rows, lanes, starts)
             for j, state in enumerate(states[:len(row.drafts)])]
    ok = dict(zip((pair.i for pair in pairs), _accepts(probs, pairs)))
    first_rejected = []  # per row, its first rejected draft (the later ones are never reached)
    for row, states, start in zip(rows, lanes, starts):
        for j in range(min(len(states), len(row.drafts))):
            if not ok[start + j]:
                first_rejected.append(_Pair(start + j, row, j, states[j].position))
                break
    drawn = dict(zip((pair.i for pair in first_rejected), _residuals(probs, first_rejected)))
    picked = [normalizers[p] for p in picks]
    emitted: list[list[RowOutcome]] = []
    for row, states, start in zip(rows, lanes, starts):
        out = []  # ends at a rejection, the bonus token, or an accepted draft that finished
        for j, i in enumerate(range(start, start + len(states))):
            kept = ok.get(i, False)
            token = row.drafts[j] if kept else drawn.get(i, outcomes[i].token_id)
            out.append(_emitted(outcomes[i], token, raw[i], picked, probs, i))
            if not kept:
                break
        emitted.append(out)
    return emitted


@dataclass(frozen=True)
class _Pair:
    """A draft to decide: engine row `i` holds position `position` of `row`, whose draft `j`
    it judges."""

    i: int
    row: Drafted
    j: int
    position: int

    @property
    def draft(self) -> int:
        return self.row.drafts[self.j]


def _accepts(probs: "ProcessedDistributions", pairs: Sequence[_Pair]) -> list[bool]:
    """Whether each pair's draft x is accepted: U_a · q(x) < p(x), with p the processed
    distribution of its engine row."""
    if not pairs:
        return []
    p_x = probs.log_at([pair.i for pair in pairs], [pair.draft for pair in pairs]).exp()
    q_x = torch.tensor([1.0 if pair.row.draft_probs is None else
                        float(pair.row.draft_probs[pair.j, pair.draft]) for pair in pairs],
                       dtype=torch.float64)
    u = uniforms([pair.row.state.seed for pair in pairs], [pair.position for pair in pairs],
                 ACCEPT_UNIFORM_TOKEN)
    return accept(p_x, q_x, u).tolist()


def _residuals(probs: "ProcessedDistributions", pairs: Sequence[_Pair]) -> list[int]:
    """The token each rejected pair emits: its draw from norm(max(0, p − q))."""
    if not pairs:
        return []
    p = probs.dense([pair.i for pair in pairs])
    q = torch.zeros_like(p)
    for r, pair in enumerate(pairs):
        if pair.row.draft_probs is None:
            q[r, pair.draft] = 1.0
        else:
            q[r] = pair.row.draft_probs[pair.j].double()
    u = uniforms([pair.row.state.seed for pair in pairs], [pair.position for pair in pairs],
                 ROW_UNIFORM_TOKEN)
    return residual_draw(p, q, u).tolist()


def _normalizers(raw: torch.Tensor) -> list[float]:
    """log Σ exp of each row, as the engine reports it (`raw_statistics`)."""
    from sampler_service.policy.statistics import raw_statistics
    return raw_statistics(raw).log_normalizer.tolist()


def _emitted(outcome: RowOutcome, token: int, raw: torch.Tensor, normalizers: Sequence[float],
             probs: "ProcessedDistributions", i: int) -> RowOutcome:
    """Engine row i's outcome emitting `token` (an accepted draft or the residual's draw)
    instead of the policy's own choice: its raw logprob (the engine's formula: logit − log Σ
    exp) and processed logprob are the token's. `raw` [vocab]: the row's logits."""
    if token == outcome.token_id:
        return outcome
    return replace(outcome, token_id=token, logprob=float(raw[token]) - normalizers[i],
                   processed_logprob=None if outcome.processed_logprob is None
                   else float(probs.log_at([i], [token])[0]))


def uniforms(seeds: list[int], positions: list[int], coordinate: int) -> torch.Tensor:
    """float64 [R]: the counter-based uniform of each (seed, position) at `coordinate`."""
    s = torch.tensor([seed_to_int64(x) for x in seeds], dtype=torch.int64)
    p = torch.tensor(positions, dtype=torch.int64)
    return uniform_noise(s, p, torch.full((len(seeds), 1), coordinate, dtype=torch.int64))[:, 0]


def accept(p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """bool [R]: U · q(x) < p(x), the draft kept with probability min(1, p(x) / q(x))."""
    return u * q_draft.double() < p_draft.double()


def residual_draw(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [R]: a token from norm(max(0, p − q)) per row, p and q [R, V], by the inverse CDF
    in token-id order with the uniforms u [R] (float64 sums). A row whose residual has no mass
    (p ≤ q everywhere, which a rejection makes impossible in exact arithmetic) draws from p."""
    w = (p.double() - q.double()).clamp_(min=0)
    empty = w.sum(dim=1) <= 0
    if bool(empty.any()):
        w[empty] = p.double()[empty]
    cumulative = w.cumsum(dim=1)
    total = cumulative[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp_(max=p.shape[1] - 1)


def residual_draw_reference(p: list[float], q: list[float], u: float) -> int:
    """`residual_draw` of one row in plain Python: the straightforward reference."""
    w = [max(0.0, a - b) for a, b in zip(p, q)]
    if sum(w) <= 0:
        w = list(p)
    total, running = sum(w), 0.0
    for token, weight in enumerate(w):
        running += weight
        if running > u * total:
            return token
    return max(i for i, weight in enumerate(w) if weight > 0)


def verify_reference(ps: list[list[float]], qs: list[list[float]], drafts: list[int],
                     accept_us: list[float], residual_us: list[float],
                     bonus: int) -> list[int]:
    """The emitted tokens of one verification given every position's processed distribution
    `ps` [k + 1] (the last for the bonus, whose token `bonus` plain decoding chose), the draft
    distributions `qs` [k], and the uniforms of each position: the rule of the module
    docstring, written as plainly as possible (finishes aside)."""
    out = []
    for j, x in enumerate(drafts):
        if accept_us[j] * qs[j][x] < ps[j][x]:
            out.append(x)
            continue
        out.append(residual_draw_reference(ps[j], qs[j], residual_us[j]))
        return out
    return out + [bonus]
