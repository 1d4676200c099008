"""Inline policy specs for the group selectors, from Hugging Face `generate()`'s option names.

These are plain dicts in the policy YAML format (docs/policies.md); pass them as `policy=`
wherever a policy is taken, or let `SamplerClient.create_beam_group` / `create_cot_group` do it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


def _hf_chain(*, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
              min_new_tokens: int = 0) -> list[dict[str, Any]]:
    """The processors `generate()` adds for these options (only those switched on)."""
    chain: list[dict[str, Any]] = []
    if repetition_penalty != 1.0:
        chain.append({"repetition_penalty": {"penalty": repetition_penalty}})
    if no_repeat_ngram_size:
        chain.append({"no_repeat_ngram": {"size": no_repeat_ngram_size}})
    if min_new_tokens:
        chain.append({"min_tokens": {"min_tokens": min_new_tokens}})
    return chain


def beam_search_policy(num_beams: int, *, max_new_tokens: int, length_penalty: float = 1.0,
                       early_stopping: bool | str = False, num_return_sequences: int = 1,
                       num_beam_groups: int = 1, diversity_penalty: float = 0.0,
                       length_normalization: str = "hf", repetition_penalty: float = 1.0,
                       no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
                       stop_token_ids: Iterable[int] = ()) -> dict[str, Any]:
    """Beam search as `model.generate(num_beams=..., do_sample=False, ...)` runs it."""
    return {
        "chain": _hf_chain(repetition_penalty=repetition_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens),
        "select": {"beam": {
            "width": num_beams, "length_penalty": length_penalty,
            "length_normalization": length_normalization,
            "early_stopping": str(early_stopping).lower(),
            "num_return_sequences": num_return_sequences, "groups": num_beam_groups,
            "diversity_penalty": diversity_penalty}},
        "defaults": {"max_tokens": max_new_tokens, "stop_token_ids": list(stop_token_ids)},
    }


def cot_policy(k: int = 10, *, max_new_tokens: int, answer_after: Iterable[int] = (),
               repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> dict[str, Any]:
    """CoT decoding (Wang & Zhou 2024): k greedy branches from the k best first tokens."""
    return {
        "chain": _hf_chain(repetition_penalty=repetition_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size),
        "select": {"cot": {"k": k, "answer_after": list(answer_after)}},
        "defaults": {"max_tokens": max_new_tokens},
    }


def beam_group_config(prompt_ids: Iterable[int], num_beams: int, *, max_new_tokens: int,
                      eos_token_ids: Iterable[int] = (), sequence_id: str | None = None,
                      **options: Any) -> dict[str, Any]:
    """`create_sequences` keywords of a beam search group (options: `beam_search_policy`'s)."""
    return dict(policy=beam_search_policy(num_beams, max_new_tokens=max_new_tokens, **options),
                prompt_ids=prompt_ids, eos_token_ids=eos_token_ids, sequence_id=sequence_id)


def cot_group_config(prompt_ids: Iterable[int], k: int = 10, *, max_new_tokens: int,
                     answer_after: Iterable[int] = (), eos_token_ids: Iterable[int] = (),
                     sequence_id: str | None = None, **options: Any) -> dict[str, Any]:
    """`create_sequences` keywords of a CoT decoding group (options: `cot_policy`'s)."""
    return dict(policy=cot_policy(k, max_new_tokens=max_new_tokens, answer_after=answer_after,
                                  **options),
                prompt_ids=prompt_ids, eos_token_ids=eos_token_ids, sequence_id=sequence_id)


def fork_config(prompt_ids: Iterable[int], n: int, *, best_of: int = 0,
                policy: str | Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None, seed: int | None = None,
                eos_token_ids: Iterable[int] = (), sequence_id: str | None = None) -> dict[str, Any]:
    """`create_sequences` keywords of n forks of one prompt (vLLM n / best_of)."""
    return dict(policy=policy, prompt_ids=prompt_ids, seed=seed,
                params={**(params or {}), "n": n, "best_of": best_of},
                eos_token_ids=eos_token_ids, sequence_id=sequence_id)
