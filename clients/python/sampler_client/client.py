"""The synchronous client: `SamplerClient`, `Sequence` and `StepStream`."""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence as SequenceT, Union

import grpc

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_client import requests
from sampler_client.calls import Exchange, Rpc, run_sync
from sampler_client.errors import SamplerError, UnavailableError, from_rpc_error
from sampler_client import health, specs
from sampler_client.exchange import StepExchange
from sampler_client.replay import Replay, Resumption, release, sequence_info
from sampler_client.transports import TensorPlacer
from sampler_client.types import Choice, GroupResult, RegionInfo, SequenceInfo

#: Matches the service's default: 64 rows of a 128256-token vocabulary in fp32, with room.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


#: Room for an error's trailers: a refused sparse step lists every refused row (about 90
#: bytes each), past gRPC's default 8 KiB soft / 16 KiB hard metadata limits.
MAX_METADATA_BYTES = 4 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES)]


def _method_names(service: str, *names: str) -> list[dict[str, str]]:
    return [{"service": service, "method": name} for name in names]


#: gRPC's own waiting and retrying, where they are safe (a replaying client's channel):
#: Health.Check, replay's wait for the service, waits for a connection (waitForReady) within
#: the deadline replay gives it; the idempotent calls are retried on UNAVAILABLE (up to 5
#: tries, 0.1 s to 1 s apart), riding out a short outage. The others fail fast, so a client
#: that cannot reach its service (a wrong address, a TLS mismatch) hears so at once: Step
#: and StepStream are replayed (re-creating what a restart lost), CreateSequences and the
#: region calls are not idempotent.
_RETRY_UNAVAILABLE = {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s",
                      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
REPLAY_SERVICE_CONFIG = {"methodConfig": [
    {"name": _method_names(health.HEALTH_SERVICE, "Check"), "waitForReady": True},
    {"name": _method_names("sampler.v1.Sampler", "GetSequence", "Preview", "ReleaseSequences")
     + _method_names("sampler.v1.SharedMemory", "RegionStatus"),
     "retryPolicy": _RETRY_UNAVAILABLE},
]}


def replay_options() -> list[tuple[str, Any]]:
    """A replaying client's channel options: the service config above; keepalive pings every
    60 s while calls are open (20 s to answer), so a connection whose peer vanished without a
    reset ends; reconnection tries from 0.1 s apart, growing to 2 s (gRPC's default: 1 s to
    120 s), so a restarted sidecar is found again quickly."""
    return [("grpc.service_config", json.dumps(REPLAY_SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000)]


#: PEM material: bytes (or a str starting with "-----BEGIN") are the PEM itself; any other str
#: or an os.PathLike is a file to read.
Pem = Union[bytes, str, os.PathLike]


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as file:
            return file.read()
    except OSError as error:
        raise OSError(error.errno, f"TLS {what} {os.fspath(value)}: cannot read: "
                                   f"{error.strerror}") from None


@dataclass(frozen=True)
class TLSConfig:
    """TLS for a client's channel: `tls=TLSConfig(root_ca="ca.pem")` verifies the service
    against that CA (None: gRPC's default roots); `cert` and `key` (both or neither) present a
    client certificate, for a service that requires one (mutual TLS, `--tls-client-ca`).
    Each is PEM bytes or a file path. `server_name` overrides the name checked against the
    service's certificate (default: the target's host). The target keeps its usual form, so
    a TLS loopback service is still local for shared memory and CUDA IPC."""

    root_ca: Pem | None = None
    cert: Pem | None = None
    key: Pem | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLSConfig: cert and key go together (give both or neither)")

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now: a missing one raises OSError naming it."""
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.root_ca, "root_ca"),
                                            private_key=_pem(self.key, "key"),
                                            certificate_chain=_pem(self.cert, "cert"))

    def options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override",
                                                     self.server_name)]


def make_channel(target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: TLSConfig | bool | None = None, *, aio: bool = False, replay: bool = False):
    """The SDK's channel to `target` (grpc.aio's with `aio`): plaintext when `tls` is None or
    False, TLS with gRPC's default roots when True, else as the TLSConfig says; with
    `replay`, `replay_options` too."""
    module = grpc.aio if aio else grpc
    options = channel_options(max_message_bytes) + (replay_options() if replay else [])
    if tls is None or tls is False:
        return module.insecure_channel(target, options=options)
    if tls is True:
        tls = TLSConfig()
    if not isinstance(tls, TLSConfig):
        raise TypeError(f"tls must be a TLSConfig, True or None, not {type(tls).__name__}")
    return module.secure_channel(target, tls.credentials(), options=options + tls.options())


class SequenceHandle:
    """What a client knows of a live sequence or group: its id, policy and seed as created,
    `next_step`, the step number its next step sends (a resend of the same number returns the
    recorded answer instead of advancing), and for a group its kind, how many rows the next
    step sends (`running_rows`) and, once it finished, its `result`. `dense_only`: its rows
    always go in full, even with `sparse_top_k` (a group's always; a sequence's once the
    service said its policy never runs sparse). `resumption`: what the client's replay keeps
    to re-create it after a restart of the service (None with replay off, or once released)."""

    def __init__(self, client: Any, created: pb.CreatedSequence):
        self.client = client
        self.sequence_id = created.sequence_id
        self.policy = created.policy
        self.seed = created.seed
        self.group_kind = created.group_kind
        self.running_rows = created.running_rows or 1
        self.result: GroupResult | None = None
        self.next_step = 0
        self.dense_only = bool(self.group_kind)
        self.resumption: Resumption | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.sequence_id!r}, policy={self.policy!r}, "
                f"next_step={self.next_step})")

    def row_keys(self) -> list[tuple[str, int, int | None]]:
        """(id, step, branch) of each row the next step sends."""
        if not self.group_kind:
            return [(self.sequence_id, self.next_step, None)]
        return [(self.sequence_id, self.next_step, b) for b in range(self.running_rows)]

    def _take(self, choices: list[Choice], results: dict[str, GroupResult]) -> None:
        """Follows this handle's choices of an answer (and its group result, if any): a plain
        sequence advances by the tokens it emitted, a group by one step."""
        if self.group_kind:
            self.next_step = choices[0].step + 1
            self.running_rows = sum(not c.finished for c in choices)
            self.result = results.get(self.sequence_id, self.result)
        else:
            self.next_step = choices[0].step + max(1, len(choices[0].accepted_token_ids))

    def verification(self, drafts: Iterable[Any], logits: Any, draft_probs: Any = None, *,
                     processed_logprobs: bool = False) -> Exchange[list[int] | list[Choice]]:
        """The exchange of a speculative verification of this handle alone
        (docs/speculative.md), as its `verify` runs it. A plain sequence: `drafts` its k draft ids, `logits`
        [k + 1, vocab] (the target's logits after each prefix, bonus row last), `draft_probs`
        the draft model's [k, vocab] probabilities, whole or as k rows of [vocab] or [1, vocab]
        (`tensors.stacked_rows`; None: point masses); the result is the 1 … k + 1 tokens
        emitted, and `last_choice` the answer's Choice. A fork group: one
        draft list (k_i >= 0) per running row, `logits` [sum of (k_i + 1), vocab] in row
        order, `draft_probs` None or one entry per row (None or [k_i, vocab]); the result is
        its choices, each with the tokens its fork emitted in `accepted_token_ids`."""
        steps = self.client._steps
        if self.group_kind:
            return (yield from steps.verify([self], list(drafts), logits, draft_probs,
                                            processed_logprobs=processed_logprobs))
        self.last_choice, = yield from steps.verify(
            [self], [list(drafts)], logits, None if draft_probs is None else [draft_probs],
            processed_logprobs=processed_logprobs)
        return list(self.last_choice.accepted_token_ids)


class Sequence(SequenceHandle):
    """A live sequence of a `SamplerClient`."""

    def step(self, logits: Any, *, processed_logprobs: bool = False, reference_logits: Any = None,
             signals: Mapping[str, float] | None = None) -> Choice:
        """Chooses the next token from a 1-D (or [1, vocab]) logits row; `reference_logits`
        and `signals` are the optional extras of KL-guided temperature and entropix."""
        return self.client.step([self], logits, processed_logprobs=processed_logprobs,
                                reference_logits=reference_logits,
                                signals=None if signals is None else [signals])[0]

    def verify(self, draft_ids: Iterable[int], logits: Any, draft_probs: Any = None, *,
               processed_logprobs: bool = False) -> list[int]:
        """Speculative verification (docs/speculative.md): `logits` [k + 1, vocab] are the
        target's logits after each prefix (bonus row last), `draft_probs` the draft model's
        [k, vocab] probabilities (None: the drafts are point masses). Returns the 1 … k + 1
        tokens emitted (the accepted drafts, then the policy's token); the sequence and
        `next_step` advance by that many, so `step` continues after it. `last_choice` holds
        the answer's Choice. Tensors go through the client's transport."""
        return run_sync(self.verification(draft_ids, logits, draft_probs,
                                          processed_logprobs=processed_logprobs),
                        self.client._performer(self.client._unary_step))

    def info(self) -> SequenceInfo:
        return self.client.get_sequence(self)

    def release(self) -> None:
        self.client.release([self])


class SequenceGroup(SequenceHandle):
    """A live group of a `SamplerClient` (beam search, forks, CoT decoding): each step sends
    `running_rows` logits rows and gets one choice per output row, each naming its
    `parent_row`; `result` holds the hypotheses once the group finished."""

    def step(self, logits: Any, *, processed_logprobs: bool = False) -> list[Choice]:
        """The group's choices from `logits` [running_rows, vocab]."""
        return self.client.step([self], logits, processed_logprobs=processed_logprobs)

    def verify(self, drafts: Iterable[Iterable[int]], logits: Any, draft_probs: Any = None, *,
               processed_logprobs: bool = False) -> list[Choice]:
        """Forks: speculative verification per fork (`verification`): one draft list per
        running row (empty: a plain step for that fork) and `logits` [sum of (k_i + 1),
        vocab]; each choice's accepted_token_ids are the tokens its fork emitted. Beam search
        and CoT refuse drafts (FailedPreconditionError)."""
        return run_sync(self.verification(drafts, logits, draft_probs,
                                          processed_logprobs=processed_logprobs),
                        self.client._performer(self.client._unary_step))

    def info(self) -> SequenceInfo:
        return self.client.get_sequence(self)

    def release(self) -> None:
        self.client.release([self])


def make_handles(client: Any, request: pb.CreateSequencesRequest,
                 response: pb.CreateSequencesResponse, plain: type, group: type,
                 replay: bool, tokenizers: Mapping[str, pb.RegisterTokenizerRequest]
                 ) -> list[Any]:
    """A handle (of class `plain` or `group`) per created sequence; with `replay`, each keeps
    its config for replay, and the registration of its tokenizer when `tokenizers` (the
    client's registrations, by name and id) has it."""
    handles = []
    for config, created in zip(request.sequences, response.sequences):
        handle = (group if created.group_kind else plain)(client, created)
        if replay:
            handle.resumption = Resumption(config, plain=not created.group_kind,
                                           tokenizer=tokenizers.get(config.tokenizer))
        handles.append(handle)
    return handles


def remember_tokenizer(kept: dict[str, pb.RegisterTokenizerRequest],
                       request: pb.RegisterTokenizerRequest,
                       response: pb.RegisterTokenizerResponse) -> None:
    """Keeps a registration by the id it got and its name, for replay to repeat it."""
    kept[response.tokenizer_id] = request
    if request.name:
        kept[request.name] = request


def rpc_methods(channel: Any, stub: Any, regions: Any) -> dict[str, Any]:
    """The calls an exchange may yield but Step, by name, on a grpc or grpc.aio channel."""
    methods = {name: getattr(stub, name) for name in (
        "CreateSequences", "ReleaseSequences", "GetSequence", "RegisterTokenizer")}
    methods.update((name, getattr(regions, name)) for name in (
        "RegisterSystemRegion", "RegisterCudaRegion", "UnregisterRegion", "RegionStatus"))
    methods["Check"] = health.check_method(channel)
    return methods


class ChannelClient:
    """What the synchronous clients share: a channel (or the one given), the stub of one
    service on it, a per-call timeout and metadata, typed errors, and closing."""

    def __init__(self, target: str, stub: type, *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None, metadata: tuple = (),
                 tls: TLSConfig | bool | None = None, replay: bool = False):
        if channel is not None and tls not in (None, False):
            raise ValueError("give either channel or tls (a channel brings its own credentials)")
        self._channel = channel or make_channel(target, max_message_bytes, tls, replay=replay)
        #: The channel's max send size: a larger step is refused before it is sent.
        self.max_message_bytes = max_message_bytes
        self._stub = stub(self._channel)
        self._metadata = metadata
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None = None):
        """`method(request)` within `timeout` seconds (None: the client's)."""
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


class SamplerClient(ChannelClient):
    """Talks to a sampler service. Use as a context manager, or call `close()`.

    >>> with SamplerClient("127.0.0.1:50051") as client:
    ...     seq = client.create_sequence(policy="creative", prompt_ids=[1, 2, 3], seed=7)
    ...     choice = seq.step(logits)

    `target` is any gRPC target: "host:port", or a Unix socket, "unix:///abs/path" or
    "unix:relative/path". `tls=TLSConfig(root_ca=..., cert=..., key=...)` (or `tls=True`
    for gRPC's default roots) makes the channel TLS, mutual TLS with `cert` and `key`
    (docs/security.md); the service's Unix socket is always plaintext.

    Transports
    ----------
    `transport` says how a step's logits reach the service (every wire dtype, FP32, FP16 and
    BF16, travels on each; the tensor's own dtype travels, other floats become FP32):

    - "auto" (default): for a local service (a `unix:` target, or localhost, 127.x, [::1])
      CUDA tensors go by CUDA IPC and the others by POSIX shared memory; for a remote one,
      inline. If the service refuses a registration (FAILED_PRECONDITION: shared memory is
      off) or a registration fails (CUDA IPC not permitted, no cupy), that kind is given up
      for the client's life, logged once at INFO: CUDA tensors then go by shared memory, and
      without it inline.
    - "inline": the bytes in the message. Simple, and the slowest (a 64 x 128256 fp32 step is
      32.8 MB per message).
    - "shm": POSIX shared memory (a CUDA tensor is copied to the host on the way); a failed
      registration raises.
    - "cuda_ipc": CUDA IPC on the tensor's GPU (a host tensor is uploaded to the current
      one); needs cupy (`pip install 'sampler-sidecar[gpu]'`) and a service on the same GPU.
      The SDK copies the tensor into its region on the device's current torch stream and
      synchronises that stream before sending, so the service reads finished bytes; as for
      any torch op, the tensor must be ready on the current stream.

    The client makes and registers its regions itself, under a random `client_id`: a ring of
    `ring_slots` regions per kind (and GPU), each lent to one request and reused only once the
    service answered it (so pipelined streams and concurrent threads are safe), replaced by a
    larger one when a request does not fit. With every region in flight a tensor goes inline.
    `close()` unregisters every region of the client and unlinks (or frees) them; nothing is
    left in /dev/shm. Preview always sends its logits inline.

    `sparse_top_k=K` sends each row of a plain sequence as its K best ids and logits plus the
    statistics of the other logits (`sampler_client.sparse`), through the same transport. The
    service uses them only where the policy's result provably cannot depend on the missing
    logits; otherwise it refuses those rows and the SDK resends them in full in the same call
    (and a sequence whose policy can never run sparse goes in full from then on). Groups
    (beam search, forks, CoT) always go in full. The tokens are those of the dense path.

    A step larger than `max_message_bytes` (the channel's max send size; with `channel`, pass
    the one its options set) raises `MessageTooLargeError` without being sent, so a
    `StepStream` it was meant for stays open.

    Replay
    ------
    With `replay` (the default) the client survives restarts of the service
    (docs/replay.md): it keeps what re-creates each live sequence and group where it stands,
    and a step the service could not answer (UNAVAILABLE, or NOT_FOUND for a sequence or
    region a restart lost) is sent again once the service is back, its sequences re-created
    and regions made anew: the caller sees only latency, and the tokens of an
    uninterrupted run. `replay_timeout` bounds the wait, in seconds from the first failure
    (then UnavailableError). The channel gets gRPC's waiting and retries where they are safe
    (`REPLAY_SERVICE_CONFIG`; not with a `channel` of yours). `replay=False` raises every
    failure as it comes.
    """

    def __init__(self, target: str, *, transport: str = "auto", sparse_top_k: int | None = None,
                 ring_slots: int = 4, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None, tls: TLSConfig | bool | None = None,
                 replay: bool = True, replay_timeout: float = 120.0):
        steps = StepExchange(TensorPlacer(target, transport, ring_slots=ring_slots), sparse_top_k,
                             Replay(replay_timeout) if replay else None)
        super().__init__(target, sampler_pb2_grpc.SamplerStub, timeout=timeout,
                         max_message_bytes=max_message_bytes, channel=channel, tls=tls,
                         replay=replay)
        self._steps = steps
        #: Tokenizers this client registered, by id and name (replay registers them again).
        self._tokenizers: dict[str, pb.RegisterTokenizerRequest] = {}
        self._regions = sampler_pb2_grpc.SharedMemoryStub(self._channel)
        self._methods = rpc_methods(self._channel, self._stub, self._regions)

    @property
    def client_id(self) -> str:
        """The id this client registers its regions under."""
        return self._steps.placer.client_id

    def close(self) -> None:
        """Unregisters and frees the client's regions, then closes the channel."""
        try:
            run_sync(self._steps.close(), self._performer(self._unary_step))
        finally:
            super().close()

    def _unary_step(self, request: pb.StepRequest) -> pb.StepResponse:
        return self._call(self._stub.Step, request)

    def _performer(self, send_step: Callable[[pb.StepRequest], pb.StepResponse]
                   ) -> Callable[[Rpc], Any]:
        """Makes an exchange's calls: Step through `send_step` (a request over
        `max_message_bytes` raises MessageTooLargeError unsent), the others by name."""
        def perform(rpc: Rpc) -> Any:
            if rpc.method == "Step":
                requests.check_size(rpc.request, self.max_message_bytes)
                return send_step(rpc.request)
            return self._call(self._methods[rpc.method], rpc.request, rpc.timeout)
        return perform

    def regions(self, all_clients: bool = False) -> list[RegionInfo]:
        """The regions registered by this client (by every client with `all_clients`)."""
        response = self._call(self._regions.RegionStatus, pb.RegionStatusRequest())
        return [RegionInfo.from_pb(r) for r in response.regions
                if all_clients or r.client_id == self.client_id]

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
                        eos_token_ids: Iterable[int] = (), tokenizer: str = "") -> Sequence:
        """One sequence. `policy`: a registry name, an inline spec dict, or None for flat `params`;
        `tokenizer`: a registered tokenizer's name or id (text, stop strings)."""
        return self.create_sequences([dict(policy=policy, prompt_ids=prompt_ids, seed=seed,
                                           params=params, sequence_id=sequence_id,
                                           eos_token_ids=eos_token_ids, tokenizer=tokenizer)])[0]

    def register_tokenizer(self, tokenizer: Any, name: str = "") -> str:
        """Teaches the service a vocabulary (a Hugging Face tokenizer object or a
        `sampler_client.vocabulary.Vocabulary`) and returns its id, which sequences name
        (`tokenizer=`), as they may `name`. Idempotent: the id is a hash of the content."""
        request = requests.register_tokenizer_request(tokenizer, name)
        response = self._call(self._stub.RegisterTokenizer, request)
        remember_tokenizer(self._tokenizers, request, response)
        return response.tokenizer_id

    def create_sequences(self, configs: Iterable[Mapping[str, Any]]) -> list[Sequence]:
        """Several sequences atomically; each config takes `create_sequence`'s keywords."""
        request = requests.create_request(configs)
        response = self._call(self._stub.CreateSequences, request)
        return make_handles(self, request, response, Sequence, SequenceGroup,
                            self._steps.replay is not None, self._tokenizers)

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
        """Releases sequences (objects or ids); returns the ids that were not found (with
        replay, not those of handles a restart of the service lost: to the caller they were
        live)."""
        return run_sync(release(sequences), self._performer(self._unary_step))

    def get_sequence(self, sequence: SequenceHandle | str) -> SequenceInfo:
        """What the service holds of a sequence or group (a handle or an id; with replay, a
        handle a restart lost is re-created first)."""
        return SequenceInfo.from_pb(run_sync(sequence_info(sequence),
                                             self._performer(self._unary_step)))

    # -- steps --------------------------------------------------------------------------------
    def step(self, sequences: SequenceT[SequenceHandle], logits: Any, *,
             processed_logprobs: bool = False, reference_logits: Any = None,
             signals: SequenceT[Mapping[str, float]] | None = None) -> list[Choice]:
        """One token per row from `logits`: one row per plain sequence, `running_rows` rows per
        group, in the order of `sequences`."""
        return run_sync(self._steps.step(sequences, logits, processed_logprobs=processed_logprobs,
                                         reference_logits=reference_logits, signals=signals),
                        self._performer(self._unary_step))

    def verify(self, sequences: SequenceT[SequenceHandle], drafts: Iterable[Iterable[int]],
               logits: Any, draft_probs: SequenceT[Any] | None = None, *,
               processed_logprobs: bool = False) -> list[Choice]:
        """Speculative verification of several plain sequences and fork groups in one
        request (docs/speculative.md): one draft list (k_i >= 0) per row of `sequences` (one
        per plain sequence, `running_rows` per group, in order), `logits` [sum of (k_i + 1),
        vocab] in row order, `draft_probs` None or one entry per row (None, or [k_i, vocab] or
        k_i rows). Each choice's accepted_token_ids are the tokens its row emitted."""
        return run_sync(self._steps.verify(sequences, list(drafts), logits, draft_probs,
                                           processed_logprobs=processed_logprobs),
                        self._performer(self._unary_step))

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

    def explain_plan(self, policy: str | Mapping[str, Any] | None = None, *,
                     params: Mapping[str, Any] | None = None) -> list[str]:
        """The stages the service runs for `policy` (a name, an inline spec, or None for flat
        `params`) and `params`, in order, then the selector, each as "key(param=value, ...)":
        off stages and, before greedy, argmax-keeping stages are planned away."""
        request = requests.preview_request(None, policy=policy, params=params)
        return list((self._call(self._stub.Preview, request)).planned_chain)


class StepStream:
    """Steps over a StepStream call: each `step` sends one request and reads its answer
    (through the client's transport and sparse rows, resends included).

    A bad step raises its SamplerError without ending the stream; one too large to send
    (over the client's `max_message_bytes`) raises MessageTooLargeError before it is sent.
    A call that ended (the connection broke: UNAVAILABLE, which replay retries) is opened
    again by the next step. Close it (or use `with`).
    """

    _END = object()

    def __init__(self, client: SamplerClient):
        self._client = client
        self._lock = threading.Lock()
        self.last_service_micros = 0
        self._open_call()

    def _open_call(self) -> None:
        self._requests: queue.Queue | None = queue.Queue()  # the open call's, None once ended
        self._responses = self._client._stub.StepStream(iter(self._requests.get, self._END))

    def __enter__(self) -> "StepStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._end_call()

    def _end_call(self) -> None:
        if self._requests is not None:
            self._requests.put(self._END)
        self._requests = self._responses = None

    def _round_trip(self, request: pb.StepRequest) -> pb.StepResponse:
        with self._lock:
            if self._requests is None:
                self._open_call()
            self._requests.put(request)
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                self._end_call()
                raise from_rpc_error(error) from None
            except StopIteration:
                self._end_call()
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                       "the service ended the step stream") from None
        self.last_service_micros = response.service_micros
        return response

    def step(self, sequences: SequenceT[SequenceHandle], logits: Any, *,
             processed_logprobs: bool = False, reference_logits: Any = None,
             signals: SequenceT[Mapping[str, float]] | None = None) -> list[Choice]:
        return run_sync(self._client._steps.step(sequences, logits,
                                                 processed_logprobs=processed_logprobs,
                                                 reference_logits=reference_logits,
                                                 signals=signals),
                        self._client._performer(self._round_trip))

    def verify(self, sequences: SequenceT[SequenceHandle], drafts: Iterable[Iterable[int]],
               logits: Any, draft_probs: SequenceT[Any] | None = None, *,
               processed_logprobs: bool = False) -> list[Choice]:
        """`SamplerClient.verify` over this stream."""
        return run_sync(self._client._steps.verify(sequences, list(drafts), logits, draft_probs,
                                                   processed_logprobs=processed_logprobs),
                        self._client._performer(self._round_trip))
