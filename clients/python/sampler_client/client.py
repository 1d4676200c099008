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
from sampler_client import specs
from sampler_client.types import Choice, GroupResult, SequenceInfo

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
    """What a client knows of a live sequence or group: its id, policy and seed as created,
    `next_step`, the step number its next step sends (a resend of the same number returns the
    recorded answer instead of advancing), and for a group its kind, how many rows the next
    step sends (`running_rows`) and, once it finished, its `result`."""

    def __init__(self, client: Any, created: pb.CreatedSequence):
        self.client = client
        self.sequence_id = created.sequence_id
        self.policy = created.policy
        self.seed = created.seed
        self.group_kind = created.group_kind
        self.running_rows = created.running_rows or 1
        self.result: GroupResult | None = None
        self.next_step = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.sequence_id!r}, policy={self.policy!r}, "
                f"next_step={self.next_step})")

    def row_keys(self) -> list[tuple[str, int, int | None]]:
        """(id, step, branch) of each row the next step sends."""
        if not self.group_kind:
            return [(self.sequence_id, self.next_step, None)]
        return [(self.sequence_id, self.next_step, b) for b in range(self.running_rows)]

    def _take(self, choices: list[Choice], results: dict[str, GroupResult]) -> None:
        """Follows this handle's choices of an answer (and its group result, if any)."""
        self.next_step = choices[0].step + 1
        if self.group_kind:
            self.running_rows = sum(not c.finished for c in choices)
            self.result = results.get(self.sequence_id, self.result)


class Sequence(SequenceHandle):
    """A live sequence of a `SamplerClient`."""

    def step(self, logits: Any, *, processed_logprobs: bool = False, reference_logits: Any = None,
             signals: Mapping[str, float] | None = None) -> Choice:
        """Chooses the next token from a 1-D (or [1, vocab]) logits row; `reference_logits`
        and `signals` are the optional extras of KL-guided temperature and entropix."""
        return self.client.step([self], logits, processed_logprobs=processed_logprobs,
                                reference_logits=reference_logits,
                                signals=None if signals is None else [signals])[0]

    def info(self) -> SequenceInfo:
        return self.client.get_sequence(self.sequence_id)

    def release(self) -> None:
        self.client.release([self])


class SequenceGroup(SequenceHandle):
    """A live group of a `SamplerClient` (beam search, forks, CoT decoding): each step sends
    `running_rows` logits rows and gets one choice per output row, each naming its
    `parent_row`; `result` holds the hypotheses once the group finished."""

    def step(self, logits: Any, *, processed_logprobs: bool = False) -> list[Choice]:
        """The group's choices from `logits` [running_rows, vocab]."""
        return self.client.step([self], logits, processed_logprobs=processed_logprobs)

    def info(self) -> SequenceInfo:
        return self.client.get_sequence(self.sequence_id)

    def release(self) -> None:
        self.client.release([self])


def step_rows(handles: SequenceT[SequenceHandle]) -> list[tuple[str, int, int | None]]:
    return [key for handle in handles for key in handle.row_keys()]


def _advance(handles: SequenceT[SequenceHandle], response: pb.StepResponse) -> list[Choice]:
    """The choices of a response (or its error, raised), followed by every handle."""
    choices = choices_from(response)
    results = {r.sequence_id: GroupResult.from_pb(r) for r in response.results}
    by_id: dict[str, list[Choice]] = {}
    for choice in choices:
        by_id.setdefault(choice.sequence_id, []).append(choice)
    for handle in handles:
        handle._take(by_id[handle.sequence_id], results)
    return choices


def make_handle(client: Any, created: pb.CreatedSequence, plain: type, group: type) -> Any:
    return (group if created.group_kind else plain)(client, created)


class ChannelClient:
    """What the synchronous clients share: a channel (or the one given), the stub of one
    service on it, a per-call timeout and metadata, typed errors, and closing."""

    def __init__(self, target: str, stub: type, *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None, metadata: tuple = ()):
        self._channel = channel or grpc.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = stub(self._channel)
        self._metadata = metadata
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class SamplerClient(ChannelClient):
    """Talks to a sampler service. Use as a context manager, or call `close()`.

    >>> with SamplerClient("127.0.0.1:50051") as client:
    ...     seq = client.create_sequence(policy="creative", prompt_ids=[1, 2, 3], seed=7)
    ...     choice = seq.step(logits)
    """

    def __init__(self, target: str, *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None):
        super().__init__(target, sampler_pb2_grpc.SamplerStub, timeout=timeout,
                         max_message_bytes=max_message_bytes, channel=channel)

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
        return [make_handle(self, c, Sequence, SequenceGroup) for c in response.sequences]

    def create_beam_group(self, prompt_ids: Iterable[int], num_beams: int, *, max_new_tokens: int,
                          **options: Any) -> SequenceGroup:
        """Beam search with Hugging Face `generate()`'s options (`specs.beam_search_policy`,
        plus `eos_token_ids`, `sequence_id`); the first step sends `num_beams` copies of the
        prompt's row."""
        return self.create_sequences([specs.beam_group_config(
            prompt_ids, num_beams, max_new_tokens=max_new_tokens, **options)])[0]

    def create_cot_group(self, prompt_ids: Iterable[int], k: int = 10, *, max_new_tokens: int,
                         **options: Any) -> SequenceGroup:
        """CoT decoding: k greedy branches from the k best first tokens, ranked by confidence
        (`specs.cot_group_config`: `answer_after`, `eos_token_ids`, `sequence_id`, ...)."""
        return self.create_sequences([specs.cot_group_config(
            prompt_ids, k, max_new_tokens=max_new_tokens, **options)])[0]

    def create_forks(self, prompt_ids: Iterable[int], n: int, **options: Any) -> SequenceGroup:
        """n samples of one prompt (vLLM n / best_of; `specs.fork_config`): the first step sends
        one row and gets best_of (or n) rows back; fork i draws with seed + i."""
        return self.create_sequences([specs.fork_config(prompt_ids, n, **options)])[0]

    def release(self, sequences: Iterable[Sequence | str]) -> list[str]:
        """Releases sequences (objects or ids); returns the ids that were not found."""
        ids = [s if isinstance(s, str) else s.sequence_id for s in sequences]
        return list(self._call(self._stub.ReleaseSequences,
                               pb.ReleaseSequencesRequest(sequence_ids=ids)).not_found)

    def get_sequence(self, sequence_id: str) -> SequenceInfo:
        return SequenceInfo.from_pb(self._call(self._stub.GetSequence,
                                               pb.GetSequenceRequest(sequence_id=sequence_id)))

    # -- steps --------------------------------------------------------------------------------
    def step(self, sequences: SequenceT[SequenceHandle], logits: Any, *,
             processed_logprobs: bool = False, reference_logits: Any = None,
             signals: SequenceT[Mapping[str, float]] | None = None) -> list[Choice]:
        """One token per row from `logits`: one row per plain sequence, `running_rows` rows per
        group, in the order of `sequences`."""
        request = requests.step_request(step_rows(sequences), logits,
                                        processed_logprobs=processed_logprobs,
                                        reference_logits=reference_logits, signals=signals)
        return _advance(sequences, self._call(self._stub.Step, request))

    def stream(self) -> "StepStream":
        """A StepStream: one long-lived bidirectional call for a generation loop."""
        return StepStream(self)

    # -- preview ------------------------------------------------------------------------------
    def preview(self, logits: Any, policy: str | Mapping[str, Any] | None = None, *,
                params: Mapping[str, Any] | None = None, history: Iterable[int] = (),
                prompt_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = (),
                max_candidates: int = 0, reference_logits: Any = None) -> list[tuple[int, float]]:
        """Every token the policy would keep, with its renormalised probability, best first."""
        request = requests.preview_request(logits, policy=policy, params=params, history=history,
                                           prompt_ids=prompt_ids, eos_token_ids=eos_token_ids,
                                           max_candidates=max_candidates,
                                           reference_logits=reference_logits)
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

    def step(self, sequences: SequenceT[SequenceHandle], logits: Any, *,
             processed_logprobs: bool = False, reference_logits: Any = None,
             signals: SequenceT[Mapping[str, float]] | None = None) -> list[Choice]:
        request = requests.step_request(step_rows(sequences), logits,
                                        processed_logprobs=processed_logprobs,
                                        reference_logits=reference_logits, signals=signals)
        with self._lock:
            self._requests.put(request)
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
        self.last_service_micros = response.service_micros
        return _advance(sequences, response)
