"""Resume records: what a sequence's tokens alone cannot rebuild, as plain data.

A sequence re-created at a position (after the service restarted) gets back its tokens from
the client and the rest from its last `ResumeRecord`: the running entropy summaries, the stage
memory that tokens cannot rebuild (mirostat's mu), and for a group its rows, scores and
finished hypotheses. Everything else (penalty counts, n-gram indexes, the finish state) is
rebuilt from the tokens, exactly as the uninterrupted run built it.

A record's `state` is plain data (numbers, strings, booleans, lists, mappings), so it travels
as a `google.protobuf.Struct` and is checked field by field when it comes back (`Reader`):
a malformed record is INVALID_ARGUMENT naming the field, never a failure later. Numbers are
doubles on the wire: every float the service keeps (Python floats, float32 scores) and every
token id survive the trip exactly.

Keys of a plain sequence's state (`row_state`): `ema_entropy`, `ema_varentropy`,
`entropy_sum`, `varentropy_sum`, `vocab_size` (0 before the first step) and, when a stage keeps memory a record carries, `memory`
({stage key: value}). A group row adds `output_ids` and their raw `entropies` and `varentropies`
(one double per id each, `packed_doubles`: the row's history for GetSequence; a record without
them restores NaN, as a plain sequence re-created without `stats` does). Groups: see each
group's `resume_state`.
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from sampler_service.errors import FailedPrecondition, InvalidArgument, echo

if TYPE_CHECKING:
    from sampler_service.state.sequence import SequenceState

#: The record format this service writes and reads.
RESUME_VERSION = 1
#: Token ids in a record are ids of an int32 vocabulary.
MAX_TOKEN_ID = 2 ** 31 - 1


@dataclass(frozen=True)
class ResumeRecord:
    """A sequence's state after `position` steps on the policy version hashed `policy_hash`,
    drawing noise with `seed`."""

    sequence_id: str
    position: int
    policy_hash: str
    seed: int
    state: dict[str, Any]
    version: int = RESUME_VERSION


@dataclass(frozen=True)
class ResumePoint:
    """Where a re-created sequence stands: its tokens (plain sequences), their raw statistics
    ((entropy, varentropy) per token, or empty), and its last record."""

    output_ids: tuple[int, ...] = ()
    stats: tuple[tuple[float, float], ...] = ()
    record: ResumeRecord | None = None


class Reader:
    """Typed access to plain data at `field`: each accessor raises InvalidArgument naming the
    exact field (`...record.state.rows[2].ema_entropy`) when a value is missing or wrong."""

    def __init__(self, data: Any, field: str):
        if not isinstance(data, dict):
            raise InvalidArgument(f"expected a mapping, got {echo(data)}", field)
        self.data, self.field = data, field

    def where(self, key: str) -> str:
        return f"{self.field}.{key}"

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise InvalidArgument(f"{key!r} is missing", self.where(key))
        return self.data[key]

    def number(self, key: str) -> float:
        """A finite number."""
        return _number(self._get(key), self.where(key), False)

    def score(self, key: str) -> float:
        """A number that may be -inf (masked scores), not NaN or +inf."""
        return _number(self._get(key), self.where(key), True)

    def integer(self, key: str, minimum: int = 0, maximum: int = MAX_TOKEN_ID) -> int:
        return whole(self._get(key), self.where(key), minimum, maximum)

    def flag(self, key: str) -> bool:
        return _flag(self._get(key), self.where(key))

    def flags(self, key: str, length: int | None = None) -> list[bool]:
        return [_flag(v, f"{self.where(key)}[{i}]") for i, v in enumerate(self.items(key, length))]

    def items(self, key: str, length: int | None = None) -> list[Any]:
        """A list (of `length` items when given)."""
        value = self._get(key)
        if not isinstance(value, list):
            raise InvalidArgument(f"expected a list, got {echo(value)}", self.where(key))
        if length is not None and len(value) != length:
            raise InvalidArgument(f"expected {length} items, got {len(value)}", self.where(key))
        return value

    def numbers(self, key: str, length: int | None = None, scores: bool = False) -> list[float]:
        """A list of finite numbers (`scores`: -inf allowed too)."""
        return [_number(v, f"{self.where(key)}[{i}]", scores)
                for i, v in enumerate(self.items(key, length))]

    def number_lists(self, key: str, lengths: Sequence[int]) -> list[list[float]]:
        """A list of lists of finite numbers, list i of `lengths[i]` numbers."""
        lists = self.items(key, len(lengths))
        holder = Reader({f"{key}[{i}]": v for i, v in enumerate(lists)}, self.field)
        return [holder.numbers(f"{key}[{i}]", n) for i, n in enumerate(lengths)]

    def token_ids(self, key: str) -> tuple[int, ...]:
        return tuple(whole(v, f"{self.where(key)}[{i}]", 0, MAX_TOKEN_ID)
                     for i, v in enumerate(self.items(key)))

    def readers(self, key: str, length: int | None = None) -> list["Reader"]:
        """A list of mappings, each as a Reader."""
        return [Reader(v, f"{self.where(key)}[{i}]") for i, v in enumerate(self.items(key, length))]

    def history(self, length: int) -> list[tuple[float, float]]:
        """(entropy, varentropy) of `length` tokens from `entropies` and `varentropies`
        (`packed_doubles`; NaN allowed: a step restored without them), or [] when the data
        has neither (the history then holds NaN)."""
        if "entropies" not in self.data and "varentropies" not in self.data:
            return []
        entropies, varentropies = (self._doubles(key, length)
                                   for key in ("entropies", "varentropies"))
        return list(zip(entropies, varentropies))

    def _doubles(self, key: str, length: int) -> list[float]:
        """`length` finite-or-NaN doubles packed by `packed_doubles`."""
        value, where = self._get(key), self.where(key)
        try:
            data = base64.b64decode(value, validate=True) if isinstance(value, str) else None
        except binascii.Error:
            data = None
        if data is None or len(data) != 8 * length:
            raise InvalidArgument(f"expected {length} doubles packed as base64 text "
                                  f"({8 * length} bytes), got {echo(value)}", where)
        values = np.frombuffer(data, dtype="<f8")
        infinite = np.isinf(values).nonzero()[0]
        if infinite.size:
            raise InvalidArgument(f"expected a finite number or NaN, got {values[infinite[0]]}",
                                  f"{where}[{int(infinite[0])}]")
        return values.tolist()

    def mapping(self, key: str, default: dict | None = None) -> dict[str, Any]:
        if key not in self.data and default is not None:
            return default
        value = self._get(key)
        if not isinstance(value, dict):
            raise InvalidArgument(f"expected a mapping, got {echo(value)}", self.where(key))
        return value


def _number(value: Any, field: str, minus_inf: bool) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
            or value == math.inf or (value == -math.inf and not minus_inf)):
        wanted = "a number or -inf" if minus_inf else "a finite number"
        raise InvalidArgument(f"expected {wanted}, got {echo(value)}", field)
    return float(value)


def packed_doubles(values: Iterable[float]) -> str:
    """Doubles as plain data: their little-endian IEEE 754 bytes as base64 text, 8 bytes each
    (one string per row: lists of numbers made a long beam group's record, built every step,
    2-5 times slower to encode as a Struct or as JSON)."""
    return base64.b64encode(np.fromiter(values, dtype="<f8").tobytes()).decode("ascii")


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"expected true or false, got {echo(value)}", field)
    return value


def whole(value: Any, field: str, minimum: int, maximum: int) -> int:
    """`value` as an int in [minimum, maximum] (a double holding a whole number is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise InvalidArgument(f"expected a whole number, got {echo(value)}", field)
    if not minimum <= value <= maximum:
        raise InvalidArgument(f"{echo(value)} is outside [{minimum}, {maximum}]", field)
    return int(value)


# -- one row (a plain sequence, or one row of a group) ------------------------------------------
def _stages(state: "SequenceState") -> dict[str, Any]:
    policy = state.policy
    return {link.stage.key: link.stage for link in (*policy.links, policy.selector)}


def row_state(state: "SequenceState", with_tokens: bool = False) -> dict[str, Any]:
    """The state of one row that its tokens cannot rebuild (see the module docstring);
    `with_tokens` (a group's row): its tokens and their raw statistics too."""
    data: dict[str, Any] = {
        "ema_entropy": state.ema_entropy, "ema_varentropy": state.ema_varentropy,
        "entropy_sum": state.entropy_sum, "varentropy_sum": state.varentropy_sum,
        "vocab_size": state.vocab_size}
    stages = _stages(state)
    memory = {}
    for key, value in state.processor_state.items():
        stage = stages.get(key)
        saved = None if stage is None else stage.saved_memory(value)
        if saved is not None:
            memory[key] = saved
    if memory:
        data["memory"] = memory
    if with_tokens:
        data["output_ids"] = list(state.output_ids)
        data["entropies"] = packed_doubles(state.entropies)
        data["varentropies"] = packed_doubles(state.varentropies)
    return data


def restore_row(state: "SequenceState", output_ids: Sequence[int], reader: Reader,
                tokens_field: str, stats: Sequence[tuple[float, float]] = (),
                stats_field: str = "", past_finish: bool = False) -> None:
    """Brings a fresh row to where `output_ids` and `reader` (its `row_state`) say it stood:
    the tokens are accepted again in order (history, counts, finish) and the summaries and
    stage memory taken from the record. `stats`: the tokens' raw (entropy, varentropy), or
    empty (the history then holds NaN). Errors name `tokens_field` and `stats_field`.
    `past_finish`: tokens may follow a stop id (a running beam that scored a hit continues
    as Hugging Face's does)."""
    if stats and len(stats) != len(output_ids):
        raise InvalidArgument(f"{len(stats)} stats for {len(output_ids)} output ids: send one "
                              "per token or none", stats_field)
    for index, token in enumerate(output_ids):
        if state.finished and not past_finish:
            raise InvalidArgument(
                f"token {index - 1} ({output_ids[index - 1]}) finished the sequence "
                f"({state.finish_reason.name}); no token can follow it",
                f"{tokens_field}[{index}]")
        entropy, varentropy = stats[index] if stats else (math.nan, math.nan)
        state.accept(token, entropy, varentropy)
    state.ema_entropy = reader.number("ema_entropy")
    state.ema_varentropy = reader.number("ema_varentropy")
    state.entropy_sum = reader.number("entropy_sum")
    state.varentropy_sum = reader.number("varentropy_sum")
    state.vocab_size = reader.integer("vocab_size")
    stages = _stages(state)
    memory = Reader(reader.mapping("memory", {}), reader.where("memory"))
    for key, value in memory.data.items():
        if key not in stages:
            raise InvalidArgument(f"the policy has no stage {echo(key)} to remember this for",
                                  memory.where(key))
        state.processor_state[key] = stages[key].restored_memory(value, memory.where(key))


def checked_record(point: ResumePoint, sequence_id: str, policy_hash: str, field: str,
                   position: int | None = None) -> ResumeRecord:
    """`point.record`, checked against the sequence being re-created: present, of a version
    this service reads, of this sequence, on the same policy version, and (when `position` is
    given) after that many steps."""
    record, where = point.record, f"{field}.record"
    if record is None:
        raise InvalidArgument("a re-created sequence needs the last resume record the service "
                              "returned for it (StepRequest.resume_records)", where)
    if record.version != RESUME_VERSION:
        raise InvalidArgument(f"record version {record.version}; this service reads version "
                              f"{RESUME_VERSION}", f"{where}.version")
    if record.sequence_id != sequence_id:
        raise InvalidArgument(f"the record is of sequence {echo(record.sequence_id)}, not "
                              f"{echo(sequence_id)}", f"{where}.sequence_id")
    if record.policy_hash != policy_hash:
        raise FailedPrecondition(
            f"the sequence ran on policy version {echo(record.policy_hash)} and the policy it "
            f"names is now {echo(policy_hash)}: its next tokens would differ from an "
            "uninterrupted run; re-create it with the spec it pinned (GetSequence's "
            "resolved_spec) or start it again", f"{where}.policy_hash")
    if position is not None and record.position != position:
        raise InvalidArgument(f"the record describes position {record.position}, but "
                              f"{position} output ids were given", f"{where}.position")
    return record
