"""SequenceStore: idle eviction least recently used first, and the bytes cap kept without
measuring every live sequence at each creation."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sampler_service.policy.spec import resolve_flat
from sampler_service.state import SequenceState
from sampler_service.state.store import SequenceStore, state_bytes


def state(sid: str, prompt: int = 4) -> SequenceState:
    return SequenceState(sid, resolve_flat({}), tuple(range(prompt)), seed=1,
                         eos_token_ids=frozenset())


def test_idle_sequences_are_evicted_by_last_use_not_by_creation():
    now = [0.0]
    evicted: list[str] = []
    store = SequenceStore(idle_ttl_s=10, clock=lambda: now[0])
    store.on_evict = evicted.extend
    store.add_all([state("a"), state("b"), state("c")])
    now[0] = 5.0
    store.get("a")  # used: idle since 5, while b and c are idle since 0
    now[0] = 12.0
    store.add_all([state("d")])
    assert sorted(evicted) == ["b", "c"]
    assert [s.sequence_id for s in store.snapshot()] == ["a", "d"]
    now[0] = 15.5
    store.add_all([state("e")])  # a (used at 5) is idle for 10.5 s now; d (at 12) is not
    assert sorted(evicted) == ["a", "b", "c"] and len(store) == 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "release", "wait"]),
                          st.integers(0, 7), st.integers(0, 40)), max_size=60))
def test_the_bytes_the_cap_counts_are_those_of_the_live_sequences(operations):
    """After any sequence of creations, steps (a used sequence grows), releases and idle
    evictions, the bytes held are the live sequences' `state_bytes`, measured afresh."""
    now = [0.0]
    store = SequenceStore(idle_ttl_s=30, clock=lambda: now[0], max_state_bytes=1 << 40)
    for operation, which, amount in operations:
        sid = f"s{which}"
        if operation == "add" and sid not in {s.sequence_id for s in store.snapshot()}:
            store.add_all([state(sid, amount)])
        elif operation == "grow" and sid in {s.sequence_id for s in store.snapshot()}:
            store.get(sid).output_ids.extend(range(amount))
        elif operation == "release":
            store.release([sid])
        elif operation == "wait":
            now[0] += amount
        store.add_all([])  # an admission: evicts and measures
        assert store._held_bytes() == sum(state_bytes(s) for s in store.snapshot())


def test_a_creation_measures_only_its_sequences_and_those_used_since(monkeypatch):
    from sampler_service.state import store as store_module
    store = SequenceStore(max_state_bytes=1 << 40)
    store.add_all([state(f"s{i}") for i in range(1000)])
    for sid in ("s3", "s500"):
        store.get(sid).output_ids.extend(range(10))
    measured: list[str] = []
    monkeypatch.setattr(store_module, "state_bytes",
                        lambda s: measured.append(s.sequence_id) or state_bytes(s))
    store.add_all([state("new")])
    assert sorted(measured) == ["new", "s3", "s500"]
    assert store._held_bytes() == sum(state_bytes(s) for s in store.snapshot())
