"""End to end on SmolLM2-135M-Instruct: prompt lookup decoding through the sidecar.

`hf.generate(prompt_lookup_num_tokens=k)` drafts with transformers' n-gram rule, runs the model
once on the last token and the drafts, and has the sidecar verify them (`seq.verify`); with the
greedy policy its tokens are plain greedy `hf.generate`'s and Hugging Face's own
`model.generate(prompt_lookup_num_tokens=k, do_sample=False)`'s, token for token. The prompts
repeat themselves (code to rewrite, a sentence to copy, a list), so drafts do get accepted.
One server and client serve the whole module; the model is the session's.
"""
from __future__ import annotations

import pytest
import torch

from sampler_client import SamplerClient, hf
from sampler_service.server.app import SamplerServer, ServerConfig

PROMPTS = [
    "Rewrite this Python code with type hints:\ndef add(a, b):\n    return a + b\n\n"
    "def sub(a, b):\n    return a - b\n",
    "Copy this sentence twice: The quick brown fox jumps over the lazy dog.",
    'Add an "age" field to each object: [{"name": "Ann"}, {"name": "Bob"}, {"name": "Cid"}]',
]
MAX_NEW_TOKENS = 24




@pytest.fixture(scope="module")
def shared_client():
    server = SamplerServer(ServerConfig(port=0, device="cpu"))
    try:
        with SamplerClient(server.address) as sdk:
            yield sdk
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def greedy(smollm2, shared_client):
    """prompt -> (input_ids, plain greedy hf.generate's tokens), computed once per prompt."""
    model, tokenizer = smollm2
    cache: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def get(prompt: str) -> tuple[torch.Tensor, list[int]]:
        if prompt not in cache:
            input_ids = hf.chat_ids(tokenizer, prompt)
            tokens, = hf.generate(model, input_ids, shared_client, policy="greedy",
                                  max_new_tokens=MAX_NEW_TOKENS)
            cache[prompt] = input_ids, tokens
        return cache[prompt]

    return get


@pytest.mark.e2e
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_lookup_equals_greedy_and_hf_prompt_lookup(smollm2, shared_client, greedy,
                                                          prompt, k):
    model, _ = smollm2
    input_ids, plain = greedy(prompt)
    stats = hf.GenerationStats()
    got, = hf.generate(model, input_ids, shared_client, policy="greedy",
                       max_new_tokens=MAX_NEW_TOKENS, prompt_lookup_num_tokens=k, stats=stats)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                              prompt_lookup_num_tokens=k)[0, input_ids.shape[1]:].tolist()
    assert got == plain
    assert got == expected
    assert sum(stats.accepted_per_step) == len(got) == stats.tokens
    assert len(stats.accepted_per_step) == len(stats.drafted_per_step) == stats.steps
    assert all(1 <= a <= d + 1 for a, d in zip(stats.accepted_per_step, stats.drafted_per_step))
    assert all(d <= k for d in stats.drafted_per_step)
    assert stats.steps < len(got)  # the prompt repeats itself: drafts were accepted


@pytest.mark.e2e
@pytest.mark.parametrize("options", [dict(num_beams=2), dict(n=2), dict(cot_k=3),
                                     dict(best_of=2)])
def test_prompt_lookup_refuses_groups(smollm2, shared_client, options):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        hf.generate(model, hf.chat_ids(tokenizer, PROMPTS[0]), shared_client, policy="greedy",
                    max_new_tokens=4, prompt_lookup_num_tokens=4, **options)


@pytest.mark.e2e
def test_prompt_lookup_refuses_a_batch(smollm2, shared_client):
    model, tokenizer = smollm2
    prompts = [hf.chat_ids(tokenizer, p)[0].tolist() for p in PROMPTS[:2]]
    with pytest.raises(ValueError, match="one prompt"):
        hf.generate(model, prompts, shared_client, policy="greedy", max_new_tokens=4,
                    prompt_lookup_num_tokens=4)
