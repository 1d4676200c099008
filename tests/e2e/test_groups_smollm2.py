"""End to end on SmolLM2-135M-Instruct: beam search, forks and CoT decoding through the
sidecar, with the model's KV cache following the parent links of each answer."""
from __future__ import annotations

import pytest

from sampler_client import hf

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
MAX_NEW_TOKENS = 24

#: (num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences):
#: together they cover W = 2 and 4, α = 0.6 / 1.0 / 2.0, every early_stopping mode, n-gram
#: blocking on and off, and one or W returned sequences.
BEAM_CASES = [
    (2, 1.0, False, 0, 1),
    (2, 0.6, True, 3, 2),
    (4, 1.0, "never", 0, 4),
    (4, 2.0, False, 3, 1),
    (4, 0.6, "never", 3, 4),
    (4, 2.0, True, 0, 2),
]


def padded(rows: list[list[int]], width: int, pad_id: int) -> list[list[int]]:
    return [row + [pad_id] * (width - len(row)) for row in rows]


@pytest.mark.e2e
@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,ngram,returned", BEAM_CASES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_beam_search_through_the_sidecar_equals_hf_generate(
        smollm2, client, prompt, num_beams, length_penalty, early_stopping, ngram, returned):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, prompt)
    options = dict(num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, no_repeat_ngram_size=ngram,
                   num_return_sequences=returned)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                              **options)[:, input_ids.shape[1]:].tolist()
    results: list = []
    got = hf.generate(model, input_ids, client, max_new_tokens=MAX_NEW_TOKENS, results=results,
                      **options)
    assert padded(got, len(expected[0]), model.generation_config.pad_token_id) == expected
    scores = [h.score for h in results[0].hypotheses]
    assert len(scores) == returned and scores == sorted(scores, reverse=True)


@pytest.mark.e2e
def test_seeded_forks_differ_from_each_other_and_repeat_across_runs(smollm2, client):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, "Write a haiku about the sea.")
    runs = [hf.generate(model, input_ids, client, policy="creative", n=4, seed=11,
                        max_new_tokens=16) for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4 and len({tuple(r) for r in runs[0]}) == 4


@pytest.mark.e2e
def test_cot_decoding_returns_k_paths_ranked_by_confidence(smollm2, client):
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, "What is 7 + 5? Answer with a number.")
    results: list = []
    paths = hf.generate(model, input_ids, client, cot_k=4, max_new_tokens=12, results=results)
    hypotheses = results[0].hypotheses
    assert len(paths) == len(hypotheses) == 4
    assert len({p[0] for p in paths}) == 4  # each path starts with another of the top-4 tokens
    confidences = [h.confidence for h in hypotheses]
    assert all(0.0 <= c <= 1.0 for c in confidences)
    assert confidences == sorted(confidences, reverse=True)
    assert sum(v.paths for v in results[0].answers) == 4
    assert results[0].answers[0].total_confidence == max(v.total_confidence for v in results[0].answers)


@pytest.mark.e2e
@pytest.mark.parametrize("num_beams,ngram,repetition_penalty", [(2, 0, 1.0), (4, 3, 1.3)])
def test_beam_processed_logprobs_are_hf_beam_scores(smollm2, client, num_beams, ngram,
                                                    repetition_penalty):
    """Given Hugging Face's own raw logits step by step (`output_logits`), the sidecar's beams
    report as processed_logprob HF's `scores` at (parent row, token): HF's rows at a step are
    its running beams in the order of the rows sent here (the tokens match, as above)."""
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, PROMPTS[0])
    options = dict(num_beams=num_beams, no_repeat_ngram_size=ngram,
                   repetition_penalty=repetition_penalty)
    out = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                         output_scores=True, output_logits=True, return_dict_in_generate=True,
                         **options)
    group = client.create_beam_group(input_ids[0].tolist(), max_new_tokens=MAX_NEW_TOKENS,
                                     eos_token_ids=hf.eos_token_ids(model), **options)
    assert len(out.logits) == len(out.scores) > 1
    for logits, scores in zip(out.logits, out.scores):
        choices = group.step(logits.float(), processed_logprobs=True)
        assert [c.processed_logprob for c in choices] == pytest.approx(
            [float(scores[c.parent_row, c.token_id]) for c in choices], rel=1e-5, abs=1e-5)
    assert group.result is not None
    best = group.result.hypotheses[0]
    assert best.token_ids == out.sequences[0, input_ids.shape[1]:].tolist()[:len(best.token_ids)]
