"""Crash replay: a client's sequences outlive a restart of the service (docs/replay.md).

With replay on (the clients' default), every step asks for resume records
(`StepRequest.resume_records`) and each handle keeps a `Resumption`: the SequenceConfig it was
created with, the ids and raw statistics it received (plain sequences; appended per step) and
its last `ResumeRecord` (which carries a group's rows). A step that fails because the service
went away or came back without the step's sequences or regions is retried by `Replay.run`:

- UNAVAILABLE: wait for the service (grpc.health.v1 Check, which the channel's service config
  lets wait for a connection; a NOT_SERVING answer is asked again after an exponential
  backoff), then send the step again;
- NOT_FOUND naming a region (`...region`): free the client's idle regions (each is made and
  registered anew when next lent), send again;
- NOT_FOUND naming a row's sequence the client keeps: re-create the request's sequences where
  the client stands (CreateSequences with `resume`; one the service still has, ALREADY_EXISTS,
  stays), send again;
- while replaying, FAILED_PRECONDITION naming a row's step (the service has that sequence at
  another position, e.g. restored from an older snapshot): release it, re-create it, send again.

The step goes again with the same step numbers: the service is deterministic, so a re-created
sequence answers the token an uninterrupted run would have, and a service that had committed
the step answers its record. The caller sees only latency, unless the service is not back
within `timeout` seconds of the first failure (UnavailableError), or refuses the re-creation
(e.g. FAILED_PRECONDITION: the policy changed since), which is raised as it is.

`sequence_info` does the same for GetSequence of a handle (re-created on NOT_FOUND), and
`release` keeps a release of a handle the service lost from reporting it not found, and
drops a handle's resumption before its release is sent.
"""
from __future__ import annotations

import logging
import re
import time
from array import array
from typing import Any, Callable, Iterable, Sequence, TypeVar

import grpc

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.calls import Exchange, Pause, Rpc
from sampler_client.errors import (AlreadyExistsError, NotFoundError, SamplerError,
                                   UnavailableError)
from sampler_client.health import SERVING, HealthCheckRequest
from sampler_client.transports import TensorPlacer
from sampler_client.types import Choice

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The service whose health replay waits for.
SAMPLER_SERVICE = "sampler.v1.Sampler"
#: Backoff between health checks answered NOT_SERVING (or failed): first and longest wait.
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0
_ROW_FIELD = re.compile(r"rows\[(\d+)\]\.(sequence_id|step)")
_CREATE_FIELD = re.compile(r"sequences\[(\d+)\]\.sequence_id")
_TOKENIZER_FIELD = re.compile(r"sequences\[(\d+)\]\.tokenizer")


class Resumption:
    """What a client keeps of one live sequence or group to re-create it where it stands:
    `config` as created; for a plain sequence the ids it received and their raw entropy and
    varentropy (arrays, appended once per step); `record`, the last ResumeRecord (None
    before the first step)."""

    __slots__ = ("config", "plain", "output_ids", "entropies", "varentropies", "record",
                 "tokenizer")

    def __init__(self, config: pb.SequenceConfig, plain: bool,
                 tokenizer: pb.RegisterTokenizerRequest | None = None):
        self.config = config
        self.plain = plain
        #: The registration of the tokenizer the config names, when this client made it: a
        #: restarted service that forgot the vocabulary is taught it again.
        self.tokenizer = tokenizer
        self.output_ids = array("i")
        self.entropies = array("f")  # Choice.stats are float32: kept exactly
        self.varentropies = array("f")
        self.record: pb.ResumeRecord | None = None

    def took(self, choices: Sequence[Choice], record: pb.ResumeRecord) -> None:
        """Follows one answered step: its choices of this sequence and its record."""
        if self.plain:
            choice = choices[0]
            tokens = choice.accepted_token_ids or [choice.token_id]
            stats = choice.accepted_stats or [(choice.entropy, choice.varentropy)]
            self.output_ids.extend(tokens)
            self.entropies.extend(e for e, _ in stats)
            self.varentropies.extend(v for _, v in stats)
        self.record = record

    def config_now(self) -> pb.SequenceConfig:
        """The SequenceConfig that re-creates the sequence where it stands (as created, before
        its first step)."""
        config = pb.SequenceConfig()
        config.CopyFrom(self.config)
        if self.record is not None:
            config.resume.record.CopyFrom(self.record)
            config.resume.output_ids.extend(self.output_ids)
            config.resume.stats.extend(pb.StepStats(entropy=e, varentropy=v)
                                       for e, v in zip(self.entropies, self.varentropies))
        return config


def release(sequences: Iterable[Any]) -> Exchange[list[str]]:
    """ReleaseSequences of `sequences` (handles or ids); returns the ids the service did not
    find, less those of handles replay kept (a restart lost them: to the caller they were
    live, and are released now). The handles' resumptions are dropped before the call, so a
    step racing the release (answered NOT_FOUND) is not replayed into re-creating what the
    caller released."""
    sequences = list(sequences)
    kept = set()
    for sequence in sequences:
        if not isinstance(sequence, str) and sequence.resumption is not None:
            kept.add(sequence.sequence_id)
            sequence.resumption = None
    response = yield Rpc("ReleaseSequences", pb.ReleaseSequencesRequest(
        sequence_ids=[s if isinstance(s, str) else s.sequence_id for s in sequences]))
    return [sid for sid in response.not_found if sid not in kept]


def sequence_info(sequence: Any) -> Exchange[pb.SequenceInfo]:
    """GetSequence of a handle or an id. A kept handle the service lost (NOT_FOUND: it
    restarted, or evicted the sequence when idle) is re-created where it stands and asked
    again, unless it is a group that finished (the service refuses to re-create one; its
    result came with its last step)."""
    handle = None if isinstance(sequence, str) else sequence
    request = pb.GetSequenceRequest(sequence_id=sequence if handle is None else handle.sequence_id)
    try:
        return (yield Rpc("GetSequence", request))
    except NotFoundError:
        if handle is None or handle.resumption is None or handle.result is not None:
            raise
    yield from recreate([handle])
    return (yield Rpc("GetSequence", request))


def _rows_named(error: SamplerError, what: str, handles: Sequence[Any]) -> list[Any]:
    """The kept handles whose rows the error's fields name as `rows[i].<what>`."""
    rows = [handle for handle in handles for _ in handle.row_keys()]
    named = []
    for field in error.fields:
        match = _ROW_FIELD.fullmatch(field)
        if match and match[2] == what and int(match[1]) < len(rows):
            handle = rows[int(match[1])]
            if handle.resumption is not None and handle not in named:
                named.append(handle)
    return named


class Replay:
    """Retries a client's steps across restarts of the service, for up to `timeout` seconds
    after a step first failed (`clock`: seconds, monotonic)."""

    def __init__(self, timeout: float = 120.0, clock: Callable[[], float] = time.monotonic):
        if not timeout > 0:
            raise ValueError(f"replay_timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self.clock = clock

    def run(self, attempt: Callable[[], Exchange[T]], handles: Sequence[Any],
            placer: TensorPlacer) -> Exchange[T]:
        """The result of `attempt()` (a fresh exchange of the same step each call), recovering
        from the failures listed in the module's docstring until it answers."""
        deadline: float | None = None
        recovery: Exchange[None] | None = None
        while True:
            try:
                if recovery is not None:
                    yield from recovery  # its own failure is recovered from in turn
                return (yield from attempt())
            except SamplerError as error:
                failure = error
            replaying = deadline is not None
            if deadline is None:
                deadline = self.clock() + self.timeout
            recovery = self._recovery(failure, handles, placer, deadline, replaying)
            if recovery is None or self.clock() >= deadline:
                raise failure
            if not replaying:
                names = [h.sequence_id for h in handles]
                log.warning("a step of %s failed (%s): replaying it", ", ".join(names[:3])
                            + (f" and {len(names) - 3} more" if len(names) > 3 else ""), failure)

    def _recovery(self, failure: SamplerError, handles: Sequence[Any], placer: TensorPlacer,
                  deadline: float, replaying: bool) -> Exchange[None] | None:
        """What to do before sending the step again; None: raise the failure."""
        if failure.code == grpc.StatusCode.UNAVAILABLE:
            return self._wait_for_service(deadline, failure)
        if failure.code == grpc.StatusCode.NOT_FOUND:
            if any(field.endswith(".region") for field in failure.fields):
                return _renew_regions(placer)
            if _rows_named(failure, "sequence_id", handles):
                return recreate([h for h in handles if h.resumption is not None])
        if failure.code == grpc.StatusCode.FAILED_PRECONDITION and replaying:
            moved = _rows_named(failure, "step", handles)
            if moved:
                return self._release_and_recreate(moved)
        return None

    def _wait_for_service(self, deadline: float, failure: SamplerError) -> Exchange[None]:
        """Returns once the service answers SERVING; UnavailableError past `deadline`."""
        delay = FIRST_BACKOFF_S
        while True:
            left = deadline - self.clock()
            if left <= 0:
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                       f"the service was not back within replay_timeout "
                                       f"({self.timeout:g} s) after: {failure}")
            try:
                answer = yield Rpc("Check", HealthCheckRequest(service=SAMPLER_SERVICE),
                                   timeout=left)
                if answer.status == SERVING:
                    return
            except SamplerError as error:
                if error.code not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            yield Pause(min(delay, max(deadline - self.clock(), 0.0)))
            delay = min(2 * delay, MAX_BACKOFF_S)

    @staticmethod
    def _release_and_recreate(handles: Sequence[Any]) -> Exchange[None]:
        yield Rpc("ReleaseSequences", pb.ReleaseSequencesRequest(
            sequence_ids=[h.sequence_id for h in handles]))
        yield from recreate(handles)


def _renew_regions(placer: TensorPlacer) -> Exchange[None]:
    """Frees the client's idle regions (`TensorPlacer.renew_regions`); makes no call."""
    placer.renew_regions()
    yield from ()


def recreate(handles: Sequence[Any]) -> Exchange[None]:
    """Creates each kept sequence of `handles` where it stands, all in one call; one the
    service already has (ALREADY_EXISTS, which names one per call) is left as it is, and a
    tokenizer the service forgot (NOT_FOUND naming one's `tokenizer`) is registered again."""
    pending = {handle.sequence_id: handle for handle in handles}
    while pending:
        request = pb.CreateSequencesRequest(sequences=[h.resumption.config_now()
                                                       for h in pending.values()])
        try:
            response = yield Rpc("CreateSequences", request)
        except NotFoundError as error:
            forgotten = [int(m[1]) for m in map(_TOKENIZER_FIELD.fullmatch, error.fields) if m]
            registration = (list(pending.values())[forgotten[0]].resumption.tokenizer
                            if forgotten else None)
            if registration is None:
                raise
            yield Rpc("RegisterTokenizer", registration)
            continue
        except AlreadyExistsError as error:
            there = [int(m[1]) for m in map(_CREATE_FIELD.fullmatch, error.fields) if m]
            if not there:
                raise
            del pending[request.sequences[there[0]].sequence_id]
            continue
        for handle, created in zip(pending.values(), response.sequences):
            handle.seed = created.seed  # a new draw only if it had neither seed nor step
        return
