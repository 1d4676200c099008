"""Every processor and selector through the service: Preview gives the distribution the
in-process engine computes for the same policy, logits, history and prompt."""
from __future__ import annotations

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.policy.examples import STAGE_EXAMPLES
from sampler_service.policy.plugins import PLUGINS
from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.selectors import SELECTORS
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState

VOCAB = 64
PROMPT = [1, 2, 3]
EOS = [2]
#: A history that repeats itself, so penalties, n-gram bans and DRY have something to act on.
HISTORIES = {"first step": [], "later step": [5, 6, 13, 5, 6, 13, 5, 6]}


def spec_for(key: str) -> dict:
    if key in SELECTORS:
        return {"chain": [{"top_k": {"k": 20}}], "select": {key: STAGE_EXAMPLES[key]}}
    return {"chain": [{key: STAGE_EXAMPLES[key]}], "select": "sample"}


def in_process(spec: dict, logits: torch.Tensor, history: list[int],
               reference: torch.Tensor) -> torch.Tensor:
    policy = resolve(parse_policy("inline", spec), PolicyVersion(0, "x"), {})
    state = SequenceState("preview", policy, tuple(PROMPT), seed=0, eos_token_ids=frozenset(EOS),
                          output_ids=list(history))
    return torch.exp(Engine(torch.device("cpu")).distribution(state, logits, reference))


def test_every_stage_has_an_example():
    """Every built-in stage; plug-ins (registered when a server starts) bring their own docs."""
    assert set(STAGE_EXAMPLES) == (set(PROCESSORS) | set(SELECTORS)) - set(PLUGINS)


@pytest.mark.parametrize("history", list(HISTORIES.values()), ids=list(HISTORIES))
@pytest.mark.parametrize("key", sorted(set(STAGE_EXAMPLES) - {"structured"}))  # needs a
# tokenizer, which a preview has not: tests/unit/policy/test_structured.py
def test_preview_equals_the_in_process_distribution(client, key, history):
    generator = torch.Generator().manual_seed(len(key))
    logits = torch.randn(VOCAB, generator=generator) * 2
    reference = torch.randn(VOCAB, generator=generator) * 2  # read by kl_temperature only
    spec = spec_for(key)
    expected = in_process(spec, logits, history, reference)
    survivors = client.preview(logits, policy=spec, history=history, prompt_ids=PROMPT,
                               eos_token_ids=EOS, reference_logits=reference)
    assert {t for t, _ in survivors} == set(expected.nonzero().squeeze(1).tolist())
    for token, probability in survivors:
        assert probability == pytest.approx(float(expected[token]), rel=1e-5, abs=1e-7)
    assert sum(p for _, p in survivors) == pytest.approx(1.0, abs=1e-5)
