"""The asyncio client: `AsyncSamplerClient`, the twin of `SamplerClient` on grpc.aio."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence as SequenceT

import grpc

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_client import requests, specs
from sampler_client.calls import Rpc, run_async
from sampler_client.client import (DEFAULT_MAX_MESSAGE_BYTES, SequenceHandle, TLSConfig,
                                   make_channel, make_handles, remember_tokenizer,
                                   rpc_methods)
from sampler_client.errors import SamplerError, UnavailableError, from_rpc_error
from sampler_client.exchange import StepExchange
from sampler_client.replay import Replay, release, sequence_info
from sampler_client.transports import TensorPlacer
from sampler_client.types import Choice, RegionInfo, SequenceInfo


class AsyncSequence(SequenceHandle):
    """A live sequence of an `AsyncSamplerClient`."""

    async def step(self, logits: Any, *, processed_logprobs: bool = False) -> Choice:
        return (await self.client.step([self], logits, processed_logprobs=processed_logprobs))[0]

    async def verify(self, draft_ids: Iterable[int], logits: Any, draft_probs: Any = None, *,
                     processed_logprobs: bool = False) -> list[int]:
        """`Sequence.verify`, awaited."""
        return await run_async(self.verification(draft_ids, logits, draft_probs,
                                                 processed_logprobs=processed_logprobs),
                               self.client._performer(self.client._unary_step))

    async def info(self) -> SequenceInfo:
        return await self.client.get_sequence(self)

    async def release(self) -> None:
        await self.client.release([self])


class AsyncSequenceGroup(SequenceHandle):
    """A live group of an `AsyncSamplerClient` (see `SequenceGroup`)."""

    async def step(self, logits: Any, *, processed_logprobs: bool = False) -> list[Choice]:
        return await self.client.step([self], logits, processed_logprobs=processed_logprobs)

    async def verify(self, drafts: Iterable[Iterable[int]], logits: Any, draft_probs: Any = None,
                     *, processed_logprobs: bool = False) -> list[Choice]:
        """`SequenceGroup.verify`, awaited."""
        return await run_async(self.verification(drafts, logits, draft_probs,
                                                 processed_logprobs=processed_logprobs),
                               self.client._performer(self.client._unary_step))

    async def info(self) -> SequenceInfo:
        return await self.client.get_sequence(self)

    async def release(self) -> None:
        await self.client.release([self])


class AsyncSamplerClient:
    """`async with AsyncSamplerClient(target) as client: ...` — same methods, awaited, and the
    same transports, sparse rows, `tls` and replay (see `SamplerClient`, sections Transports
    and Replay)."""

    def __init__(self, target: str, *, transport: str = "auto", sparse_top_k: int | None = None,
                 ring_slots: int = 4, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: TLSConfig | bool | None = None, replay: bool = True,
                 replay_timeout: float = 120.0):
        self._steps = StepExchange(TensorPlacer(target, transport, ring_slots=ring_slots),
                                   sparse_top_k, Replay(replay_timeout) if replay else None)
        self._channel = make_channel(target, max_message_bytes, tls, aio=True, replay=replay)
        #: The channel's max send size: a larger step is refused before it is sent.
        self.max_message_bytes = max_message_bytes
        self._stub = sampler_pb2_grpc.SamplerStub(self._channel)
        #: Tokenizers this client registered, by id and name (replay registers them again).
        self._tokenizers: dict[str, pb.RegisterTokenizerRequest] = {}
        self._regions = sampler_pb2_grpc.SharedMemoryStub(self._channel)
        self._methods = rpc_methods(self._channel, self._stub, self._regions)
        self.timeout = timeout

    @property
    def client_id(self) -> str:
        """The id this client registers its regions under."""
        return self._steps.placer.client_id

    async def __aenter__(self) -> "AsyncSamplerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Unregisters and frees the client's regions, then closes the channel."""
        try:
            await run_async(self._steps.close(), self._performer(self._unary_step))
        finally:
            await self._channel.close()

    async def _call(self, method, request, timeout: float | None = None):
        """`method(request)` within `timeout` seconds (None: the client's)."""
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def _unary_step(self, request: pb.StepRequest) -> pb.StepResponse:
        return await self._call(self._stub.Step, request)

    def _performer(self, send_step: Callable[[pb.StepRequest], Awaitable[pb.StepResponse]]
                   ) -> Callable[[Rpc], Awaitable[Any]]:
        """Makes an exchange's calls: Step through `send_step` (a request over
        `max_message_bytes` raises MessageTooLargeError unsent), the others by name."""
        async def perform(rpc: Rpc) -> Any:
            if rpc.method == "Step":
                requests.check_size(rpc.request, self.max_message_bytes)
                return await send_step(rpc.request)
            return await self._call(self._methods[rpc.method], rpc.request, rpc.timeout)
        return perform

    async def regions(self, all_clients: bool = False) -> list[RegionInfo]:
        """The regions registered by this client (by every client with `all_clients`)."""
        response = await self._call(self._regions.RegionStatus, pb.RegionStatusRequest())
        return [RegionInfo.from_pb(r) for r in response.regions
                if all_clients or r.client_id == self.client_id]

    async def create_sequence(self, policy: str | Mapping[str, Any] | None = None,
                              prompt_ids: Iterable[int] = (), seed: int | None = None,
                              params: Mapping[str, Any] | None = None, *,
                              sequence_id: str | None = None,
                              eos_token_ids: Iterable[int] = (),
                              tokenizer: str = "") -> AsyncSequence:
        return (await self.create_sequences([dict(
            policy=policy, prompt_ids=prompt_ids, seed=seed, params=params,
            sequence_id=sequence_id, eos_token_ids=eos_token_ids, tokenizer=tokenizer)]))[0]

    async def register_tokenizer(self, tokenizer: Any, name: str = "") -> str:
        """See `SamplerClient.register_tokenizer`."""
        request = requests.register_tokenizer_request(tokenizer, name)
        response = await self._call(self._stub.RegisterTokenizer, request)
        remember_tokenizer(self._tokenizers, request, response)
        return response.tokenizer_id

    async def create_sequences(self, configs: Iterable[Mapping[str, Any]]) -> list[AsyncSequence]:
        request = requests.create_request(configs)
        response = await self._call(self._stub.CreateSequences, request)
        return make_handles(self, request, response, AsyncSequence, AsyncSequenceGroup,
                            self._steps.replay is not None, self._tokenizers)

    async def create_beam_group(self, prompt_ids: Iterable[int], num_beams: int, *,
                                max_new_tokens: int, **options: Any) -> AsyncSequenceGroup:
        return (await self.create_sequences([specs.beam_group_config(
            prompt_ids, num_beams, max_new_tokens=max_new_tokens, **options)]))[0]

    async def create_cot_group(self, prompt_ids: Iterable[int], k: int = 10, *,
                               max_new_tokens: int, **options: Any) -> AsyncSequenceGroup:
        return (await self.create_sequences([specs.cot_group_config(
            prompt_ids, k, max_new_tokens=max_new_tokens, **options)]))[0]

    async def create_forks(self, prompt_ids: Iterable[int], n: int,
                           **options: Any) -> AsyncSequenceGroup:
        return (await self.create_sequences([specs.fork_config(prompt_ids, n, **options)]))[0]

    async def release(self, sequences: Iterable[AsyncSequence | str]) -> list[str]:
        return await run_async(release(sequences), self._performer(self._unary_step))

    async def get_sequence(self, sequence: SequenceHandle | str) -> SequenceInfo:
        return SequenceInfo.from_pb(await run_async(sequence_info(sequence),
                                                    self._performer(self._unary_step)))

    async def step(self, sequences: SequenceT[AsyncSequence], logits: Any, *,
                   processed_logprobs: bool = False, reference_logits: Any = None,
                   signals: SequenceT[Mapping[str, float]] | None = None) -> list[Choice]:
        return await run_async(self._steps.step(sequences, logits,
                                                processed_logprobs=processed_logprobs,
                                                reference_logits=reference_logits,
                                                signals=signals),
                               self._performer(self._unary_step))

    async def verify(self, sequences: SequenceT[AsyncSequence], drafts: Iterable[Iterable[int]],
                     logits: Any, draft_probs: SequenceT[Any] | None = None, *,
                     processed_logprobs: bool = False) -> list[Choice]:
        """`SamplerClient.verify`, awaited."""
        return await run_async(self._steps.verify(sequences, list(drafts), logits, draft_probs,
                                                  processed_logprobs=processed_logprobs),
                               self._performer(self._unary_step))

    def stream(self) -> "AsyncStepStream":
        return AsyncStepStream(self)

    async def preview(self, logits: Any, policy: str | Mapping[str, Any] | None = None, *,
                      params: Mapping[str, Any] | None = None, history: Iterable[int] = (),
                      prompt_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = (),
                      max_candidates: int = 0, reference_logits: Any = None) -> list[tuple[int, float]]:
        request = requests.preview_request(logits, policy=policy, params=params, history=history,
                                           prompt_ids=prompt_ids, eos_token_ids=eos_token_ids,
                                           max_candidates=max_candidates,
                                           reference_logits=reference_logits)
        response = await self._call(self._stub.Preview, request)
        return [(c.token_id, c.probability) for c in response.candidates]

    async def explain_plan(self, policy: str | Mapping[str, Any] | None = None, *,
                     params: Mapping[str, Any] | None = None) -> list[str]:
        """The stages the service runs for `policy` (a name, an inline spec, or None for flat
        `params`) and `params`, in order, then the selector, each as "key(param=value, ...)":
        off stages and, before greedy, argmax-keeping stages are planned away."""
        request = requests.preview_request(None, policy=policy, params=params)
        return list((await self._call(self._stub.Preview, request)).planned_chain)


def _unsent(error: grpc.RpcError) -> SamplerError:
    """The error of a stream's failed write (the request never left). grpc.aio reports a
    transport that broke under the write as INTERNAL ("Internal error from Core"): it is
    UNAVAILABLE, the service out of reach, which replay retries."""
    failure = from_rpc_error(error)
    if failure.code != grpc.StatusCode.INTERNAL:
        return failure
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, "the step stream broke before the "
                            f"request was sent ({failure.message})")


class AsyncStepStream:
    """A StepStream call; `await stream.step(...)` writes a request and reads its answer
    (one at a time: concurrent steps on one stream wait their turn). A call that ended (the
    connection broke: UNAVAILABLE, which replay retries) is opened again by the next step."""

    def __init__(self, client: AsyncSamplerClient):
        self._client = client
        self._call = client._stub.StepStream()
        self._turn = asyncio.Lock()
        self.last_service_micros = 0

    async def __aenter__(self) -> "AsyncStepStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if not self._call.done():
            await self._call.done_writing()

    async def _round_trip(self, request: pb.StepRequest) -> pb.StepResponse:
        async with self._turn:
            if self._call.done():
                self._call = self._client._stub.StepStream()
            try:
                await self._call.write(request)
            except grpc.RpcError as error:
                raise _unsent(error) from None
            try:
                response = await self._call.read()
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None
            if response is grpc.aio.EOF:
                self._call.cancel()  # done: the next step opens another
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE,
                                       "the service ended the step stream")
        self.last_service_micros = response.service_micros
        return response

    async def step(self, sequences: SequenceT[AsyncSequence], logits: Any, *,
                   processed_logprobs: bool = False, reference_logits: Any = None,
                   signals: SequenceT[Mapping[str, float]] | None = None) -> list[Choice]:
        return await run_async(self._client._steps.step(sequences, logits,
                                                        processed_logprobs=processed_logprobs,
                                                        reference_logits=reference_logits,
                                                        signals=signals),
                               self._client._performer(self._round_trip))

    async def verify(self, sequences: SequenceT[AsyncSequence], drafts: Iterable[Iterable[int]],
                     logits: Any, draft_probs: SequenceT[Any] | None = None, *,
                     processed_logprobs: bool = False) -> list[Choice]:
        """`StepStream.verify`, awaited."""
        return await run_async(
            self._client._steps.verify(sequences, list(drafts), logits, draft_probs,
                                       processed_logprobs=processed_logprobs),
            self._client._performer(self._round_trip))
