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

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

from sampler_service.policy.noise import seed_to_int64, uniform_noise
from sampler_service.policy.selectors.sample import ROW_UNIFORM_TOKEN
from sampler_service.state import RowOutcome, SequenceState

if TYPE_CHECKING:
    from sampler_service.engine import Engine

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
    docstring. Positions j = 0, 1, … run in turn, each one engine call over the rows still
    verifying, on temporary branches holding the drafts accepted so far (ids of their own, so
    stage memory kept by owner is rebuilt for them, never advanced in the row's); nothing
    changes: the caller records the outcomes (`SequenceState.record_tokens`) on commit."""
    emitted: list[list[RowOutcome]] = [[] for _ in rows]
    current = [row.state for row in rows]
    active = list(range(len(rows)))
    j = 0
    while active:
        states = [current[n] for n in active]
        raw = torch.stack([rows[n].logits[j] for n in active])
        outcomes, probs = engine.step(states, raw, processed_logprobs, distributions=True)
        drafting = [i for i, n in enumerate(active) if j < len(rows[n].drafts)]
        kept: dict[int, int] = {}  # index in `active` -> the token emitted (accepted or drawn)
        accepted: set[int] = set()
        if drafting:
            p = probs.index_select(0, torch.tensor(drafting, device=probs.device)).double().cpu()
            q = torch.zeros_like(p)
            xs = [rows[active[i]].drafts[j] for i in drafting]
            for r, i in enumerate(drafting):
                draft_probs = rows[active[i]].draft_probs
                if draft_probs is None:
                    q[r, xs[r]] = 1.0
                else:
                    q[r] = draft_probs[j].double()
            seeds = [states[i].seed for i in drafting]
            positions = [states[i].position for i in drafting]
            at = torch.arange(len(xs)), torch.tensor(xs)
            ok = accept(p[at], q[at], uniforms(seeds, positions, ACCEPT_UNIFORM_TOKEN)).tolist()
            drawn = residual_draw(p, q, uniforms(seeds, positions, ROW_UNIFORM_TOKEN)).tolist()
            for r, i in enumerate(drafting):
                kept[i] = xs[r] if ok[r] else drawn[r]
            accepted = {i for r, i in enumerate(drafting) if ok[r]}
        log_raw = torch.log_softmax(raw, dim=1) if kept else None
        still = []
        for i, n in enumerate(active):
            outcome = outcomes[i]
            if i in kept and kept[i] != outcome.token_id:
                token = kept[i]
                outcome = replace(outcome, token_id=token, logprob=float(log_raw[i, token]),
                                  processed_logprob=None if outcome.processed_logprob is None
                                  else float(torch.log(probs[i, token])))
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
