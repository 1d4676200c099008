"""What entropy awareness costs: one engine step for 64 x 128256 fp32 logits with each adaptive
stage added to the `creative` chain (and with the entropix selector, and the shipped adaptive
policies), against plain `creative` measured in the same run, plus the raw entropy history
pass every step pays (one `raw_statistics` over the batch).

    python benchmarks/adaptive_step.py [--rows 64] [--vocab 128256] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from common import median_ms, print_table, zipf_logits
from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.statistics import raw_statistics
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore

CREATIVE_CHAIN = [{"repetition_penalty": {"penalty": 1.1}}, {"temperature": {"temperature": 0.8}},
                  {"top_k": {"k": 40}}, {"top_p": {"p": 0.95}}, {"min_p": {"p": 0.05}}]
#: Each adaptive processor where it is usually placed: temperatures replace `temperature`
#: (temp_ext last, as llama.cpp runs it), monitors go first.
VARIANTS = {
    "creative + sed (first)": [{"sed": {"entropy_threshold": 2.0, "ratio_threshold": 0.5}},
                               *CREATIVE_CHAIN],
    "creative, edt instead of temperature": [CREATIVE_CHAIN[0], {"edt": {"t0": 0.8}},
                                             *CREATIVE_CHAIN[2:]],
    "creative, hot_or_cold (entropy rule)": [CREATIVE_CHAIN[0], {"hot_or_cold": {
        "hot": 1.0, "cold": 0.6, "rule": "entropy", "entropy_threshold": 2.0}}, *CREATIVE_CHAIN[2:]],
    "creative, kl_temperature": [CREATIVE_CHAIN[0], {"kl_temperature": {"t0": 0.8, "t_min": 0.2}},
                                 *CREATIVE_CHAIN[2:]],
    "creative, temp_ext last": [CREATIVE_CHAIN[0], *CREATIVE_CHAIN[2:],
                                {"temp_ext": {"temperature": 0.8, "delta": 0.5}}],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    logits = zipf_logits(args.rows, args.vocab)
    reference = logits.roll(1, dims=1)
    history = torch.randint(0, args.vocab, (args.rows, 64), generator=torch.Generator().manual_seed(0))
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(device))

    def step_ms(name: str, **source) -> float:
        states = core.create_sequences([
            SequenceRequest(f"{name}-{i}", params={"seed": i}, prompt_ids=tuple(history[i].tolist()),
                            **source) for i in range(args.rows)])
        rows = [StepRow(s.sequence_id) for s in states]
        return median_ms(lambda: core.step(rows, logits, reference=reference))

    base = step_ms("creative", policy="creative")
    table = [("engine step, policy creative", base, "1.00x"),
             ("raw entropy + varentropy pass (in every step)",
              median_ms(lambda: raw_statistics(logits)), "")]
    table[1] = (*table[1][:2], f"{table[1][1] / base:.2f}x of creative")
    for name, chain in VARIANTS.items():
        ms = step_ms(name, policy_spec={"chain": chain, "select": "sample", "overridable": ["seed"]})
        table.append((name, ms, f"{ms / base:.2f}x (+{ms - base:.1f} ms)"))
    for policy in ("edt", "dynatemp", "entropix"):
        ms = step_ms(policy, policy=policy)
        table.append((f"shipped policy {policy}", ms, f"{ms / base:.2f}x (+{ms - base:.1f} ms)"))
    print_table(f"{args.rows} x {args.vocab} fp32, {args.threads} threads; ratio to creative", table)


if __name__ == "__main__":
    main()
