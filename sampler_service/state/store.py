"""The map of live sequences: atomic creation, release, a cap and idle eviction."""
from __future__ import annotations

import threading
import time
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
    """

    def __init__(self, max_sequences: int = 100_000, idle_ttl_s: float = 3600.0,
                 clock=time.monotonic, max_state_bytes: int | None = None):
        self._sequences: dict[str, SequenceState] = {}
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
            if self._max_bytes is not None:
                held = sum(state_bytes(s) for s in self._sequences.values())
                wanted = sum(state_bytes(s) for s in states)
                if held + wanted > self._max_bytes:
                    raise ResourceExhausted(
                        f"live sequences hold about {held} bytes of state and these need "
                        f"{wanted} more; the cap is {self._max_bytes}: release finished "
                        "sequences or raise --max-state-bytes", "--max-state-bytes")
            now = self._clock()
            for state in states:
                state.last_used = now
                self._sequences[state.sequence_id] = state

    def put_back(self, states: Iterable[SequenceState]) -> None:
        """Adds restored sequences (`--state-dir`), idle since now: all, or none when an id
        is live (ALREADY_EXISTS). No cap applies: they were admitted before the restart."""
        states = list(states)
        with self._lock:
            for state in states:
                if state.sequence_id in self._sequences:
                    raise AlreadyExists(f"sequence {state.sequence_id!r} already exists",
                                        "sequence_id")
            now = self._clock()
            for state in states:
                state.last_used = now
                self._sequences[state.sequence_id] = state

    def release(self, sequence_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Removes sequences; returns (released, not_found)."""
        released, missing = [], []
        with self._lock:
            for sid in sequence_ids:
                (released if self._sequences.pop(sid, None) is not None else missing).append(sid)
        return released, missing

    def get(self, sequence_id: str, field: str = "sequence_id") -> SequenceState:
        """The live state, or NOT_FOUND naming `field`."""
        state = self._sequences.get(sequence_id)
        if state is None:
            raise NotFound(f"sequence {sequence_id!r} does not exist (never created, released, "
                           "or evicted after being idle)", field)
        state.last_used = self._clock()
        return state

    def snapshot(self) -> list:
        """The live sequences and groups now (a list: safe to iterate while others change)."""
        with self._lock:
            return list(self._sequences.values())

    def _evict_idle(self) -> None:
        if self._ttl <= 0:
            return
        deadline = self._clock() - self._ttl
        idle = [sid for sid, s in self._sequences.items() if s.last_used < deadline]
        for sid in idle:
            del self._sequences[sid]
        if idle and self.on_evict is not None:
            self.on_evict(idle)
