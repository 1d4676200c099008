"""One beam-search step (W beams, V-token fp32 logits), against peers measured in the same run.

Per size, on the same Zipf-shaped logits (see common.zipf_logits) and a 64-token prompt:
- floor: torch.log_softmax over [W, V] + topk(2W) over the flattened W·V, the least any
  beam step does;
- Hugging Face: the body of transformers' `GenerationMixin._beam_search` loop for one step
  without the forward pass and the cache reorder (log_softmax, the processors, running
  scores, `_get_top_k_continuations`, the stopping criteria, `_get_running_beams_for_next_
  iteration`, `_update_finished_beams`, `_check_early_stop_heuristic`), on fresh state per
  repetition, called through its own helper methods;
- engine: `SamplerCore.step` of a beam group (validation, the chain on log-probabilities, the
  selector's step, raw entropy / varentropy and logprobs of every row), successive steps of
  one long group (each step sees the state the previous one left).
Both without processors, then with repetition_penalty 1.2 + no_repeat_ngram 3 (HF's
RepetitionPenaltyLogitsProcessor + NoRepeatNGramLogitsProcessor vs the policy's chain). The
cases of one size are timed in turns (one call of each per round), medians over the rounds.

    python benchmarks/beam_step.py [--sizes 4x49152,8x49152,4x128256] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from common import print_table, zipf_logits
from sampler_client.specs import beam_search_policy
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore

PROMPT = 64           # prompt tokens (the penalties' history)
GENERATED = 16        # tokens generated before the step HF times
MAX_NEW_TOKENS = 64   # HF's state is sized prompt + max_new_tokens
PENALTY, NGRAM = 1.2, 3
WARMUP, REPEATS = 5, 51  # rounds; a step takes milliseconds and this CPU's timings drift


def floor_step(logits: torch.Tensor, width: int) -> torch.Tensor:
    return torch.topk(torch.log_softmax(logits, dim=-1).reshape(1, -1), k=2 * width)[1]


class HfBeamStep:
    """One iteration of transformers' `_beam_search` (batch of one) minus the forward pass
    and the cache reorder, on a fresh copy of mid-generation state per call."""

    def __init__(self, prompt: torch.Tensor, width: int, vocab: int, eos: int, penalties: bool):
        from transformers import (GenerationMixin, LogitsProcessorList,
                                  NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor)
        from transformers.generation.stopping_criteria import (EosTokenCriteria,
                                                               MaxLengthCriteria,
                                                               StoppingCriteriaList)
        self.mixin = GenerationMixin
        self.width = width
        self.prompt_len = prompt.numel()
        self.cur_len = self.prompt_len + GENERATED
        self.max_length = self.prompt_len + MAX_NEW_TOKENS
        self.processors = LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(PENALTY), NoRepeatNGramLogitsProcessor(NGRAM)]
            if penalties else [])
        self.stopping = StoppingCriteriaList([MaxLengthCriteria(self.max_length),
                                              EosTokenCriteria(eos)])
        self.keep = 2 * width  # max(2, 1 + one EOS id) · W
        self.top_mask = torch.arange(self.keep) < width
        generator = torch.Generator().manual_seed(1)
        sequences = torch.full((1, width, self.max_length), eos, dtype=torch.int64)
        sequences[:, :, :self.prompt_len] = prompt
        sequences[:, :, self.prompt_len:self.cur_len] = torch.randint(
            0, vocab, (1, width, GENERATED), generator=generator)
        self.sequences = sequences

    def fresh_state(self, logits: torch.Tensor) -> tuple:
        """The arguments of a call: logits and the state a mid-generation step finds (running
        sequences, scores and beam indices; finished sequences, scores, indices and flags)."""
        width, generated = self.width, self.max_length - self.prompt_len
        scores = -torch.rand(1, width).sort(dim=1, descending=True).values * GENERATED
        indices = torch.full((1, width, generated), -1, dtype=torch.int32)
        return (logits, self.sequences.clone(), scores, indices, self.sequences.clone(),
                torch.full((1, width), -1e9), indices.clone(),
                torch.zeros((1, width), dtype=torch.bool))

    def __call__(self, logits, running_sequences, running_scores, running_indices, sequences,
                 beam_scores, beam_indices, finished) -> bool:
        mixin, width, cur_len = self.mixin, self.width, self.cur_len
        flat = mixin._flatten_beam_dim(running_sequences[:, :, :cur_len])
        logits = logits.to(copy=True, dtype=torch.float32)
        log_probs = self.processors(flat, torch.nn.functional.log_softmax(logits, dim=-1))
        log_probs = mixin._unflatten_beam_dim(log_probs, 1, width) + running_scores[:, :, None]
        log_probs = torch.reshape(log_probs, (1, -1))
        topk_log_probs, topk_sequences, topk_indices = mixin._get_top_k_continuations(
            mixin, accumulated_log_probs=log_probs, running_sequences=running_sequences,
            running_beam_indices=running_indices, cur_len=cur_len,
            decoder_prompt_len=self.prompt_len, do_sample=False, beams_to_keep=self.keep,
            num_beams=width, batch_size=1)
        hits = self.stopping(mixin._flatten_beam_dim(topk_sequences[:, :, :cur_len + 1]), None)
        hits = mixin._unflatten_beam_dim(hits, 1, self.keep)
        _, running_scores, _ = mixin._get_running_beams_for_next_iteration(
            mixin, topk_log_probs, topk_sequences, topk_indices, hits, width)
        unsatisfied = torch.ones((1, 1), dtype=torch.bool)
        _, beam_scores, _, finished = mixin._update_finished_beams(
            mixin, sequences=sequences, topk_running_sequences=topk_sequences,
            beam_scores=beam_scores, topk_log_probs=topk_log_probs, beam_indices=beam_indices,
            topk_running_beam_indices=topk_indices,
            is_early_stop_heuristic_unsatisfied=unsatisfied, is_sent_finished=finished,
            next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=self.top_mask, num_beams=width, cur_len=cur_len,
            decoder_prompt_len=self.prompt_len, length_penalty=1.0, early_stopping=False)
        unsatisfied = mixin._check_early_stop_heuristic(
            unsatisfied, running_scores, beam_scores, finished, cur_len + 1, self.max_length,
            self.prompt_len, False, 1.0)
        return bool(mixin._beam_search_has_unfinished_sequences(unsatisfied, finished, hits, False))


def engine_step(core: SamplerCore, name: str, prompt: list[int], width: int, eos: int,
                penalties: bool):
    """A function of the logits that steps one new beam group by one step per call."""
    policy = beam_search_policy(width, max_new_tokens=1_000_000,
                                repetition_penalty=PENALTY if penalties else 1.0,
                                no_repeat_ngram_size=NGRAM if penalties else 0)
    group, = core.create_sequences([SequenceRequest(name, policy_spec=policy,
                                                    prompt_ids=tuple(prompt),
                                                    eos_token_ids=(eos,))])
    rows = [StepRow(group.sequence_id)] * width
    return lambda logits: core.step(rows, logits)


def interleaved_ms(cases: dict[str, tuple[Callable, Callable[[], tuple]]]) -> dict[str, float]:
    """Median ms of each case `(fn, setup)`: `fn(*setup())` with `setup` untimed, over rounds
    that call every case once in turn, so that this CPU's drift hits every case alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(WARMUP + REPEATS):
        for name, (fn, setup) in cases.items():
            arguments = setup()
            started = time.perf_counter()
            fn(*arguments)
            if round_ >= WARMUP:
                samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(core: SamplerCore, width: int, vocab: int) -> list[tuple[str, float, str]]:
    logits = zipf_logits(width, vocab)
    prompt = torch.randint(0, vocab, (PROMPT,), generator=torch.Generator().manual_seed(0))
    eos = int(logits.amax(dim=0).argmin())  # an EOS id no beam picks: the groups never end
    labels = {False: "no processors", True: "rep 1.2 + no_repeat_ngram 3"}
    cases = {"floor": (lambda: floor_step(logits, width), tuple)}
    for penalties in labels:
        hf = HfBeamStep(prompt, width, vocab, eos, penalties)
        ours = engine_step(core, f"beam-{width}-{vocab}-{penalties}", prompt.tolist(), width, eos,
                           penalties)
        cases[f"hf {penalties}"] = (hf, lambda hf=hf: hf.fresh_state(logits))
        cases[f"engine {penalties}"] = (lambda ours=ours: ours(logits), tuple)
    ms = interleaved_ms(cases)
    floor = ms["floor"]
    rows = [("floor: log_softmax + topk(2W) of W·V", floor, "1.0x")]
    for penalties, label in labels.items():
        hf_ms, ours_ms = ms[f"hf {penalties}"], ms[f"engine {penalties}"]
        rows += [(f"Hugging Face beam step, {label}", hf_ms, f"{hf_ms / floor:.1f}x floor"),
                 (f"engine beam step, {label}", ours_ms,
                  f"{ours_ms / floor:.1f}x floor, {ours_ms / hf_ms:.2f}x Hugging Face's")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4x49152,8x49152,4x128256",
                        help="comma-separated WxV")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    for size in args.sizes.split(","):
        width, vocab = (int(x) for x in size.split("x"))
        print_table(f"beam step, W = {width}, V = {vocab} fp32, {args.threads} threads, cpu",
                    measure(core, width, vocab))


if __name__ == "__main__":
    main()
