"""One engine step for 64 x 128256 fp32 logits, against peers measured in the same run.

Prints, per shipped policy, the in-process engine step (SamplerCore.step: validation, raw
entropy/varentropy and logprobs, the chain, the selector) and its ratio to one `torch.amax`
pass over the same tensor (Zipf-shaped logits, see common.zipf_logits); for `creative`, also Hugging Face's processors with the same
settings on the same tensors (LogitsProcessorList + softmax + multinomial).

    python benchmarks/engine_step.py [--rows 64] [--vocab 128256] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from common import median_ms, print_table, zipf_logits
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore


def hf_creative(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.1), TemperatureLogitsWarper(0.8),
                                 TopKLogitsWarper(40), TopPLogitsWarper(0.95), MinPLogitsWarper(0.05)])
    scores = chain(input_ids, logits.clone())
    return torch.multinomial(torch.softmax(scores, dim=-1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logits = zipf_logits(args.rows, args.vocab).to(device)
    history = torch.randint(0, args.vocab, (args.rows, 64), generator=torch.Generator().manual_seed(0))
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(device))

    amax = median_ms(lambda: logits.amax(dim=1))
    rows = [("torch.amax (reference pass)", amax, "1.0x")]
    for policy in ("greedy", "default", "creative"):
        states = core.create_sequences([
            SequenceRequest(f"{policy}-{i}", policy=policy, params={"seed": i},
                            prompt_ids=tuple(history[i].tolist())) for i in range(args.rows)])
        step_rows = [StepRow(s.sequence_id) for s in states]
        ms = median_ms(lambda: core.step(step_rows, logits))
        rows.append((f"engine step, policy {policy}", ms, f"{ms / amax:.1f}x amax"))
        if policy == "creative":
            hf = median_ms(lambda: hf_creative(logits, history.to(device)), repeats=3, warmup=1)
            rows.append(("Hugging Face processors, same settings", hf,
                         f"{hf / amax:.1f}x amax; engine is {hf / ms:.1f}x faster"))
    print_table(f"{args.rows} x {args.vocab} fp32 logits, {args.threads} threads, device {device}", rows)


if __name__ == "__main__":
    main()
