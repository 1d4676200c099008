"""Stop strings on SmolLM2 through the sidecar end where Hugging Face's `stop_strings`
criterion ends `generate()` (at the token during which a stop string is completed)."""
from __future__ import annotations

import pytest

from sampler_client import hf

CASES = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of France?", [" capital", "xyz"]),
    ("Write a haiku about the sea.", ["\n"]),
    ("Write a haiku about the sea.", ["waves", "sea"]),
    ("List three prime numbers.", ["prime"]),
    ("List three prime numbers.", ["2.", "3."]),
]


@pytest.mark.e2e
@pytest.mark.parametrize("prompt, stop", CASES)
def test_stop_strings_end_where_hugging_face_ends(smollm2, client, prompt, stop):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, prompt)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=40, stop_strings=stop,
                              tokenizer=tokenizer)[0, input_ids.shape[1]:].tolist()
    got = hf.generate(model, input_ids, client, policy="greedy", params={"stop": stop},
                      max_new_tokens=40, tokenizer=tokenizer)
    assert got == [expected]
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert any(s in text for s in stop), text  # the case does stop on a string
