"""LogitSoftcap: the math on hand-computed values, and the installed entry point in a policy."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_plugin_example import LogitSoftcap
from sampler_service.engine import Engine
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.plugins import load_plugins
from sampler_service.policy.processors.base import RowBatch, RowInputs
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
LOGITS = [0.0, 1.0, -1.0, 10.0, -math.inf]
#: 2 · tanh(l / 2) for each of LOGITS, by hand: tanh(0.5) = 0.46211716, tanh(5) = 0.99990920.
CAPPED_AT_2 = [0.0, 0.92423431, -0.92423431, 1.99981840, -math.inf]


@pytest.fixture(autouse=True)
def registered():
    """Registers the installed entry point, as the server does at start-up."""
    load_plugins()


def sequence(name: str, cap: float, select: str = "greedy") -> SequenceState:
    """A sequence whose policy is `logit_softcap` at `cap`, then `select`."""
    spec = {"chain": [{"logit_softcap": {"cap": cap}}], "select": select}
    policy = resolve(parse_policy("capped", spec), PolicyVersion(0, "x"), {})
    return SequenceState(name, policy, (1,), seed=0, eos_token_ids=frozenset())


def states(caps: list[float]) -> list[SequenceState]:
    return [sequence(f"s{i}", cap) for i, cap in enumerate(caps)]


def test_the_installed_entry_point_registers_the_processor():
    assert load_plugins() == {"logit_softcap": LogitSoftcap}


def test_capped_logits_equal_the_hand_values_and_an_off_row_is_untouched():
    """One batch with a row at cap 2 and a row at cap 0 (off). (A policy at cap 0 leaves the
    stage out of its plan altogether; the stage itself must still leave such a row alone.)"""
    logits = torch.tensor([LOGITS, LOGITS])
    candidates = Candidates(logits.clone())
    LogitSoftcap().apply(candidates, {"cap": torch.tensor([2.0, 0.0])}, RowBatch([], CPU))
    assert candidates.values[0].tolist() == pytest.approx(CAPPED_AT_2, abs=1e-6)
    assert torch.equal(candidates.values[1], logits[1])  # cap 0 is off: bit-identical


def test_a_policy_at_cap_zero_plans_no_stage():
    assert sequence("off", 0.0).policy.active_links == ()
    assert len(sequence("on", 2.0).policy.active_links) == 1


def test_capped_logits_stay_within_the_cap_in_order():
    logits = torch.linspace(-40.0, 40.0, 81).unsqueeze(0)
    candidates, _ = Engine(CPU).process(states([3.0]), logits.clone(), RowInputs(logits))
    capped = candidates.values[0]
    assert float(capped.abs().max()) <= 3.0
    assert bool((capped[1:] >= capped[:-1]).all())
    assert float(capped[40]) == 0.0


def test_a_sparse_batch_is_capped_like_a_dense_one():
    values = torch.tensor([[10.0, 1.0, 0.0, -1.0]])
    sparse = Candidates(values.clone(), ids=torch.tensor([[3, 1, 0, 2]]), vocab=5)
    LogitSoftcap().apply(sparse, {"cap": torch.tensor([2.0])}, RowBatch([], CPU))
    assert sparse.to_dense()[0].tolist() == pytest.approx(CAPPED_AT_2, abs=1e-6)


def test_the_distribution_is_the_softmax_of_the_capped_logits():
    probabilities = torch.exp(Engine(CPU).distribution(sequence("p", 2.0, "sample"),
                                                       torch.tensor(LOGITS)))
    weights = [math.exp(v) for v in CAPPED_AT_2]
    assert probabilities.tolist() == pytest.approx([w / sum(weights) for w in weights], abs=1e-6)
