"""Sequence state: a branch (beam, fork, CoT path) continues without touching its source."""
from __future__ import annotations

import dataclasses

import pytest

from sampler_service.policy.spec import resolve_flat
from sampler_service.state import SequenceState
from sampler_service.state.history import TokenHistory

MUTABLE = (list, dict, set, TokenHistory)


def stepped_state() -> SequenceState:
    state = SequenceState("s", resolve_flat({"max_tokens": 10}), (1, 2, 3), 7, frozenset({0}))
    for token in (5, 6, 5):
        state.accept(token, 1.0, 0.5)
    state.processor_state["mirostat"] = 3.0
    return state


def test_a_branch_shares_no_mutable_field_with_its_source():
    source = stepped_state()
    branch = source.branch("s#1", seed=8)
    for field in dataclasses.fields(SequenceState):
        value = getattr(source, field.name)
        if isinstance(value, MUTABLE):
            assert getattr(branch, field.name) is not value, field.name


def test_a_branch_continues_alone_with_the_same_history():
    source = stepped_state()
    branch = source.branch("s#1", seed=8)
    assert (branch.sequence_id, branch.seed, branch.output_ids) == ("s#1", 8, [5, 6, 5])
    assert branch.history.output_counts()[1].tolist() == [2.0, 1.0]
    branch.accept(9, 2.0, 0.1)
    branch.processor_state["mirostat"] = 4.0
    assert source.output_ids == [5, 6, 5] and source.entropies == [1.0] * 3
    assert source.history.max_token_id == 6 and branch.history.max_token_id == 9
    assert sorted(source.history.seen_ids().tolist()) == [1, 2, 3, 5, 6]
    assert source.processor_state["mirostat"] == pytest.approx(3.0)
