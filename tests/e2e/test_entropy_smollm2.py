"""End to end on SmolLM2: the entropy history the service keeps is the model's own, and the
adaptive policies explain every choice."""
from __future__ import annotations

import pytest
import torch

from sampler_client import hf

STEPS = 12


def run_with_model(model, input_ids, sequence) -> list[tuple[float, float]]:
    """Steps `sequence` with the model's logits (KV cache, batch of one) and returns the
    entropy and varentropy of each step's raw distribution, computed here in float64."""
    stats, choices = [], []
    out = model(input_ids=input_ids, use_cache=True)
    for _ in range(STEPS):
        logits = out.logits[0, -1].float()
        log_p = torch.log_softmax(logits.double(), dim=-1)
        entropy = float(-(log_p.exp() * log_p).sum())
        stats.append((entropy, float((log_p.exp() * (log_p + entropy) ** 2).sum())))
        choice = sequence.step(logits)
        choices.append(choice)
        if choice.finished:
            break
        out = model(input_ids=torch.tensor([[choice.token_id]]), use_cache=True,
                    **hf._cache_of(model, out))
    return stats, choices


@pytest.mark.e2e
@pytest.mark.parametrize("policy,stage", [("edt", "edt"), ("entropix", "entropix"),
                                          ("dynatemp", "temp_ext")])
def test_entropy_history_is_the_models_and_choices_explain_themselves(smollm2, client, policy,
                                                                        stage):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, "Write a haiku about the sea.")
    sequence = client.create_sequence(policy=policy, prompt_ids=input_ids[0].tolist(), seed=3,
                                      eos_token_ids=hf.eos_token_ids(model))
    with torch.inference_mode():
        expected, choices = run_with_model(model, input_ids, sequence)
    info = sequence.info()
    assert len(info.entropies) == len(expected) > 1
    for (entropy, varentropy), got_h, got_v in zip(expected, info.entropies, info.varentropies):
        assert got_h == pytest.approx(entropy, abs=1e-4)
        assert got_v == pytest.approx(varentropy, abs=1e-4 * max(1.0, varentropy))
    assert info.entropy_summary["mean_entropy"] == pytest.approx(
        sum(h for h, _ in expected) / len(expected), abs=1e-4)
    assert all(stage in choice.explanation for choice in choices)
