"""entropix: a selector that picks its sampling rule from the entropy and varentropy of the
step's raw distribution (xjdr's entropix sampler)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.noise import uniform_noise
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import RowBatch, Selector
from sampler_service.policy.processors.temperature import GREEDY_TEMPERATURE, Temperature
from sampler_service.policy.processors.truncation import MinP, TopK, TopP
from sampler_service.policy.selectors.sample import ROW_UNIFORM_TOKEN, token_id_order
from sampler_service.policy.sparse import TailBound, fmt

LN2 = math.log(2.0)

#: Quadrant names, in the order the rules are tried (the codes are the indices).
QUADRANTS = ("flowing", "treading", "exploring", "resampling", "adaptive")
FLOWING, TREADING, EXPLORING, RESAMPLING, ADAPTIVE = range(len(QUADRANTS))
#: What a row did: the names are its explanation's `action`.
ACTIONS = ("argmax", "clarify", "sample", "best_of_n")
ARGMAX, CLARIFY, SAMPLE, BEST_OF_N = range(len(ACTIONS))

#: The threshold parameters (bits), in the order of the `PRESETS` rows.
THRESHOLDS = ("low_entropy", "low_varentropy", "helv_entropy", "lehv_entropy", "hehv_entropy",
              "high_varentropy")
#: Threshold sets by preset name (`custom` takes the threshold parameters).
#: first: the hard-coded rules of the first published `sample` (H < 0.1 ∧ V < 0.1; H > 3 ∧
#: V < 0.1; H < 5 ∧ V > 5; H > 5 ∧ V > 5).
#: later: the logit thresholds of the later SamplerConfig (low / medium / high entropy 0.01 /
#: 0.7 / 2.1, low / high varentropy 0.05 / 5.8), used as it uses them: treading on high
#: entropy, exploring below high entropy, resampling above medium entropy.
PRESETS = {"first": (0.1, 0.1, 3.0, 5.0, 5.0, 5.0),
           "later": (0.01, 0.05, 2.1, 2.1, 0.7, 5.8)}


@dataclass
class _Plan:
    """One step's decisions for a batch's rows (all [R] tensors on the batch's device)."""

    quadrant: torch.Tensor      # int64 codes into QUADRANTS
    action: torch.Tensor        # int64 codes into ACTIONS
    samples: torch.Tensor       # int64: draws per row (0 for argmax and clarify rows)
    temperature: torch.Tensor   # float32, the adjusted values (used by drawn rows only)
    top_k: torch.Tensor         # int64
    top_p: torch.Tensor         # float32
    min_p: torch.Tensor         # float32
    clarifying: torch.Tensor    # int64, the clarifying token id of each row

    @property
    def drawn(self) -> torch.Tensor:
        return self.samples > 0


class Entropix(Selector):
    """entropix (xjdr 2024): classifies each step by the entropy H and varentropy V of the
    row's raw distribution and picks a sampling rule for that quadrant.

    H and V are in bits, as entropix measures them: H = −Σ p log₂ p, V = Σ p (log₂ p + H)²,
    p = softmax of the step's raw logits (before the chain). They come from the engine's
    statistics in nats: H_bits = H_nats / ln 2, V_bits = V_nats / (ln 2)². The attention terms
    ae, av, ag, is are the worker's per-row signals `attention_entropy`,
    `attention_varentropy`, `agreement` and `interaction_strength`; a worker that sends none
    gives 0, and the rules then use the logits alone. T₀, p₀, k₀, m₀ are the parameters
    `temperature`, `top_p`, `top_k`, `min_p`; a rule keeps the base value of each parameter it
    does not adjust. The first rule that matches decides:

    1. flowing, H < low_entropy ∧ V < low_varentropy: the argmax (ties to the lowest id).
    2. treading, H > helv_entropy ∧ V < low_varentropy: emits `clarifying_token_id` unless the
       row's last output token is that id (or the id is −1); then it samples hotter:
       T = min(1.5, T₀·(1.3 + 0.2·ae)).
    3. exploring, H < lehv_entropy ∧ V > high_varentropy: T = min(1.5, T₀·(1.2 + 0.3·is)),
       k = max(5, ⌊k₀·(1 + 0.5·(1 − ag))⌋).
    4. resampling, H > hehv_entropy ∧ V > high_varentropy: T = max(2, T₀·(2 + 0.5·av)),
       top_p = max(0.5, p₀ − 0.2·ae).
    5. adaptive, otherwise: with U = H + V, T = T₀·(1 + 0.3·U + 0.2·(ae + av) − 0.2·ag),
       top_p = clip(p₀·(1 + 0.1·av), 0.1, 1), k = clip(round(k₀·(1 + 0.3·is − 0.2·ag)), 1, 100),
       min_p = clip(m₀·(1 − 0.5·U), 0.01, 0.5); draws `n_adaptive_samples` tokens and keeps the
       one with the highest raw log p (the first drawn among equals). entropix adds a
       confidence score to each, but it is the same for every sample, so log p decides.

    A drawn row takes the candidates the chain produced, divides by T and keeps min_p, then
    top_k, then top_p (entropix's order; the `temperature`, `min_p`, `top_k` and `top_p`
    processors with per-row values, on a copy; top-k runs first, which gives the same set as
    it commutes with the other two), and inverts the CDF as the `sample` selector
    does: tokens in id order, U the counter-based uniform of (seed, position) at token
    coordinate −1 − i for draw i (draw 0 is the `sample` selector's uniform), so a seed gives
    the same tokens in any batch. Rows a chain temperature marked greedy, and rows whose
    adjusted T is below 1e-5, take the argmax. `distribution` is what the token was drawn
    from: a point mass for argmax and clarify rows; q, the adjusted truncated softmax, for
    sampled rows; for best-of-n rows the law of the kept draw, P(t) = (F(t)ⁿ − F⁻(t)ⁿ)·q_t/Q(t),
    F (F⁻) the q-mass of tokens whose raw logit is ≤ (<) that of t and Q = F − F⁻ (equal raw
    logits share by q, as the first-drawn rule does).

    Thresholds: `preset` first (default) or later, or custom to use the six threshold
    parameters (bits). Peer: xjdr-alt/entropix `sample`: the first published sampler, with
    its constants written into the rules (entropix/torch_sampler.py at 09c5e47f, the PyTorch
    port of the JAX entropix/sampler.py), for the rules and base values, and the later
    SamplerConfig (entropix/sampler.py at 1079968b, torch_sampler.py at 4afc9917) for the
    `later` thresholds. Deliberate differences:
    each row is classified on its own (entropix averages the metrics over its batch); min_p is
    applied (entropix writes its min-p mask to a tensor its top-k never reads); top-p is the
    standard nucleus (Hugging Face / vLLM) over the top-k survivors (entropix's, summed over an
    ascending sort, removes the most likely tokens when it removes any); the later versions'
    extra attention thresholds on each rule and their changed adaptive formulas are not
    taken; the adaptive rule's min-p base is `min_p` (the first version's adaptive_sample was
    called without it and used its own 0.03; set min_p: 0.03 for that). The clarifying token
    is emitted even where the chain masked it.

    Selects. Keeps no per-sequence state (the treading rule reads the last output token).
    A selector has no off value: choose `sample` to sample without the quadrant rules.
    Sparse rows: H and V are exact; argmax rows need their best candidate above the tail's max
    bound, a clarifying token must be sent (its raw logprob is reported), and drawn rows need
    their adjusted top-k to exclude the tail (k ≤ K, the k-th best candidate above the bound).
    """

    key = "entropix"
    decisions = {"quadrant": QUADRANTS, "action": ACTIONS}
    params = (
        Param("temperature", "float", default=0.666, off=None, minimum=0.0, maximum=100.0,
              doc="T₀, the base temperature the rules adjust (the rules may triple it)"),
        Param("top_p", "float", default=0.9, off=None, minimum=0.0, maximum=1.0,
              exclusive_minimum=True, doc="p₀, the base nucleus mass"),
        Param("top_k", "int", default=27, off=None, minimum=1,
              doc="k₀, the base number of best tokens kept"),
        Param("min_p", "float", default=0.0, off=None, minimum=0.0, maximum=1.0,
              doc="m₀, the base min-p (entropix: 0.0 first, 0.03 later); the adaptive rule "
                  "clips its value to [0.01, 0.5]"),
        Param("clarifying_token_id", "int", default=-1, off=None, minimum=-1,
              doc="token emitted on entering the treading quadrant (entropix used 2564); "
                  "-1 never emits one (the quadrant samples hotter)"),
        Param("n_adaptive_samples", "int", default=5, off=None, minimum=1, maximum=64,
              doc="draws of the adaptive rule; the one with the highest raw log p is kept"),
        Param("preset", "choice", default="first", off=None, choices=("first", "later", "custom"),
              doc="threshold set: first published, later SamplerConfig, or the six below"),
        Param("low_entropy", "float", default=0.1, off=None, minimum=0.0,
              doc="bits; custom preset: flowing needs H below it"),
        Param("low_varentropy", "float", default=0.1, off=None, minimum=0.0,
              doc="bits; custom preset: flowing and treading need V below it"),
        Param("helv_entropy", "float", default=3.0, off=None, minimum=0.0,
              doc="bits; custom preset: treading needs H above it"),
        Param("lehv_entropy", "float", default=5.0, off=None, minimum=0.0,
              doc="bits; custom preset: exploring needs H below it"),
        Param("hehv_entropy", "float", default=5.0, off=None, minimum=0.0,
              doc="bits; custom preset: resampling needs H above it"),
        Param("high_varentropy", "float", default=5.0, off=None, minimum=0.0,
              doc="bits; custom preset: exploring and resampling need V above it"),
    )

    def select(self, candidates: Candidates, args: dict, batch: RowBatch) -> torch.Tensor:
        plan = self._plan(candidates, args, batch)
        tokens = self._point_tokens(candidates, plan)
        if not bool(plan.drawn.any()):
            return tokens
        values, ids = token_id_order(self._truncated(candidates, plan, batch))
        columns = draw_columns(values, batch, int(plan.samples.max()))
        drawn = columns if ids is None else ids.gather(1, columns)
        if drawn.shape[1] > 1:  # best of n: the highest raw logit (= raw log p), first on ties
            score = batch.inputs.raw_at(drawn)  # type: ignore[union-attr]
            counted = torch.arange(drawn.shape[1], device=drawn.device) < plan.samples.unsqueeze(1)
            score = score.masked_fill(~counted, -math.inf)
            drawn = drawn.gather(1, score.argmax(dim=1, keepdim=True))
        return torch.where(plan.drawn, drawn[:, 0], tokens)

    def distribution(self, candidates: Candidates, args: dict, batch: RowBatch) -> Candidates:
        """A point mass for argmax and clarify rows, q for sampled rows and the law of the kept
        draw for best-of-n rows (see the class docstring); log-probabilities."""
        plan = self._plan(candidates, args, batch)
        truncated = self._truncated(candidates, plan, batch)
        dist = truncated.log_softmax()
        if dist.ids is not None:
            dist.ids = dist.ids.clone()  # `force` below may write ids; they are shared
        several = (plan.samples > 1).nonzero().squeeze(1)
        if several.numel():
            rows_q = dist.values.index_select(0, several)
            ids = dist.token_ids().index_select(0, several)
            raw = batch.inputs.raw_at(ids, several)  # type: ignore[union-attr]
            law = best_of_n_log_probs(rows_q, raw, plan.samples.index_select(0, several))
            dist.values = dist.values.index_copy(0, several, law)
        points = (~plan.drawn).nonzero().squeeze(1)
        if points.numel():
            dist.force(points, self._point_tokens(candidates, plan).index_select(0, points))
        return dist

    def sparse_tail(self, candidates: Candidates, args: dict, batch: RowBatch,
                    tail: TailBound) -> bool:
        """Once a drawn row's top-k excluded the tail, its draws and their raw scores are over
        sent tokens only; an argmax row needs no tail token to reach its best candidate."""
        plan = self._plan(candidates, args, batch)
        tail.refuse_unless_best_above(candidates.max_values(), plan.action == ARGMAX, self.key)
        rows = torch.arange(batch.rows, device=batch.device)
        sent, _ = tail.sparse.find(rows, plan.clarifying.clamp(min=0))
        tail.refuse((plan.action == CLARIFY) & ~sent, lambda r: (
            f"entropix: the clarifying token {int(plan.clarifying[r])} is not among the K sent "
            "entries (its raw logprob is reported)"), structural=False)
        width = candidates.values.shape[1]
        k = plan.top_k
        kth = candidates.best_first(width)[0].gather(
            1, (k.clamp(min=1, max=width) - 1).unsqueeze(1)).squeeze(1)
        fits = k <= width
        tail.refuse(tail.live(plan.drawn) & ~(fits & (kth > tail.max)), lambda r: (
            f"entropix: its {QUADRANTS[int(plan.quadrant[r])]} rule's top-k {int(k[r])} does not "
            f"exclude the tail (K = {width}, k-th best {fmt(kth[r])}, tail max bound "
            f"{fmt(tail.max[r])})"), structural=False)
        return True

    # -- the plan -------------------------------------------------------------------------------
    @staticmethod
    def _thresholds(args: dict, batch: RowBatch) -> torch.Tensor:
        """[R, 6] thresholds (bits) of each row, in `THRESHOLDS` order."""
        custom = torch.stack([args[name].to(torch.float32) for name in THRESHOLDS], dim=1)
        presets = args["preset"]
        if all(p == "custom" for p in presets):
            return custom
        table = torch.tensor([PRESETS.get(p, PRESETS["first"]) for p in presets],
                             dtype=torch.float32, device=batch.device)
        is_custom = torch.tensor([p == "custom" for p in presets], device=batch.device)
        return torch.where(is_custom.unsqueeze(1), custom, table)

    def _plan(self, candidates: Candidates, args: dict, batch: RowBatch) -> _Plan:
        """Every row's quadrant, action and adjusted parameters; explains them."""
        stats = batch.raw_statistics()
        entropy = stats.entropy / LN2
        varentropy = stats.varentropy / (LN2 * LN2)
        attn_ent, attn_vent, agreement, interaction = (
            batch.signal(name).to(torch.float32) for name in
            ("attention_entropy", "attention_varentropy", "agreement", "interaction_strength"))
        low_h, low_v, helv_h, lehv_h, hehv_h, high_v = self._thresholds(args, batch).unbind(1)

        flowing = (entropy < low_h) & (varentropy < low_v)
        treading = ~flowing & (entropy > helv_h) & (varentropy < low_v)
        exploring = ~flowing & ~treading & (entropy < lehv_h) & (varentropy > high_v)
        resampling = (~flowing & ~treading & ~exploring & (entropy > hehv_h)
                      & (varentropy > high_v))
        adaptive = ~(flowing | treading | exploring | resampling)
        quadrant = torch.full_like(args["top_k"], ADAPTIVE)
        for code, mask in ((FLOWING, flowing), (TREADING, treading), (EXPLORING, exploring),
                           (RESAMPLING, resampling)):
            quadrant = quadrant.masked_fill(mask, code)

        t0, p0, m0 = args["temperature"], args["top_p"], args["min_p"]
        k0 = args["top_k"].to(torch.float32)
        uncertainty = entropy + varentropy
        temperature = torch.where(treading, (t0 * (1.3 + 0.2 * attn_ent)).clamp(max=1.5), t0)
        temperature = torch.where(exploring, (t0 * (1.2 + 0.3 * interaction)).clamp(max=1.5),
                                  temperature)
        temperature = torch.where(resampling, (t0 * (2.0 + 0.5 * attn_vent)).clamp(min=2.0),
                                  temperature)
        adaptive_t = t0 * (1 + 0.3 * uncertainty + 0.2 * (attn_ent + attn_vent) - 0.2 * agreement)
        temperature = torch.where(adaptive, adaptive_t, temperature)
        top_p = torch.where(resampling, (p0 - 0.2 * attn_ent).clamp(min=0.5), p0)
        top_p = torch.where(adaptive, (p0 * (1 + 0.1 * attn_vent)).clamp(0.1, 1.0), top_p)
        top_k = torch.where(exploring, torch.trunc(k0 * (1 + 0.5 * (1 - agreement))).clamp(min=5),
                            k0)
        top_k = torch.where(adaptive, torch.round(k0 * (1 + 0.3 * interaction - 0.2 * agreement))
                            .clamp(1, 100), top_k).to(torch.int64)
        min_p = torch.where(adaptive, (m0 * (1 - 0.5 * uncertainty)).clamp(0.01, 0.5), m0)

        clarifying = args["clarifying_token_id"]
        last = torch.tensor([s.output_ids[-1] if s.output_ids else -1 for s in batch.states],
                            dtype=torch.int64, device=batch.device)
        clarify = treading & (clarifying >= 0) & (last != clarifying) & ~batch.greedy
        argmax = (batch.greedy | flowing | (temperature < GREEDY_TEMPERATURE)) & ~clarify
        action = torch.full_like(quadrant, SAMPLE)
        action = action.masked_fill(adaptive, BEST_OF_N).masked_fill(argmax, ARGMAX)
        action = action.masked_fill(clarify, CLARIFY)
        samples = torch.where(action == BEST_OF_N, args["n_adaptive_samples"],
                              (action == SAMPLE).to(torch.int64))
        largest = int(clarifying.max())
        if largest >= candidates.vocab:  # checked on every step, not only when it is emitted
            raise InvalidArgument(f"{self.key} refers to token id {largest} but the vocabulary "
                                  f"has {candidates.vocab} ids", "logits.shape")
        plan = _Plan(quadrant, action, samples, temperature, top_k, top_p, min_p, clarifying)
        self._explain(plan, entropy, varentropy, batch)
        return plan

    def _explain(self, plan: _Plan, entropy: torch.Tensor, varentropy: torch.Tensor,
                 batch: RowBatch) -> None:
        drawn = plan.drawn.tolist()

        def when_drawn(values: torch.Tensor) -> list:
            return [v if d else None for v, d in zip(values.tolist(), drawn)]

        batch.explain(self.key, quadrant=[QUADRANTS[q] for q in plan.quadrant.tolist()],
                      action=[ACTIONS[a] for a in plan.action.tolist()],
                      temperature=when_drawn(plan.temperature), top_k=when_drawn(plan.top_k),
                      top_p=when_drawn(plan.top_p), min_p=when_drawn(plan.min_p),
                      entropy_bits=entropy, varentropy_bits=varentropy)

    # -- tokens ---------------------------------------------------------------------------------
    @staticmethod
    def _point_tokens(candidates: Candidates, plan: _Plan) -> torch.Tensor:
        """[R] the argmax of argmax rows, the clarifying id of clarify rows (others: filled
        by the caller)."""
        argmax = plan.action == ARGMAX
        tokens = candidates.argmax() if bool(argmax.any()) else torch.zeros_like(plan.clarifying)
        return torch.where(plan.action == CLARIFY, plan.clarifying, tokens)

    @staticmethod
    def _truncated(candidates: Candidates, plan: _Plan, batch: RowBatch) -> Candidates:
        """A copy of the candidates (a sparse batch's as its log-softmax, which keeps its
        order and distribution) with each drawn row's T, min_p, top_k and top_p applied.

        Top-k runs first: it keeps the values above a per-row threshold that neither dividing
        by T > 0 nor min-p moves (min-p's bound is relative to the best value, which top-k
        keeps), so the result is that of entropix's order (T, min_p, top_k, top_p) while T and
        min-p touch only the survivors. Rows not drawn get k = 1, T = 1, min_p = 0 and
        top_p = 1 (their copy is never used; a bound on every row lets the batch turn sparse).
        """
        drawn = plan.drawn
        copy = Candidates(candidates.values.clone()) if candidates.dense else \
            candidates.log_softmax()
        one = torch.ones_like(plan.temperature)
        TopK().apply(copy, {"k": torch.where(drawn, plan.top_k, torch.ones_like(plan.top_k))},
                     batch)
        Temperature().apply(copy, {"temperature": torch.where(drawn, plan.temperature, one)}, batch)
        MinP().apply(copy, {"p": torch.where(drawn, plan.min_p, torch.zeros_like(one))}, batch)
        TopP().apply(copy, {"p": torch.where(drawn, plan.top_p, one)}, batch)
        return copy


def draw_columns(values: torch.Tensor, batch: RowBatch, draws: int) -> torch.Tensor:
    """[R, draws] columns drawn from softmax(values), `values` [R, C] in token-id order.

    The `sample` selector's inverse-CDF draw (`draw_inverse_cdf`) with one uniform per draw:
    draw i uses the counter-based uniform of (seed, position) at token coordinate
    `ROW_UNIFORM_TOKEN` − i, so draw 0 is exactly the `sample` selector's and the draws are
    independent streams; the cumulative sum is shared.
    """
    best = values.amax(dim=1, keepdim=True)
    cumulative = values.clone().sub_(best).exp_().cumsum(dim=1)
    total = cumulative[:, -1:]
    coordinates = ROW_UNIFORM_TOKEN - torch.arange(draws, device=values.device)
    u = uniform_noise(batch.seeds, batch.positions, coordinates.expand(values.shape[0], draws))
    target = torch.minimum((u * total).to(cumulative.dtype),
                           torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target.contiguous(), right=True)


def best_of_n_log_probs(log_q: torch.Tensor, raw: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """log P of the kept token when n tokens are drawn from q and the one with the highest raw
    logit is kept (the first drawn among equals).

    `log_q` [A, C] log q (−inf outside the support), `raw` [A, C] the raw logits of the same
    columns, `n` [A] draws. With F(t) (F⁻(t)) the q-mass of tokens whose raw logit is ≤ (<)
    that of t and Q = F − F⁻: P(t) = (F(t)ⁿ − F⁻(t)ⁿ)·q_t/Q(t), in log space as
    n·log F + log(1 − (F⁻/F)ⁿ) + log q_t − log Q. Only the support is sorted (by raw logit).
    """
    width = int(torch.isfinite(log_q).sum(dim=1).max())
    top_q, columns = torch.topk(log_q, width, dim=1)
    q = torch.exp(top_q.double())
    in_support = q > 0
    r, order = torch.sort(raw.gather(1, columns).double(), dim=1)
    q = torch.where(in_support, q, torch.zeros_like(q)).gather(1, order)
    cumulative = q.cumsum(dim=1)
    last = torch.searchsorted(r, r, right=True) - 1     # last column of each raw-logit tie
    first = torch.searchsorted(r, r, right=False) - 1   # the column before it
    mass = cumulative.gather(1, last)
    below = torch.where(first >= 0, cumulative.gather(1, first.clamp(min=0)),
                        torch.zeros_like(mass))
    draws = n.to(torch.float64).unsqueeze(1)
    log_mass = torch.log(mass)
    log_p = (draws * log_mass + torch.log1p(-torch.exp(draws * (torch.log(below) - log_mass)))
             + torch.log(q) - torch.log(mass - below))
    sorted_support = in_support.gather(1, order)
    log_p = torch.where(sorted_support, log_p, torch.full_like(log_p, -math.inf))
    out = torch.full_like(log_q, -math.inf)
    return out.scatter(1, columns.gather(1, order), log_p.to(log_q.dtype))
