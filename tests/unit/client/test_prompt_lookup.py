"""sampler_client.prompt_lookup.propose against Hugging Face's own PromptLookupCandidateGenerator
on random id sequences (small alphabets, so that n-grams repeat): the same draft, whatever the
n-gram size, draft length, max_length and EOS ids."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from sampler_client.prompt_lookup import propose

ids_strategy = st.integers(min_value=2, max_value=6).flatmap(
    lambda alphabet: st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=48))


def hf_draft(transformers, ids: list[int], num_tokens: int, max_ngram: int,
             max_length: int, eos: list[int] | None) -> list[int]:
    """The draft transformers' PromptLookupCandidateGenerator proposes for `ids`."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
    generator = PromptLookupCandidateGenerator(
        eos_token_id=None if eos is None else torch.tensor(eos),
        num_output_tokens=num_tokens, max_matching_ngram_size=max_ngram, max_length=max_length)
    input_ids = torch.tensor([ids], dtype=torch.long)
    candidates, logits = generator.get_candidates(input_ids)
    assert logits is None
    assert torch.equal(candidates[:, :len(ids)], input_ids)
    return candidates[0, len(ids):].tolist()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=ids_strategy, num_tokens=st.integers(1, 10), max_ngram=st.integers(1, 4))
def test_propose_equals_transformers_without_limits(transformers, ids, num_tokens, max_ngram):
    expected = hf_draft(transformers, ids, num_tokens, max_ngram, max_length=10**9, eos=None)
    assert propose(ids, num_tokens, max_ngram) == expected
    assert propose(ids, num_tokens, max_ngram, max_length=10**9) == expected


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=ids_strategy, num_tokens=st.integers(1, 10), max_ngram=st.integers(1, 4),
       headroom=st.integers(-3, 12), eos=st.none() | st.lists(st.integers(0, 5), max_size=2))
def test_propose_equals_transformers_with_max_length_and_eos(transformers, ids, num_tokens,
                                                             max_ngram, headroom, eos):
    max_length = max(len(ids) + headroom, 1)
    expected = hf_draft(transformers, ids, num_tokens, max_ngram, max_length, eos)
    assert propose(ids, num_tokens, max_ngram, max_length=max_length,
                   eos_token_ids=eos) == expected


def test_default_ngram_size_is_two(transformers):
    ids = [5, 1, 2, 3, 9, 2, 7, 8, 1, 2]
    assert propose(ids, 3) == hf_draft(transformers, ids, 3, 2, 10**9, None) == [3, 9, 2]


@pytest.mark.parametrize("ids, num_tokens, max_ngram, draft", [
    # The first (oldest) occurrence of the last bigram wins over a more recent one.
    ([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 2, 2, [3, 4]),
    # No bigram match: falls back to the last unigram's first occurrence.
    ([7, 1, 8, 9, 3, 1], 3, 2, [8, 9, 3]),
    # A draft stops at the end of the sequence (it may run into the trailing n-gram).
    ([4, 4, 4], 5, 2, [4]),
    # Nothing before the trailing n-gram matches: no draft.
    ([1, 2, 3], 4, 2, []),
    ([], 4, 2, []),
    ([1], 4, 2, []),
])
def test_examples(ids, num_tokens, max_ngram, draft):
    assert propose(ids, num_tokens, max_ngram) == draft


def test_eos_cuts_the_draft_and_max_length_ends_it():
    ids = [1, 2, 3, 0, 5, 1, 2]
    assert propose(ids, 4) == [3, 0, 5, 1]
    assert propose(ids, 4, eos_token_ids=[0]) == [3]
    assert propose(ids, 4, eos_token_ids=[3]) == []
    assert propose(ids, 4, max_length=len(ids) + 1) == []  # the model's own token is the last


@pytest.mark.parametrize("num_tokens, max_ngram", [(0, 2), (3, 0), (-1, 2)])
def test_invalid_sizes_are_refused(num_tokens, max_ngram):
    with pytest.raises(ValueError):
        propose([1, 2, 1], num_tokens, max_ngram)
