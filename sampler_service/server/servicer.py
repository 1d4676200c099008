"""The `sampler.v1.Sampler` servicer on grpc.aio: steps go through the micro-batcher, every
other call runs in the engine's executor thread, so the event loop never blocks on the engine
and health answers whatever the load.

Metrics (`ServiceMetrics`): the unary calls are counted by `map_errors`; a StepStream counts
as open while it is (`sampler_open_streams`), and each of its messages as one request, in
flight from its arrival to its answer and counted with its own (in-band) status. Every step
request's logits bytes are counted by how they arrived, and a successful step's time in the
service by policy and transport. The servicer hands the batcher the metrics' batch observer
when it has none (rows per engine call)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Executor
from typing import AsyncIterator, Callable, TypeVar

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_service.errors import ResourceExhausted
from sampler_service.server import convert
from sampler_service.server.batcher import StepBatcher
from sampler_service.server.error_mapping import (abort, as_service_error, map_errors,
                                                  record_failure)
from sampler_service.server.metrics import MIXED_POLICY, ServiceMetrics, transport_of
from sampler_service.server.status import to_rpc_status
from sampler_service.service import SamplerCore
from sampler_service.server.steps import StepRunner, StepWork
from sampler_service.text.registry import checked_vocabulary

T = TypeVar("T")


def step_keys(request: pb.StepRequest) -> frozenset[str]:
    """The sequences a step request touches (two requests sharing one never share a batch)."""
    return frozenset(row.sequence_id for row in request.rows)


class SamplerServicer(sampler_pb2_grpc.SamplerServicer):
    """`max_streams` bounds open StepStream calls (RESOURCE_EXHAUSTED beyond it); an open
    stream holds no thread while it waits for its next message."""

    def __init__(self, core: SamplerCore, metrics: ServiceMetrics, runner: StepRunner,
                 batcher: StepBatcher, executor: Executor, max_streams: int = 1024):
        self.core = core
        self.runner = runner
        self.metrics = metrics
        self.batcher = batcher
        self.executor = executor
        self.max_streams = max_streams
        self.open_streams = 0
        if batcher.on_batch is None:
            batcher.on_batch = metrics.observe_batch

    async def _in_engine_thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    @map_errors
    async def CreateSequences(self, request, context):
        configs = [convert.sequence_request_from_pb(c) for c in request.sequences]
        states = await self._in_engine_thread(lambda: self.core.create_sequences(configs))
        for entry in states:
            self.metrics.observe_created(entry.root.policy.name, entry.root.policy.split)
        return pb.CreateSequencesResponse(sequences=[convert.created_pb(s) for s in states])

    @map_errors
    async def ReleaseSequences(self, request, context):
        ids = list(request.sequence_ids)
        released, missing = await self._in_engine_thread(lambda: self.core.release(ids))
        return pb.ReleaseSequencesResponse(released=released, not_found=missing)

    @map_errors
    async def GetSequence(self, request, context):
        return await self._in_engine_thread(
            lambda: self.core.read(request.sequence_id, convert.sequence_info_pb))

    async def _step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        """One request through the batcher: its response, or its error raised. A request
        whose deadline passes before its step is committed changes nothing
        (DEADLINE_EXCEEDED)."""
        started = time.perf_counter()
        self.metrics.observe_payload(request)
        regions = contextlib.ExitStack()  # its regions stay registered until it has run
        regions.enter_context(self.runner.hold(request))
        remaining = context.time_remaining()
        work = StepWork(request, None if remaining is None else time.monotonic() + remaining)
        result = await self.batcher.submit(work, len(request.rows), step_keys(request),
                                           release=regions.close)
        if isinstance(result, Exception):
            try:
                raise result
            finally:  # the traceback keeps this frame: it must not keep the exception
                result = None
        elapsed = time.perf_counter() - started
        result.service_micros = int(elapsed * 1e6)
        self.metrics.observe_step(work.outcome.get("policy", MIXED_POLICY), transport_of(request),
                                  elapsed)
        return result

    @map_errors
    async def Step(self, request, context):
        with self.batcher.caller():
            return await self._step(request, context)

    async def StepStream(self, request_iterator, context) -> AsyncIterator[pb.StepResponse]:
        if self.open_streams >= self.max_streams:
            error = ResourceExhausted(f"{self.open_streams} StepStream calls are open, the cap "
                                      f"(--max-streams) is {self.max_streams}: close idle "
                                      "streams, share one per worker, or raise --max-streams",
                                      "--max-streams")
            record_failure(self.metrics, "StepStream", error)
            await abort(context, error)
        self.open_streams += 1
        self.metrics.open_streams.inc()
        try:
            with self.batcher.caller():
                async for request in request_iterator:
                    self.metrics.inflight.inc()
                    try:
                        response = await self._step(request, context)
                    except Exception as exc:  # answered in-band; the stream goes on
                        response = self._in_band(exc, request)
                    else:
                        self.metrics.observe_rpc("StepStream", "OK")
                    finally:
                        self.metrics.inflight.dec()
                    yield response
        finally:
            self.open_streams -= 1
            self.metrics.open_streams.dec()

    def _in_band(self, exc: Exception, request: pb.StepRequest) -> pb.StepResponse:
        """A failed stream request's answer: its error as a status, counted and logged."""
        error = as_service_error(exc)
        record_failure(self.metrics, "StepStream", error, request)
        return pb.StepResponse(error=to_rpc_status(error), request_id=request.request_id)

    @map_errors
    async def RegisterTokenizer(self, request, context):
        def register():  # off the event loop: checking and hashing 100k+ tokens takes a while
            vocabulary = checked_vocabulary(list(request.tokens), list(request.special_ids),
                                            list(request.eos_token_ids), request.tokenizer_json)
            return self.core.tokenizers.register(vocabulary, request.name), vocabulary.size

        tokenizer_id, size = await asyncio.to_thread(register)
        return pb.RegisterTokenizerResponse(tokenizer_id=tokenizer_id, vocab_size=size)

    @map_errors
    async def Preview(self, request, context):
        which = request.WhichOneof("policy_source")
        decode = self.runner.decode_tensor

        policy = dict(policy=request.policy if which == "policy" else "",
                      policy_spec=(convert.struct_to_dict(request.policy_spec)
                                   if which == "policy_spec" else None),
                      params=convert.params_from_pb(request.params))
        if not request.HasField("logits"):
            plan = await self._in_engine_thread(lambda: self.core.explain_plan(**policy))
            return pb.PreviewResponse(planned_chain=plan)

        def preview():
            with self.runner.hold(request):
                return self.core.preview(
                    **policy, logits=decode(request.logits, "logits"),
                    history=list(request.history), prompt_ids=list(request.prompt_ids),
                    eos_token_ids=list(request.eos_token_ids),
                    reference=(decode(request.reference_logits, "reference_logits")
                               if request.HasField("reference_logits") else None))

        self.metrics.observe_payload(request)
        ids, probs = await self._in_engine_thread(preview)
        limit = request.max_candidates or len(ids)
        return pb.PreviewResponse(
            candidates=[pb.Candidate(token_id=t, probability=p) for t, p in zip(ids[:limit], probs[:limit])],
            survivors=len(ids), planned_chain=self.core.explain_plan(**policy))
