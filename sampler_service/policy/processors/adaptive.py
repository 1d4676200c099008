"""Adaptive processors: temperatures that follow the model's uncertainty step by step
(llama.cpp's dynamic temperature, EDT, Hot-or-Cold / AdapT, KL-guided temperature) and SED's
chaotic-point monitor.

Each stage reports its decision for every row it acts on through `RowBatch.explain` (the
temperature used, the entropy it read, whether a step was challenging or chaotic); a row whose
parameters are off is left bit-identical and reports nothing. Which distribution a stage reads
is stated in its docstring:
- "the candidates": the softmax of the row at this point of the chain (after the stages before
  it, over the tokens they left finite; the same on a dense and a sparse batch up to float32
  rounding of the sums). As the first stage of a chain that is the raw distribution.
- "raw": the untouched logits the worker sent (`RowBatch.raw_statistics`, `RowInputs.raw`),
  wherever the stage stands in the chain.

Every dynamic temperature treats a computed T < 1e-5 (0 included) as the `temperature`
processor does: the row is marked greedy (the selector takes its argmax, ties to the lowest id)
and its logits are left as they are. A temperature of exactly 1 leaves the row's values as they
are too. None of these stages keeps per-sequence state.

On sparse rows the raw entropy is exact (from the tail statistics), and so are the raw top two
logits; the candidates' entropy is the whole row's only once the tail is excluded. A stage
whose temperature is known scales the tail's bounds (`TailBound.scale`).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch, row_pairs
from sampler_service.policy.processors.temperature import GREEDY_TEMPERATURE
from sampler_service.policy.sparse import TailBound
from sampler_service.policy.statistics import STATISTICS_BLOCK_ELEMENTS


def _apply_temperature(candidates: Candidates, temperature: torch.Tensor, active: torch.Tensor,
                       batch: RowBatch) -> None:
    """l' = l / T in the `active` rows; T < 1e-5 marks the row greedy instead (logits left as
    they are); T = 1 divides nothing. T > 0 keeps a sparse batch's order."""
    greedy = active & (temperature < GREEDY_TEMPERATURE)
    batch.greedy |= greedy
    scaled = _scaled(temperature, active)
    if bool(scaled.any()):
        divisor = torch.where(scaled, temperature, torch.ones_like(temperature))
        candidates.divide(divisor)


def _scaled(temperature: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """[R] bool: the `active` rows whose logits `_apply_temperature` divides."""
    return active & ~(temperature < GREEDY_TEMPERATURE) & (temperature != 1.0)


def _candidate_entropy(candidates: Candidates, count: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H, N): the entropy (nats, clamped at 0 against rounding) of each row's softmax at this
    point of the chain and, when `count`, its number of finite candidates [R] (int32).

    With z = l − max l and w = e^z: H = log Σ w − Σ w z / Σ w, over cache-sized row blocks as
    `raw_statistics` computes it (without the varentropy). H is NaN for a row without any
    finite candidate (N = 0)."""
    values = candidates.values
    block = max(1, STATISTICS_BLOCK_ELEMENTS // values.shape[1])
    entropies, counts = [], []
    for start in range(0, values.shape[0], block):
        part = values[start:start + block]
        shifted = part - part.amax(dim=1, keepdim=True)
        weights = torch.exp(shifted)
        total = weights.sum(dim=1)
        weighted = weights.mul_(shifted.nan_to_num_(neginf=0.0)).sum(dim=1)  # w = 0 there
        entropies.append(torch.log(total) - weighted / total)
        if count:
            counts.append((part > -math.inf).sum(dim=1, dtype=torch.int32))
    return torch.cat(entropies).clamp(min=0.0), torch.cat(counts) if count else None


def _kl_divergence(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[R] KL(softmax(logits) ‖ softmax(reference)) in nats, in cache-sized row blocks as
    `raw_statistics` works, so the temporaries stay small and in cache. Terms with p = 0
    count 0; p > 0 where p_ref = 0 gives +inf. Both sides go through the same op, so
    reference = logits gives exactly 0."""
    block = max(1, STATISTICS_BLOCK_ELEMENTS // logits.shape[1])
    parts = []
    for start in range(0, logits.shape[0], block):
        log_p = torch.log_softmax(logits[start:start + block], dim=1)
        log_q = torch.log_softmax(reference[start:start + block].to(log_p.dtype), dim=1)
        p = torch.exp(log_p)
        terms = p.mul_(log_p.sub_(log_q))
        # p = 0 makes 0 · (−inf) or 0 · NaN: those terms are 0; +inf (p_ref = 0 < p) stays.
        parts.append(terms.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=1))
    return torch.cat(parts).clamp(min=0.0)


def _reported(values: torch.Tensor, shown: torch.Tensor) -> list[Any]:
    """A per-row explanation field: each row's value where `shown`, None elsewhere."""
    return [v if s else None for v, s in zip(values.tolist(), shown.tolist())]


class TempExt(Processor):
    """llama.cpp's dynamic temperature ("dynatemp"): a temperature in [T0 − Δ, T0 + Δ] that
    grows with the normalised entropy of the candidates.

    With Δ > 0: T_min = max(0, T0 − Δ), T_max = T0 + Δ, N = the number of candidates (tokens not
    masked to −inf at this point of the chain), H the entropy of their softmax and
    T = T_min + (T_max − T_min) · (H / ln N)^exponent; then l' = l / T. A row with N ≤ 1 is left
    as it is (no temperature at all, as llama.cpp returns early). With Δ = 0: plain temperature,
    l' = l / T0. T < 1e-5 marks the row greedy.
    Peer: llama.cpp `llama_sampler_init_temp_ext(temp, delta, exponent)`
    (`llama_sampler_temp_ext_apply`, src/llama-sampling.cpp; server parameters `temperature`,
    `dynatemp_range`, `dynatemp_exponent`). Difference: llama.cpp counts every entry of its
    candidate array in N, including tokens an earlier sampler set to −inf without removing
    them (a logit bias); here N counts finite candidates only.
    Ranges are llama.cpp's, which checks none: any `temperature` (≤ 0, or a dynamic
    temperature that comes out below 1e-5, makes the row greedy, as llama.cpp keeps only the
    best token at a temperature ≤ 0) and any `delta` (≤ 0: plain temperature). `exponent` must
    be ≥ 0: a negative one makes T infinite at zero entropy (llama.cpp then divides −inf by
    ∞, NaN).
    Transform; reads the candidates; no per-sequence state.
    Explains `temperature` (the T used; none for a row left as it is), `candidates` (N) and
    `normalized_entropy` (H / ln N), the last two for rows with Δ > 0.
    Off: temperature = 1 and delta = 0.
    Sparse rows: Δ = 0 is exact; Δ > 0 reads the entropy and number of every candidate, so
    exact only once an earlier truncation excluded the tail.
    """

    key = "temp_ext"
    role = "transform"
    drops_when_off = False  # explains its decision for every row
    params = (Param("temperature", "float", default=1.0, off=1.0,
                    doc="T0, the centre of the range; with delta ≤ 0 the plain temperature "
                        "(< 1e-5 means greedy)"),
              Param("delta", "float", default=0.0, off=0.0,
                    doc="Δ, half the range (llama.cpp dynatemp_range); ≤ 0 = plain temperature"),
              Param("exponent", "float", default=1.0, off=None, minimum=0.0,
                    doc="power of the normalised entropy (llama.cpp dynatemp_exponent); only "
                        "read when delta > 0"))

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        t0, delta, exponent = args["temperature"], args["delta"], args["exponent"]
        active = (t0 != 1.0) | (delta > 0)
        if not bool(active.any()):
            return
        dynamic = active & (delta > 0)
        if not bool(dynamic.any()):  # plain temperatures only
            _apply_temperature(candidates, t0, active, batch)
            batch.explain(self.key, temperature=_reported(t0, active))
            return
        entropy, count = _candidate_entropy(candidates, count=True)
        normalized = (entropy / torch.log(count.clamp(min=2).to(entropy.dtype))).clamp(min=0.0)
        low, high = (t0 - delta).clamp(min=0.0), t0 + delta
        temperature = torch.where(dynamic, low + (high - low) * normalized.pow(exponent), t0)
        alone = dynamic & (count <= 1)  # llama.cpp returns early: no temperature at all
        active &= ~alone
        _apply_temperature(candidates, temperature, active, batch)
        batch.explain(self.key, temperature=_reported(temperature, active),
                      candidates=_reported(count, dynamic),
                      normalized_entropy=_reported(normalized, dynamic & ~alone))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """A plain temperature scales the tail; a dynamic one needs the tail excluded."""
        t0, delta = args["temperature"], args["delta"]
        dynamic = delta > 0
        tail.refuse_unless_excluded(dynamic, "temp_ext: a dynamic temperature reads every "
                                             "candidate")
        tail.scale(t0, _scaled(t0, ~dynamic))
        return True


class Edt(Processor):
    """EDT, entropy-based dynamic temperature (Zhang et al. 2024, arXiv 2403.14541):
    T = T0 · N^(θ / H), then l' = l / T.

    H = the entropy (nats) of the candidates' softmax at this point of the chain: put `edt`
    first to read the model's raw distribution, as the paper does (it then costs nothing: the
    engine's raw statistics of the step are reused). N ∈ (0, 1] is the base
    (the paper's N = 0.8) and θ ≥ 0 its exponent numerator; with N < 1 the temperature falls
    towards 0 as the model grows confident. H = 0 (one candidate, or a point mass) with θ > 0
    gives N^∞ = 0, T = 0: greedy. θ = 0 gives T = T0 whatever H. T < 1e-5 marks the row greedy.
    A row without any finite candidate is left for the engine to report.
    Peer: the paper's formula (its tuned T0 and θ are not taken over). Transform; reads the
    candidates; no per-sequence state.
    Explains `temperature` (T) and `entropy` (H).
    Off: theta = 0 (or base = 1) with t0 = 1, which gives T = 1.
    Sparse rows: first in the chain it is exact (the raw entropy is); later it reads the
    candidates' entropy, exact only once an earlier truncation excluded the tail.
    """

    key = "edt"
    role = "transform"
    drops_when_off = False  # explains its decision for every row
    params = (Param("t0", "float", default=1.0, off=1.0, minimum=0.0,
                    doc="T0, the temperature at H → ∞ (the largest EDT gives)"),
              Param("theta", "float", default=1.0, off=0.0, minimum=0.0,
                    doc="θ; 0 = plain temperature T0"),
              Param("base", "float", default=0.8, off=1.0, minimum=0.0, maximum=1.0,
                    exclusive_minimum=True,
                    doc="N, the base (paper: 0.8); 1 = plain temperature T0"))

    @staticmethod
    def _active(args: dict[str, torch.Tensor]) -> torch.Tensor:
        t0, theta, base = args["t0"], args["theta"], args["base"]
        return ~((t0 == 1.0) & ((theta == 0) | (base == 1.0)))

    @staticmethod
    def _temperature(args: dict[str, torch.Tensor], entropy: torch.Tensor) -> torch.Tensor:
        """[R] T = T0 · N^(θ / H)."""
        t0, theta, base = args["t0"], args["theta"], args["base"]
        # θ / 0 = +inf for θ > 0; θ = 0 means exponent 0 whatever H (not 0 / 0).
        exponent = torch.where(theta > 0, theta / entropy, torch.zeros_like(theta))
        return t0 * base.pow(exponent)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        active = self._active(args)
        if not bool(active.any()):
            return
        entropy = (batch.raw_statistics().entropy if batch.pristine
                   else _candidate_entropy(candidates)[0])
        active &= ~entropy.isnan()  # a row without any finite candidate: left to the engine
        temperature = self._temperature(args, entropy)
        _apply_temperature(candidates, temperature, active, batch)
        batch.explain(self.key, temperature=_reported(temperature, active),
                      entropy=_reported(entropy, active))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """First in the chain T comes from the exact raw entropy and scales the tail; later
        the candidates' entropy is the whole row's only with the tail excluded."""
        active = self._active(args)
        if not batch.pristine:
            tail.refuse_unless_excluded(active, "edt: reads the entropy of the candidates")
        elif bool(active.any()):
            temperature = self._temperature(args, batch.raw_statistics().entropy)
            tail.scale(temperature, _scaled(temperature, active))
        return True


def _previous_tokens(batch: RowBatch) -> torch.Tensor:
    """[R] each row's last token: its last output id, its last prompt id at step 0, −1 for a
    sequence with neither."""
    return torch.tensor([s.output_ids[-1] if s.output_ids else
                         (s.prompt_ids[-1] if s.prompt_ids else -1) for s in batch.states],
                        dtype=torch.int64, device=batch.device)


class HotOrCold(Processor):
    """Hot-or-Cold / AdapT (Zhu et al. 2024, "Hot or Cold? Adaptive Temperature Sampling for
    Code Generation with Large Language Models", AAAI 2024, arXiv 2309.02772): T = `hot` on a
    challenging token, T = `cold` elsewhere, then l' = l / T.

    The paper finds the hard-to-predict ("challenging") code tokens mostly at the start of a
    code block, and samples them hotter. Challenging is decided per row by `rule`:
    - `newline` (the paper's code-block rule, read as a token rule): the previous token (the
      last output id, or the last prompt id at step 0) is one of `newline_ids`, the ids of the
      tokens that end in a newline (the service has no tokenizer: the client lists them);
    - `entropy`: the raw entropy of this step is above `entropy_threshold` (nats).
    The paper's tuned temperatures are not taken over: hot and cold default to 1, so the stage
    does nothing until they are set (hot > cold). T < 1e-5 marks the row greedy.
    Transform; the `entropy` rule reads the raw distribution; no per-sequence state.
    Explains `challenging` (true / false) and `temperature` (the T used).
    Off: hot = cold = 1.
    Sparse rows: exact (both rules read what is known exactly); the tail is scaled by T.
    """

    key = "hot_or_cold"
    role = "transform"
    drops_when_off = False  # explains its decision for every row
    decisions = {"challenging": ("true", "false")}
    params = (Param("hot", "float", default=1.0, off=1.0, minimum=0.0,
                    doc="temperature of a challenging token"),
              Param("cold", "float", default=1.0, off=1.0, minimum=0.0,
                    doc="temperature of every other token"),
              Param("rule", "choice", default="newline", off=None, choices=("newline", "entropy"),
                    doc="what makes a token challenging: following a newline, or a raw entropy "
                        "above entropy_threshold"),
              Param("newline_ids", "int_list", default=(), off=None,
                    doc="ids of the tokens that end in a newline (rule newline)"),
              Param("entropy_threshold", "float", default=2.0, off=None, minimum=0.0,
                    doc="raw entropy (nats) above which a token is challenging (rule entropy)"))

    def apply(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch) -> None:
        active = (args["hot"] != 1.0) | (args["cold"] != 1.0)
        if not bool(active.any()):
            return
        challenging, temperature = self._temperature(args, batch)
        _apply_temperature(candidates, temperature, active, batch)
        batch.explain(self.key, challenging=_reported(challenging, active),
                      temperature=_reported(temperature, active))

    def sparse_tail(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The rule reads the previous token or the raw entropy, both exact: T scales the tail."""
        active = (args["hot"] != 1.0) | (args["cold"] != 1.0)
        if bool(active.any()):
            temperature = self._temperature(args, batch)[1]
            tail.scale(temperature, _scaled(temperature, active))
        return True

    @staticmethod
    def _temperature(args: dict[str, Any], batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(challenging [R] bool, T [R]) of every row."""
        hot, cold = args["hot"], args["cold"]
        by_entropy = torch.tensor([rule == "entropy" for rule in args["rule"]],
                                  dtype=torch.bool, device=batch.device)
        challenging = torch.zeros(batch.rows, dtype=torch.bool, device=batch.device)
        if bool(by_entropy.any()):
            entropy = batch.raw_statistics().entropy
            challenging |= by_entropy & (entropy > args["entropy_threshold"])
        if not bool(by_entropy.all()):
            rows, ids = row_pairs([torch.tensor(list(ids), dtype=torch.int64)
                                   for ids in args["newline_ids"]], batch.device)
            hit = _previous_tokens(batch).index_select(0, rows) == ids
            after_newline = torch.zeros_like(challenging).index_fill_(0, rows[hit], True)
            challenging |= ~by_entropy & after_newline
        return challenging, torch.where(challenging, hot, cold)


class KlTemperature(Processor):
    """KL-guided temperature (after Chang et al. 2023, "KL-Divergence Guided Temperature
    Sampling", arXiv 2306.01286): the temperature falls as the grounding context moves the
    model's prediction, T = t_min + (t0 − t_min) · exp(−KL / scale), then l' = l / T.

    KL = KL(p ‖ p_ref) = Σ p (log p − log p_ref) in nats, p = softmax of the raw logits and
    p_ref = softmax of the worker's reference logits (the same model without the grounding
    context, `reference_logits` of the step request, required while a row is on). A large KL
    means the token depends on the source, so it is sampled cooler (less hallucination); a
    token the source does not inform (KL ≈ 0) keeps t0 (diversity). That is the paper's idea;
    this exponential mapping and its `scale` are this service's (the paper's own formula may
    differ). A token
    p_ref gives probability 0 where p does not makes KL = +inf, hence T = t_min. With
    t_min > t0 the temperature rises with KL instead. T < 1e-5 marks the row greedy.
    Transform; reads the raw and the reference distributions (wherever it stands in the
    chain); no per-sequence state.
    Explains `kl` and `temperature`.
    Off: t0 = t_min = 1 (then no reference logits are needed).
    Sparse rows: never (KL reads every raw logit).
    """

    key = "kl_temperature"
    role = "transform"
    drops_when_off = False  # explains its decision for every row
    params = (Param("t0", "float", default=1.0, off=1.0, minimum=0.0,
                    doc="temperature at KL = 0"),
              Param("t_min", "float", default=0.1, off=1.0, minimum=0.0,
                    doc="temperature as KL → ∞"),
              Param("scale", "float", default=1.0, off=None, minimum=0.0, exclusive_minimum=True,
                    doc="KL (nats) over which the temperature moves 63% of the way to t_min"))

    @staticmethod
    def _active(args: dict[str, torch.Tensor]) -> torch.Tensor:
        return (args["t0"] != 1.0) | (args["t_min"] != 1.0)

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        t0, t_min, scale = args["t0"], args["t_min"], args["scale"]
        active = self._active(args)
        if not bool(active.any()):
            return
        reference = batch.reference_logits(self.key)
        kl = _kl_divergence(batch.inputs.raw, reference)  # type: ignore[union-attr]
        temperature = t_min + (t0 - t_min) * torch.exp(-kl / scale)
        _apply_temperature(candidates, temperature, active, batch)
        batch.explain(self.key, kl=_reported(kl, active),
                      temperature=_reported(temperature, active))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """KL(p ‖ p_ref) needs every raw logit: rows that are on are refused (structural)."""
        active = self._active(args)
        tail.refuse(active, lambda _: "kl_temperature: KL to the reference reads every raw logit",
                    structural=True)
        return not bool(active.any())


class Sed(Processor):
    """SED chaotic points (Luo et al. 2024, "SED: Self-Evaluation Decoding Enhances Large
    Language Models for Better Generation", arXiv 2405.16552): flags a step as chaotic when
    the raw entropy H > `entropy_threshold` or the raw top-2 / top-1 probability ratio
    r = p_(2) / p_(1) > `ratio_threshold`.

    The paper detects chaotic points with either measure (entropy-based or ratio-based) and
    then speculates and self-evaluates there; this stage is the detection alone: it changes no
    logit and reports the flag, which a policy, a client or a group selector acts on. Both
    measures are of the raw distribution, wherever the stage stands in the chain. A criterion
    whose threshold is 0 is off (a ratio threshold of 1 can never fire, since r ≤ 1). The default thresholds are this service's choices, not taken
    from the paper.
    Monitor (leaves every row bit-identical; "monitor" because it neither masks, changes nor
    constrains a value); no per-sequence state.
    Explains `chaotic` (true / false), `entropy` (H) and `top2_ratio` (r).
    Off: entropy_threshold = 0 and ratio_threshold = 0.
    Sparse rows: always exact (the raw entropy and top two logits are known exactly).
    """

    key = "sed"
    role = "monitor"
    drops_when_off = False  # explains its decision for every row
    decisions = {"chaotic": ("true", "false")}
    params = (Param("entropy_threshold", "float", default=2.0, off=0.0, minimum=0.0,
                    doc="raw entropy (nats) above which a step is chaotic; 0 = this criterion off"),
              Param("ratio_threshold", "float", default=0.5, off=0.0, minimum=0.0, maximum=1.0,
                    doc="top-2 / top-1 probability ratio above which a step is chaotic; 0 = this "
                        "criterion off"))

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        entropy_threshold, ratio_threshold = args["entropy_threshold"], args["ratio_threshold"]
        by_entropy = (entropy_threshold > 0) & (entropy_threshold < math.inf)
        by_ratio = ratio_threshold > 0
        active = by_entropy | by_ratio
        if not bool(active.any()):
            return
        entropy = batch.raw_statistics().entropy
        first, second = batch.inputs.raw_top_two()  # type: ignore[union-attr]
        ratio = torch.exp(second - first)  # exp(−inf) = 0: a single finite token
        chaotic = ((by_entropy & (entropy > entropy_threshold))
                   | (by_ratio & (ratio > ratio_threshold)))
        batch.explain(self.key, chaotic=_reported(chaotic, active),
                      entropy=_reported(entropy, active), top2_ratio=_reported(ratio, active))

    def sparse_tail(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch,
                    tail: TailBound) -> bool:
        """A monitor of exactly known raw facts: nothing to refuse, nothing changes."""
        return True
