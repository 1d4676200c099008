"""The synchronous client: `SamplerClient`, `Sequence` and `StepStream`."""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Mapping, Sequence as SequenceT

import grpc

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_client import requests
from sampler_client.errors import SamplerError, from_rpc_error, from_status
from sampler_client.types import Choice, SequenceInfo

#: Matches the service's default: 64 rows of a 128256-token vocabulary in fp32, with room.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def choices_from(response: pb.StepResponse) -> list[Choice]:
    """The choices of a response, or the in-band error it carries, raised."""
    if response.HasField("error"):
        raise from_status(response.error)
    return [Choice.from_pb(c) for c in response.choices]


class SequenceHandle:
    """What a client knows of a live sequence: its id, policy and seed as created, and
    `next_step`, the step number its next step sends (a resend of the same number returns the
    recorded answer instead of advancing)."""

    def __init__(self, client: Any, created: pb.CreatedSequence):
        self.client = client
        self.sequence_id = created.sequence_id
        self.policy = created.policy
        self.seed = created.seed
        self.next_step = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.sequence_id!r}, policy={self.policy!r}, "
                f"next_step={self.next_step})")


class Sequence(SequenceHandle):
    """A live sequence of a `SamplerClient`."""

    def step(self, logits: Any, *, processed_logprobs: bool = False) -> Choice:
        """Chooses the next token from a 1-D (or [1, vocab]) logits row."""
        return self.client.step([self], logits, processed_logprobs=processed_logprobs)[0]

    def info(self) -> SequenceInfo:
        return self.client.get_sequence(self.sequence_id)

    def release(self) -> None:
        self.client.release([self])


def _advance(sequences: SequenceT[SequenceHandle], choices: list[Choice]) -> list[Choice]:
    for sequence, choice in zip(sequences, choices):
        sequence.next_step = choice.step + 1
    return choices


class SamplerClient:
    """Talks to a sampler service. Use as a context manager, or call `close()`.

    >>> with SamplerClient("127.0.0.1:50051") as client:
    ...     seq = client.create_sequence(policy="creative", prompt_ids=[1, 2, 3], seed=7)
    ...     choice = seq.step(logits)
    """

    def __init__(self, target: str, *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None):
        self._channel = channel or grpc.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = sampler_pb2_grpc.SamplerStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> "SamplerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Blocks until the channel connects (raises UnavailableError after `timeout`)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SamplerError(grpc.StatusCode.UNAVAILABLE,
                               f"service not reachable within {timeout}s") from None

    # -- sequences ----------------------------------------------------------------------------
    def create_sequence(self, policy: str | Mapping[str, Any] | None = None,
                        prompt_ids: Iterable[int] = (), seed: int | None = None,
                        params: Mapping[str, Any] | None = None, *, sequence_id: str | None = None,
                        eos_token_ids: Iterable[int] = ()) -> Sequence:
        """One sequence. `policy`: a registry name, an inline spec dict, or None for flat `params`."""
        return self.create_sequences([dict(policy=policy, prompt_ids=prompt_ids, seed=seed,
                                           params=params, sequence_id=sequence_id,
                                           eos_token_ids=eos_token_ids)])[0]

    def create_sequences(self, configs: Iterable[Mapping[str, Any]]) -> list[Sequence]:
        """Several sequences atomically; each config takes `create_sequence`'s keywords."""
        request = pb.CreateSequencesRequest(sequences=[
            requests.sequence_config(**{"sequence_id": None, "policy": None, "prompt_ids": (),
                                        "seed": None, "params": None, "eos_token_ids": (), **c})
            for c in configs])
        response = self._call(self._stub.CreateSequences, request)
        return [Sequence(self, created) for created in response.sequences]

    def release(self, sequences: Iterable[Sequence | str]) -> list[str]:
        """Releases sequences (objects or ids); returns the ids that were not found."""
        ids = [s if isinstance(s, str) else s.sequence_id for s in sequences]
        return list(self._call(self._stub.ReleaseSequences,
                               pb.ReleaseSequencesRequest(sequence_ids=ids)).not_found)

    def get_sequence(self, sequence_id: str) -> SequenceInfo:
        return SequenceInfo.from_pb(self._call(self._stub.GetSequence,
                                               pb.GetSequenceRequest(sequence_id=sequence_id)))

    # -- steps --------------------------------------------------------------------------------
    def step(self, sequences: SequenceT[Sequence], logits: Any, *,
             processed_logprobs: bool = False) -> list[Choice]:
        """One token per sequence from `logits` [len(sequences), vocab] (one row each)."""
        request = requests.step_request([(s.sequence_id, s.next_step) for s in sequences], logits,
                                        processed_logprobs=processed_logprobs)
        return _advance(sequences, choices_from(self._call(self._stub.Step, request)))

    def stream(self) -> "StepStream":
        """A StepStream: one long-lived bidirectional call for a generation loop."""
        return StepStream(self)

    # -- preview ------------------------------------------------------------------------------
    def preview(self, logits: Any, policy: str | Mapping[str, Any] | None = None, *,
                params: Mapping[str, Any] | None = None, history: Iterable[int] = (),
                prompt_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = (),
                max_candidates: int = 0) -> list[tuple[int, float]]:
        """Every token the policy would keep, with its renormalised probability, best first."""
        request = requests.preview_request(logits, policy=policy, params=params, history=history,
                                           prompt_ids=prompt_ids, eos_token_ids=eos_token_ids,
                                           max_candidates=max_candidates)
        response = self._call(self._stub.Preview, request)
        return [(c.token_id, c.probability) for c in response.candidates]


class StepStream:
    """Steps over one StepStream call: each `step` sends one request and reads its answer.

    A bad step raises its SamplerError without ending the stream. Close it (or use `with`).
    """

    _END = object()

    def __init__(self, client: SamplerClient):
        self._requests: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.last_service_micros = 0
        try:
            self._responses = client._stub.StepStream(iter(self._requests.get, self._END))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def __enter__(self) -> "StepStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._requests.put(self._END)

    def step(self, sequences: SequenceT[Sequence], logits: Any, *,
             processed_logprobs: bool = False) -> list[Choice]:
        request = requests.step_request([(s.sequence_id, s.next_step) for s in sequences], logits,
                                        processed_logprobs=processed_logprobs)
        with self._lock:
            self._requests.put(request)
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
        self.last_service_micros = response.service_micros
        return _advance(sequences, choices_from(response))
