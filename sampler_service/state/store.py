"""The map of live sequences: atomic creation, release, a cap and idle eviction."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable

from sampler_service.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from sampler_service.state.sequence import SequenceState


#: Estimated bytes of a sequence's state besides its tokens (the state object, its policy
#: reference, seed, stage memory and statistics summaries), and per token it holds (the id in
#: its list and its share of the penalty counts and history indexes).
STATE_BASE_BYTES = 2048
STATE_TOKEN_BYTES = 64


def state_bytes(state) -> int:
    """The estimated memory a live sequence or group holds (see `STATE_TOKEN_BYTES`)."""
    return STATE_BASE_BYTES + STATE_TOKEN_BYTES * state.footprint_tokens()


class SequenceStore:
    """Thread-safe map from sequence id to `SequenceState`.

    `max_sequences` caps live sequences (RESOURCE_EXHAUSTED beyond it); sequences idle for more
    than `idle_ttl_s` seconds are evicted when new ones are created (0 disables eviction).
    `max_state_bytes` is admission control on the memory all sequences hold together: new
    sequences are refused (RESOURCE_EXHAUSTED naming --max-state-bytes) while the live ones'
    `state_bytes` and theirs would pass it; steps are never refused by it (a running
    generation is not cut short), and finished or idle sequences free it when released or
    evicted. None: no cap. `on_evict`, when set, is called with the ids of the sequences each
    eviction removed (the journal of `--state-dir` records them).

    A creation costs O(its sequences + those it evicts + those used since the last one), never
    O(live sequences): the map is kept least recently used first, so eviction stops at the
    first sequence that is not idle, and each sequence's bytes are kept as last measured,
    measured again only once it was used (a step may have grown it). Each step's `get` moves
    its sequence to the end of the map (O(1)); every map operation is one call under the GIL,
    so `snapshot` from another thread never sees it half done.
    """

    def __init__(self, max_sequences: int = 100_000, idle_ttl_s: float = 3600.0,
                 clock=time.monotonic, max_state_bytes: int | None = None):
        #: Least recently used first (`get` moves a sequence to the end).
        self._sequences: OrderedDict[str, SequenceState] = OrderedDict()
        #: With a bytes cap: each live sequence's `state_bytes` as last measured, their total,
        #: and the ids used since (measured again at the next admission).
        self._bytes: dict[str, int] = {}
        self._held = 0
        self._used: set[str] = set()
        self._lock = threading.Lock()
        self._max = max_sequences
        self._ttl = idle_ttl_s
        self._clock = clock
        self._max_bytes = max_state_bytes
        self.on_evict: Callable[[list[str]], None] | None = None

    def __len__(self) -> int:
        return len(self._sequences)

    def add_all(self, states: list[SequenceState]) -> None:
        """Adds every state or none (ALREADY_EXISTS / INVALID_ARGUMENT / RESOURCE_EXHAUSTED)."""
        with self._lock:
            self._evict_idle()
            seen: set[str] = set()
            for index, state in enumerate(states):
                field = f"sequences[{index}].sequence_id"
                if state.sequence_id in self._sequences:
                    raise AlreadyExists(f"sequence {state.sequence_id!r} already exists; release it "
                                        "first or choose another id", field)
                if state.sequence_id in seen:
                    raise InvalidArgument(f"sequence {state.sequence_id!r} appears twice in this "
                                          "request", field)
                seen.add(state.sequence_id)
            if len(self._sequences) + len(states) > self._max:
                raise ResourceExhausted(
                    f"{len(self._sequences)} sequences are live and the cap is {self._max}: "
                    "release finished sequences or raise --max-sequences", "--max-sequences")
            sizes = None
            if self._max_bytes is not None:
                held = self._held_bytes()
                sizes = [state_bytes(s) for s in states]
                wanted = sum(sizes)
                if held + wanted > self._max_bytes:
                    raise ResourceExhausted(
                        f"live sequences hold about {held} bytes of state and these need "
                        f"{wanted} more; the cap is {self._max_bytes}: release finished "
                        "sequences or raise --max-state-bytes", "--max-state-bytes")
            self._admit(states, sizes)

    def put_back(self, states: Iterable[SequenceState]) -> None:
        """Adds restored sequences (`--state-dir`), idle since now: all, or none when an id
        is live (ALREADY_EXISTS). No cap applies: they were admitted before the restart."""
        states = list(states)
        with self._lock:
            for state in states:
                if state.sequence_id in self._sequences:
                    raise AlreadyExists(f"sequence {state.sequence_id!r} already exists",
                                        "sequence_id")
            self._admit(states)

    def _admit(self, states: list[SequenceState], sizes: list[int] | None = None) -> None:
        """Adds `states`, used now, with their `state_bytes` (`sizes`, when measured)."""
        now = self._clock()
        for state in states:
            state.last_used = now
            self._sequences[state.sequence_id] = state
        if self._max_bytes is not None:
            sizes = [state_bytes(s) for s in states] if sizes is None else sizes
            self._bytes.update(zip((s.sequence_id for s in states), sizes))
            self._held += sum(sizes)

    def release(self, sequence_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Removes sequences; returns (released, not_found)."""
        released, missing = [], []
        with self._lock:
            for sid in sequence_ids:
                if self._sequences.pop(sid, None) is None:
                    missing.append(sid)
                else:
                    self._forget(sid)
                    released.append(sid)
        return released, missing

    def _forget(self, sequence_id: str) -> None:
        """Drops a removed sequence's measured bytes."""
        if self._max_bytes is not None:
            self._held -= self._bytes.pop(sequence_id)
            self._used.discard(sequence_id)

    def _held_bytes(self) -> int:
        """The live sequences' `state_bytes`, those used since the last call measured again."""
        for sid in self._used:
            size = state_bytes(self._sequences[sid])
            self._held += size - self._bytes[sid]
            self._bytes[sid] = size
        self._used.clear()
        return self._held

    def get(self, sequence_id: str, field: str = "sequence_id") -> SequenceState:
        """The live state, or NOT_FOUND naming `field`."""
        state = self._sequences.get(sequence_id)
        if state is None:
            raise NotFound(f"sequence {sequence_id!r} does not exist (never created, released, "
                           "or evicted after being idle)", field)
        state.last_used = self._clock()
        self._sequences.move_to_end(sequence_id)
        if self._max_bytes is not None:
            self._used.add(sequence_id)
        return state

    def snapshot(self) -> list:
        """The live sequences and groups now (a list: safe to iterate while others change)."""
        with self._lock:
            return list(self._sequences.values())

    def _evict_idle(self) -> None:
        """Removes the sequences idle for longer than the TTL: the first ones of the map."""
        if self._ttl <= 0:
            return
        deadline = self._clock() - self._ttl
        idle = []
        while self._sequences:
            sid, state = next(iter(self._sequences.items()))
            if state.last_used >= deadline:
                break
            del self._sequences[sid]
            self._forget(sid)
            idle.append(sid)
        if idle and self.on_evict is not None:
            self.on_evict(idle)
