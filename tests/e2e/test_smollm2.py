"""End to end on SmolLM2-135M-Instruct: the model runs here, sampling runs in the sidecar."""
from __future__ import annotations

import pytest

from sampler_client import hf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
MAX_NEW_TOKENS = 32




@pytest.mark.e2e
@pytest.mark.parametrize("repetition_penalty", [None, 1.3])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_through_the_sidecar_equals_hf_generate(smollm2, client, prompt, repetition_penalty):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, prompt)
    extra = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                              **extra)[0, input_ids.shape[1]:].tolist()
    got = hf.generate(model, input_ids, client, policy="greedy", params=extra or None,
                      max_new_tokens=MAX_NEW_TOKENS)
    assert got == [expected]


@pytest.mark.e2e
def test_batched_prompts_of_different_lengths_match_one_by_one(smollm2, client):
    model, tokenizer = smollm2
    prompts = [hf.chat_ids(tokenizer, p)[0].tolist() for p in PROMPTS]
    batched = hf.generate(model, prompts, client, policy="greedy", max_new_tokens=12)
    alone = [hf.generate(model, p, client, policy="greedy", max_new_tokens=12)[0] for p in prompts]
    assert batched == alone


@pytest.mark.e2e
def test_seeded_sampling_is_reproducible_and_sensible(smollm2, client):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, PROMPTS[0])
    runs = [hf.generate(model, input_ids, client, policy="creative", seed=seed,
                        max_new_tokens=24)[0] for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    eos = hf.eos_token_ids(model)
    for run in runs:
        assert all(t not in eos for t in run[:-1])  # EOS only ever ends a sequence
