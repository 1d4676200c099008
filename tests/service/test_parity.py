"""The peers' spellings through the real server and SDK (sampler_service.policy.parity):
vLLM's top_k = -1 and ignore_eos, OpenAI's string-keyed logit_bias and top_logprobs, Hugging
Face's top-p boundary (`top_p_rule: hf`), llama.cpp's ranges in a stage, and the sequence
settings an inline spec takes from the request."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sampler_client.errors import InvalidArgumentError
from tests.unit.helpers import TOY_VOCABULARY


def forcing(token: int, width: int = 8, margin: float = 10.0) -> torch.Tensor:
    """Logits [width] whose argmax is `token`, by `margin`."""
    logits = torch.zeros(width)
    logits[token] = margin
    return logits


def refused_field(call) -> list[str]:
    with pytest.raises(InvalidArgumentError) as err:
        call()
    return err.value.fields


# -- vLLM: top_k = -1, ignore_eos ---------------------------------------------------------------
def test_top_k_minus_one_is_off_and_other_negatives_are_refused(client):
    assert client.explain_plan(params={"top_k": -1, "top_p": 0.9}) == \
        client.explain_plan(params={"top_k": 0, "top_p": 0.9})
    assert not any(step.startswith("top_k") for step in client.explain_plan(params={"top_k": -1}))
    seq = client.create_sequence(params={"top_k": -1, "temperature": 0.0})
    assert seq.step(forcing(5)).token_id == 5
    assert seq.info().resolved_spec["chain"][10]["top_k"]["k"] == 0
    assert refused_field(lambda: client.create_sequence(params={"top_k": -2})) == \
        ["sequences[0].params.top_k"]


def test_ignore_eos_keeps_generating_past_eos_until_a_stop_id(client):
    seq = client.create_sequence(params={"ignore_eos": True, "temperature": 0.0,
                                         "stop_token_ids": [2]}, eos_token_ids=[0])
    first = seq.step(forcing(0))
    assert first.token_id == 0 and not first.finished
    last = seq.step(forcing(2))
    assert (last.finished, last.finish_reason, last.stop_token_id) == (True, "stop", 2)
    assert seq.info().resolved_spec["defaults"]["ignore_eos"] is True
    plain = client.create_sequence(params={"temperature": 0.0}, eos_token_ids=[0])
    assert plain.step(forcing(0)).finish_reason == "stop"
    capped = client.create_sequence(params={"ignore_eos": True, "temperature": 0.0,
                                            "max_tokens": 2}, eos_token_ids=[0])
    assert [capped.step(forcing(0)).finish_reason for _ in range(2)] == [None, "length"]


def test_ignore_eos_still_lets_min_tokens_mask_eos(client):
    seq = client.create_sequence(params={"ignore_eos": True, "temperature": 0.0,
                                         "min_tokens": 1}, eos_token_ids=[0])
    assert seq.step(forcing(0, margin=1.0)).token_id != 0  # masked while short, as vLLM's
    assert seq.step(forcing(0)).token_id == 0


def test_ignore_eos_may_always_be_set_on_a_named_policy(client):
    seq = client.create_sequence(policy="greedy", params={"ignore_eos": True}, eos_token_ids=[0])
    assert not seq.step(forcing(0)).finished


def test_ignore_eos_with_structured_outputs_is_refused(client, xgrammar):
    tokenizer = client.register_tokenizer(TOY_VOCABULARY)
    fields = refused_field(lambda: client.create_sequence(
        params={"ignore_eos": True, "structured": {"regex": "ab+"}}, tokenizer=tokenizer))
    assert fields == ["sequences[0].params.ignore_eos"]


# -- OpenAI: logit_bias with string keys, top_logprobs -----------------------------------------
def test_logit_bias_with_openais_string_keys(client):
    seq = client.create_sequence(params={"temperature": 0.0, "logit_bias": {"3": 20, 0: -100}})
    assert seq.step(forcing(0)).token_id == 3
    inline = client.create_sequence(policy={"chain": [{"logit_bias": {"bias": {"3": 20}}}],
                                            "select": "greedy"})
    assert inline.step(forcing(0)).token_id == 3
    assert refused_field(lambda: client.create_sequence(
        params={"logit_bias": {"3": 100.5}})) == ["sequences[0].params.logit_bias[3]"]
    assert refused_field(lambda: client.create_sequence(
        params={"logit_bias": {"-3": 1}})) == ["sequences[0].params.logit_bias[-3]"]
    with pytest.raises(ValueError, match="must be a token id"):
        client.create_sequence(params={"logit_bias": {"eos": -100}})


def test_top_logprobs_is_openais_name_for_logprobs(client):
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]))
    seq = client.create_sequence(params={"top_logprobs": 2, "temperature": 0.0})
    choice = seq.step(logits)
    assert [t for t, _ in choice.top_logprobs] == [0, 1]
    named = client.create_sequence(policy="greedy", params={"top_logprobs": 3})
    assert len(named.step(logits).top_logprobs) == 3
    both = client.create_sequence(params={"top_logprobs": 1, "logprobs": 1})
    assert len(both.step(logits).top_logprobs) == 1
    assert refused_field(lambda: client.create_sequence(
        params={"top_logprobs": 1, "logprobs": 2})) == ["sequences[0].params.top_logprobs"]
    assert refused_field(lambda: client.create_sequence(
        params={"top_logprobs": 21})) == ["sequences[0].params.top_logprobs"]


# -- Hugging Face: top_p_rule = hf --------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p", [0.3, 0.9, 0.95])
def test_top_p_rule_hf_keeps_what_transformers_keeps(client, transformers, seed, p):
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(seed)) * 3
    survivors = client.preview(logits, params={"top_p": p, "top_p_rule": "hf"})
    theirs = transformers.TopPLogitsWarper(p)(None, logits.unsqueeze(0).clone())[0]
    assert {t for t, _ in survivors} == set(torch.isfinite(theirs).nonzero().flatten().tolist())


def test_top_p_rule_hf_on_the_boundary_through_an_inline_spec(client, transformers):
    """An inline spec carries p as a double (the wire's SamplingParams.top_p is a float), so a
    p on Hugging Face's boundary reaches the stage as written."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(11)) * 2
    ascending = torch.sort(logits)[0].softmax(dim=-1).cumsum(dim=-1)
    for index in (400, 700, 950):
        p = 1.0 - float(ascending[index])
        spec = {"chain": [{"top_p": {"p": p, "rule": "hf"}}], "select": "sample"}
        kept = {t for t, _ in client.preview(logits, policy=spec)}
        theirs = transformers.TopPLogitsWarper(p)(None, logits.unsqueeze(0).clone())[0]
        assert kept == set(torch.isfinite(theirs).nonzero().flatten().tolist())
    assert refused_field(lambda: client.create_sequence(
        params={"top_p": 0.9, "top_p_rule": "vllm"})) == ["sequences[0].params.top_p_rule"]


# -- llama.cpp's ranges in its stages -----------------------------------------------------------
def test_llama_cpp_stages_take_llama_cpps_ranges(client):
    spec = {"chain": [{"penalties": {"last_n": -1, "frequency": 5.0, "presence": -3.0}},
                      {"dry": {"multiplier": -0.5}}, {"xtc": {"probability": 1.5,
                                                              "min_keep": 0}},
                      {"temp_ext": {"temperature": -1.0}}],
            "select": {"mirostat": {"tau": -1.0, "eta": -0.1}}}
    seq = client.create_sequence(policy=spec, prompt_ids=[1, 1, 2])
    assert 0 <= seq.step(forcing(4)).token_id < 8
    assert refused_field(lambda: client.create_sequence(
        params={"frequency_penalty": 5.0})) == ["sequences[0].params.frequency_penalty"]


# -- inline specs: the request's settings --------------------------------------------------------
def test_an_inline_spec_takes_seed_and_settings_from_the_request(client):
    spec = {"chain": [{"temperature": {"temperature": 0.0}}], "select": "sample"}
    seq = client.create_sequence(policy=spec, seed=2 ** 64 - 1,
                                 params={"max_tokens": 2, "stop_token_ids": [6], "logprobs": 1})
    assert seq.seed == 2 ** 64 - 1 and seq.info().seed == 2 ** 64 - 1
    assert seq.step(forcing(3)).finish_reason is None
    assert seq.step(forcing(3)).finish_reason == "length"
    stopped = client.create_sequence(policy=spec, params={"stop_token_ids": [6]})
    assert stopped.step(forcing(6)).finish_reason == "stop"
    # Processor parameters still need the spec's `overridable`; a settings' value is checked.
    assert refused_field(lambda: client.create_sequence(policy=spec, params={"top_p": 0.5})) == \
        ["sequences[0].params.top_p"]
    assert refused_field(lambda: client.create_sequence(
        policy={**spec, "defaults": {"seed": float(2 ** 60 + 1)}})) == \
        ["sequences[0].policy_spec.defaults.seed"]


def test_the_same_seed_inline_or_flat_draws_the_same_tokens(client):
    logits = np.log(np.full(50, 1 / 50, dtype=np.float32))
    inline = client.create_sequence(policy={"chain": [], "select": "sample"}, seed=12345)
    flat = client.create_sequence(seed=12345)
    assert [inline.step(logits).token_id for _ in range(6)] == \
        [flat.step(logits).token_id for _ in range(6)]
