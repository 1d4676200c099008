"""Prompt lookup decoding's draft proposer: Hugging Face's `PromptLookupCandidateGenerator`
in plain Python, rule for rule (transformers/generation/candidate_generator.py).

`propose(ids, num_tokens, max_ngram)` looks for the sequence's last n-gram earlier in the
sequence (the prompt and the tokens generated so far) and proposes the tokens that followed it:

- n-gram sizes are tried from `min(max_ngram, len(ids) - 1)` down to 1, the first size with a
  usable match wins;
- for one size, the occurrences are scanned left to right (the *first*, i.e. oldest,
  occurrence in the sequence, not the most recent one); the trailing n-gram itself is an
  occurrence too, but nothing follows it, so it is skipped, as is any occurrence followed by
  nothing;
- the draft is the up to `num_tokens` ids that follow the occurrence, cut at the end of the
  sequence (so a draft may run into the trailing n-gram itself, and be shorter than
  `num_tokens`) and at the absolute position `max_length`;
- with `max_length` given, a sequence of `max_length - 1` ids gets no draft (the target model's
  own token is the last one);
- with `eos_token_ids` given, the draft is cut before its first EOS id (an EOS is never
  proposed); a draft cut to nothing is no draft (the generator does not look further);
- no match: no draft (`[]`), the caller takes a plain decoding step.

Hugging Face's generator also drops draft tokens its logits processors forbid (-inf); this
module has no processors, which is what `model.generate(prompt_lookup_num_tokens=k)` does with
greedy decoding and no processors configured.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["propose"]


def propose(ids: Sequence[int], num_tokens: int, max_ngram: int = 2, *,
            max_length: int | None = None,
            eos_token_ids: Iterable[int] | None = None) -> list[int]:
    """Up to `num_tokens` draft ids continuing `ids` (the prompt and the tokens so far), by
    prompt lookup; `[]` where nothing matches. See the module's docstring for the rule."""
    if max_ngram <= 0 or num_tokens <= 0:
        raise ValueError("Invalid max_matching_ngram_size or num_output_tokens")
    ids = list(ids)
    length = len(ids)
    if max_length is not None and max_length == length + 1:
        return []
    limit = length if max_length is None else min(length, max_length)
    chosen: list[int] = []
    for size in range(min(max_ngram, length - 1), 0, -1):
        tail = ids[length - size:]
        first = tail[0]
        found = False
        # Occurrences left to right, the trailing n-gram (start length - size) included.
        idx = -1
        while True:
            try:
                idx = ids.index(first, idx + 1, length - size + 1)
            except ValueError:
                break
            if ids[idx:idx + size] != tail:
                continue
            start = idx + size
            end = min(start + num_tokens, limit)
            if start < end:
                chosen = ids[start:end]
                found = True
                break
        if found:
            break
    if chosen and eos_token_ids is not None:
        eos = set(eos_token_ids)
        for i, token in enumerate(chosen):
            if token in eos:
                chosen = chosen[:i]
                break
    return chosen
