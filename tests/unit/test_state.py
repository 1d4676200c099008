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


def test_the_state_memory_cap_admits_new_sequences_only_while_it_holds():
    """--max-state-bytes: a creation that would pass the cap is refused naming the flag,
    nothing of it is added, and releasing frees room; steps are never refused by it."""
    from sampler_service.errors import ResourceExhausted
    from sampler_service.state.store import SequenceStore, state_bytes

    def state(sid: str, prompt: int) -> SequenceState:
        return SequenceState(sid, resolve_flat({}), tuple(range(prompt)), seed=1,
                             eos_token_ids=frozenset())

    one = state_bytes(state("x", 100))
    store = SequenceStore(max_state_bytes=2 * one + 10)
    store.add_all([state("a", 100), state("b", 100)])
    with pytest.raises(ResourceExhausted) as err:
        store.add_all([state("c", 100)])
    assert err.value.field == "--max-state-bytes" and "the cap is" in err.value.message
    assert len(store) == 2
    store.get("a").output_ids.extend(range(50))  # a running generation grows past the cap
    assert state_bytes(store.get("a")) > one
    store.release(["a", "b"])
    store.add_all([state("c", 100)])
    assert len(store) == 1


def test_a_prompt_past_the_cap_is_refused_naming_the_flag():
    import torch

    from sampler_service.engine import Engine
    from sampler_service.errors import ResourceExhausted
    from sampler_service.policy.registry import PolicyRegistry
    from sampler_service.service import SamplerCore, SequenceRequest
    from sampler_service.state.store import SequenceStore
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")),
                       max_prompt_tokens=8)
    core.create_sequences([SequenceRequest("fits", prompt_ids=tuple(range(8)))])
    with pytest.raises(ResourceExhausted) as err:
        core.create_sequences([SequenceRequest("long", prompt_ids=tuple(range(9)))])
    assert err.value.field == "--max-prompt-tokens"
    assert "sequences[0].prompt_ids holds 9 tokens; the cap is 8" in err.value.message
    assert len(core.store) == 1


def _state(**flat) -> SequenceState:
    return SequenceState("s", resolve_flat(flat), (), 0, frozenset({0, 1}))


@pytest.mark.parametrize("eos", [0, 1])
def test_ignore_eos_lets_eos_be_a_token_like_any_other(eos):
    """vLLM's ignore_eos: EOS does not finish; stop_token_ids and max_tokens still do."""
    state = _state(ignore_eos=True, stop_token_ids=[7], max_tokens=4)
    state.accept(eos, 0.0, 0.0)
    assert not state.finished and state.stop_token_id is None
    state.accept(7, 0.0, 0.0)
    assert state.finish_label == "STOP" and state.stop_token_id == 7
    long = _state(ignore_eos=True, max_tokens=3)
    for token in (eos, eos, eos):
        long.accept(token, 0.0, 0.0)
    assert long.finish_label == "LENGTH"
    plain = _state(stop_token_ids=[7])
    plain.accept(eos, 0.0, 0.0)
    assert plain.finish_label == "STOP" and plain.stop_token_id == eos


def test_ignore_eos_changes_the_finishing_ids_not_the_masked_ones():
    state = _state(ignore_eos=True, stop_token_ids=[7])
    assert state.stop_ids == {7} and state.min_tokens_ids == {0, 1, 7}
    assert _state(stop_token_ids=[7]).stop_ids == {0, 1, 7}
