"""ResolvedPolicy's plan: stages whose values are all off, and before greedy the argmax-keeping
stages that only such stages follow, are left out of the chain the engine runs, and leaving
them out changes no token, logprob or statistic."""
from __future__ import annotations

import dataclasses

import torch

from sampler_service.engine import Engine
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState
from tests.unit.helpers import random_logits

CPU = torch.device("cpu")


def keys(policy) -> list[str]:
    return [link.stage.key for link in policy.active_links]


def test_off_stages_leave_the_plan_and_the_spec_keeps_them():
    greedy, _, _ = PolicyRegistry.from_files().get("greedy")
    policy = resolve(greedy, PolicyVersion(1, "x"), {})
    assert keys(policy) == []
    assert len(policy.spec()["chain"]) == len(policy.links) == 7
    penalised = resolve(greedy, PolicyVersion(1, "x"), {"repetition_penalty": 1.2})
    assert keys(penalised) == ["repetition_penalty"]
    assert policy.signature != penalised.signature


def test_flat_parameters_plan_only_what_is_on():
    assert keys(resolve_flat({"temperature": 0.7, "top_k": 40})) == ["temperature", "top_k"]
    assert keys(resolve_flat({})) == []


def test_adaptive_stages_stay_even_when_off():
    """They explain their decision for every row, off or not."""
    spec = parse_policy("adaptive", {"chain": [{"edt": {"t0": 1.0, "theta": 0.0, "base": 1.0}},
                                               {"top_k": {"k": 0}}], "select": "sample"})
    assert keys(resolve(spec, PolicyVersion(1, "x"), {})) == ["edt"]


def test_dropped_stages_change_nothing():
    """The shipped `default` chain (every stage off) run as planned, and run whole."""
    default, _, _ = PolicyRegistry.from_files().get("default")
    planned = resolve(default, PolicyVersion(1, "x"), {"logprobs": 3})
    whole = dataclasses.replace(planned)
    object.__setattr__(whole, "active_links", whole.links)  # the chain as written
    assert keys(planned) == [] and len(keys(whole)) == 11
    logits = random_logits(3, rows=6, vocab=500)

    def outcomes(policy):
        states = [SequenceState(f"s{i}", policy, (1, 2), seed=i, eos_token_ids=frozenset({7}),
                                output_ids=[4, 4, 9]) for i in range(6)]
        return Engine(CPU).step(states, logits.clone(), processed_logprobs=True)

    assert outcomes(planned) == outcomes(whole)


def test_greedy_plans_away_the_argmax_keeping_stages_that_only_such_stages_follow():
    chain = [{"top_k": {"k": 5}}, {"repetition_penalty": {"penalty": 1.3}}, {"top_p": {"p": 0.5}},
             {"min_p": {"p": 0.2}}, {"top_n_sigma": {"n": 1.0}}]
    policy = resolve(parse_policy("planned", {"chain": chain, "select": "greedy"}),
                     PolicyVersion(1, "x"), {})
    assert keys(policy) == ["top_k", "repetition_penalty"]  # top-k before the penalty stays
    assert policy.explain_plan() == ["top_k(k=5, min_keep=1)", "repetition_penalty(penalty=1.3)",
                                     "greedy()"]
    sampled = resolve(parse_policy("drawn", {"chain": chain, "select": "sample"}),
                      PolicyVersion(1, "x"), {})
    assert len(keys(sampled)) == 5  # a drawing selector keeps every stage


def test_typical_and_temperature_are_not_planned_away_before_greedy():
    """Typical-p can remove the best token; dividing by T can make two logits equal."""
    spec = parse_policy("kept", {"chain": [{"temperature": {"temperature": 0.7}},
                                           {"typical_p": {"p": 0.5}}], "select": "greedy"})
    assert keys(resolve(spec, PolicyVersion(1, "x"), {})) == ["temperature", "typical_p"]


def test_planned_away_stages_change_no_greedy_choice():
    """Greedy after argmax-keeping masks, planned and run whole, on rows with ties at the max."""
    spec = parse_policy("planned", {"chain": [
        {"repetition_penalty": {"penalty": 1.3}}, {"top_k": {"k": 3}}, {"top_p": {"p": 0.3}},
        {"min_p": {"p": 0.5}}, {"top_n_sigma": {"n": 0.5}}, {"epsilon_cutoff": {"epsilon": 0.01}}],
        "select": "greedy"})
    planned = resolve(spec, PolicyVersion(1, "x"), {"logprobs": 2})
    whole = dataclasses.replace(planned)
    object.__setattr__(whole, "active_links", whole.links)
    assert keys(planned) == ["repetition_penalty"] and len(keys(whole)) == 6
    logits = random_logits(5, rows=16, vocab=300)
    logits[::3, 10] = logits[::3, 200] = logits[::3].amax(dim=1) + 1.0  # ties: lowest id wins

    def outcomes(policy):
        states = [SequenceState(f"s{i}", policy, (1, 2), seed=i, eos_token_ids=frozenset({7}),
                                output_ids=[4, 4, 9]) for i in range(16)]
        return Engine(CPU).step(states, logits.clone(), processed_logprobs=True)

    assert outcomes(planned) == outcomes(whole)
    assert all(o.token_id == 10 for o in outcomes(planned)[::3])
