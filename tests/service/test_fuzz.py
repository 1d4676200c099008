"""Hypothesis fuzzing through the real server (issue 12, item 7).

Malformed and extreme requests, sent as raw protobuf messages through the generated stubs
(most of them are messages the SDK would refuse to build): random tensor shapes, dtypes
(unknown enum values included) and byte lengths, NaN / ±inf, huge and negative parameters,
random policy specs and Structs, unknown and duplicate sequence ids, out-of-order and
repeated step numbers, random sparse rows, random region references, random signals. Every
call must end OK or with one of the precise codes in `PRECISE` (never UNKNOWN, INTERNAL or
UNAVAILABLE: the server stays up), and after every example a seeded control sequence steps
on the same server: at the end its tokens must equal those of a twin stepped alone on a fresh
server.

Hypothesis is imported inside each test (the suite runs without it); every test is
derandomized so CI is deterministic. 1,350 examples in all (well under
25 s on two CPU cores).
"""
from __future__ import annotations

import math
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc

VOCAB = 32
TIMEOUT_S = 30.0  # a call still running after this is a hang, not a status

PRECISE = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE,
})
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

CONTROL_ID = "\x00control"  # no fuzz id strategy can produce it (they never start with NUL)
CONTROL_ROWS = np.random.default_rng(12).standard_normal((64, VOCAB)).astype("<f4")

# Edge values of every integer width the contract uses.
EDGE_INTS = [0, 1, -1, 2, 31, 32, 33, 64, 65, 1024, 1025, 2 ** 15, 2 ** 31 - 1, 2 ** 31,
             -2 ** 31, -2 ** 31 - 1, 2 ** 32, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63,
             -2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 70]
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-6, 1e-45, 2.0, 100.0, 100.5, 1e38, 3.5e38, 1e308,
               -1e308, 5e-324, float("nan"), float("inf"), float("-inf"),
               float(2 ** 31), float(2 ** 63), float(2 ** 64)]


# -- plumbing ----------------------------------------------------------------------------------

class Fuzzed:
    """Raw stubs on a plain channel to one server, a control sequence stepped after every
    example, and the check that every call ends with a precise status."""

    def __init__(self, server):
        self.channel = grpc.insecure_channel(server.address)
        self.sampler = sampler_pb2_grpc.SamplerStub(self.channel)
        self.regions = sampler_pb2_grpc.SharedMemoryStub(self.channel)
        self.calls: dict[str, int] = {}
        self.control_tokens: list[int] = []
        create_control(self.sampler)

    def call(self, method: str, request, *, stub=None, timeout: float = TIMEOUT_S,
             allow_deadline: bool = False):
        """(code, response or None); fails on any code outside PRECISE."""
        stub = self.sampler if stub is None else stub
        try:
            response = getattr(stub, method)(request, timeout=timeout)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            response, code = None, err.code()
            allowed = PRECISE | ({grpc.StatusCode.DEADLINE_EXCEEDED} if allow_deadline else set())
            assert code in allowed, (
                f"{method} ended {code.name}: {err.details()}\nrequest: {clip(request)}")
        self.calls[code.name] = self.calls.get(code.name, 0) + 1
        return code, response

    def stream(self, requests):
        """Sends `requests` on one StepStream: exactly one response each, every in-band error
        precise, and the stream never ends early."""
        responses = list(self.sampler.StepStream(iter(requests), timeout=TIMEOUT_S))
        assert len(responses) == len(requests)
        for request, response in zip(requests, responses):
            if response.HasField("error"):
                code = CODE_BY_NUMBER.get(response.error.code)
                assert code in PRECISE - {grpc.StatusCode.OK}, (
                    f"StepStream answered {code} in-band: {response.error.message}\n"
                    f"request: {clip(request)}")
                assert not response.choices
            else:
                code = grpc.StatusCode.OK
            self.calls[code.name] = self.calls.get(code.name, 0) + 1
        return responses

    def step_control(self):
        """One step of the control sequence: it always succeeds."""
        row = CONTROL_ROWS[len(self.control_tokens) % len(CONTROL_ROWS)]
        response = self.sampler.Step(control_request(row), timeout=TIMEOUT_S)
        self.control_tokens.append(response.choices[0].token_id)

    def close(self, start_server):
        """The control against a twin stepped alone on a fresh server, and the server up."""
        assert len(self.control_tokens) > 0
        self.channel.close()
        with grpc.insecure_channel(start_server().address) as channel:
            alone = sampler_pb2_grpc.SamplerStub(channel)
            create_control(alone)
            twin = [alone.Step(control_request(CONTROL_ROWS[i % len(CONTROL_ROWS)]),
                               timeout=TIMEOUT_S).choices[0].token_id
                    for i in range(len(self.control_tokens))]
        assert self.control_tokens == twin



def create_control(stub):
    stub.CreateSequences(pb.CreateSequencesRequest(sequences=[pb.SequenceConfig(
        sequence_id=CONTROL_ID, policy="creative", params=pb.SamplingParams(seed=2024),
        prompt_ids=[1, 2, 3])]), timeout=TIMEOUT_S)


def control_request(row: np.ndarray) -> pb.StepRequest:
    return pb.StepRequest(rows=[pb.StepRow(sequence_id=CONTROL_ID)],
                          logits=pb.Tensor(dtype=pb.FP32, shape=[1, VOCAB], raw=row.tobytes()))


def clip(message, limit: int = 600) -> str:
    text = str(message)
    return text if len(text) <= limit else text[:limit] + f"…({len(text)} chars)"


@pytest.fixture
def fuzzed(start_server):
    fuzz = Fuzzed(start_server())
    yield fuzz
    fuzz.close(start_server)


def encode(values: np.ndarray, dtype: int) -> bytes:
    """Little-endian bytes of float values in a wire dtype (4 bytes per element otherwise)."""
    values = np.asarray(values, dtype="<f4")
    if dtype == pb.FP16:
        with np.errstate(over="ignore"):
            return values.astype("<f2").tobytes()
    if dtype == pb.BF16:
        return (values.view("<u4") >> 16).astype("<u2").tobytes()
    return values.tobytes()


def decode(tensor: pb.Tensor) -> np.ndarray | None:
    """A raw 1-D or 2-D tensor of a known dtype as float32 [rows, vocab]; None otherwise."""
    if tensor.WhichOneof("data") != "raw" or tensor.dtype not in (pb.FP32, pb.FP16, pb.BF16):
        return None
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or not all(0 < d < 1 << 20 for d in shape):
        return None
    size = 4 if tensor.dtype == pb.FP32 else 2
    if len(tensor.raw) != math.prod(shape) * size:
        return None
    if tensor.dtype == pb.FP32:
        values = np.frombuffer(tensor.raw, "<f4")
    elif tensor.dtype == pb.FP16:
        values = np.frombuffer(tensor.raw, "<f2").astype("<f4")
    else:
        values = (np.frombuffer(tensor.raw, "<u2").astype("<u4") << 16).view("<f4")
    return values.reshape(shape if len(shape) == 2 else [1, shape[0]])


def hits_surplus_row_bug(request: pb.StepRequest) -> bool:
    """Whether `request` is of the class test_non_finite_logits_in_a_surplus_row pins: dense
    logits with more rows than `rows` has dense entries, whose first non-finite row is one of
    the surplus rows (the error message once indexed `rows` with it: INTERNAL)."""
    if not request.HasField("logits"):
        return False
    values = decode(request.logits)
    if values is None:
        return False
    dense = len([r for r in range(len(request.rows)) if r not in set(request.sparse.rows)])
    with np.errstate(invalid="ignore"):
        bad = np.isnan(values).any(axis=1) | np.isposinf(values).any(axis=1) \
            | np.isneginf(values).all(axis=1)
    return bool(bad.any()) and int(np.flatnonzero(bad)[0]) >= dense


# -- strategies (built inside the tests: hypothesis is imported there) -------------------------

def strategies():
    """The shared strategies, as a namespace (hypothesis imported here, not at module level)."""
    from hypothesis import strategies as st
    from sampler_service.policy.processors import PROCESSORS
    from sampler_service.policy.selectors import SELECTORS

    ns = type("Strategies", (), {})()
    ns.st = st
    edge_int = st.sampled_from(EDGE_INTS)
    ns.any_int = st.one_of(st.integers(-3, 40), edge_int, st.integers(-2 ** 70, 2 ** 70))
    ns.int32 = st.one_of(st.integers(-2, 40), st.sampled_from([2 ** 31 - 1, -2 ** 31, 2 ** 30]),
                         st.integers(-2 ** 31, 2 ** 31 - 1))
    ns.int64 = st.one_of(st.integers(-2, 70), st.sampled_from([e for e in EDGE_INTS
                                                                if -2 ** 63 <= e < 2 ** 63]))
    ns.uint64 = st.one_of(st.integers(0, 300), st.sampled_from([e for e in EDGE_INTS
                                                                 if 0 <= e < 2 ** 64]))
    ns.uint32 = st.one_of(st.integers(0, 6), st.sampled_from([2 ** 31, 2 ** 32 - 1]))
    ns.any_float = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True))
    ns.float32 = st.one_of(st.sampled_from([f for f in EDGE_FLOATS if not abs(f) > 3.4e38
                                            or math.isinf(f)]),
                           st.floats(width=32, allow_nan=True))
    ns.text = st.text(max_size=12)
    # Sequence ids: a small pool (so duplicates and live ids come up), random text, a long one.
    ns.seq_id = st.one_of(st.sampled_from(["s0", "s1", "s2", "s3", "beam", "fork", ""]),
                          st.text(min_size=1, max_size=10).filter(lambda s: s[0] != "\x00"),
                          st.just("L" * 5000))
    ns.token_ids = st.lists(ns.int32, max_size=6)
    ns.json_leaf = json_leaf = st.one_of(st.none(), st.booleans(), ns.any_float, ns.any_int,
                                         ns.text)
    ns.json = st.recursive(json_leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(ns.text, inner, max_size=4)), max_leaves=12)

    # Values a stage parameter may be given: of every kind the schemas read, and not.
    ns.param_value = st.one_of(
        ns.any_int, ns.any_float, st.sampled_from(["newline", "entropy", "hf", "gnmt", "true",
                                                   "false", "never", "first", "later", "custom",
                                                   "first_step", "chaotic_point", ""]),
        st.lists(ns.any_int, max_size=4), st.lists(st.lists(ns.any_int, max_size=3), max_size=3),
        st.dictionaries(st.one_of(ns.text, ns.any_int.map(str)), ns.any_float | ns.any_int,
                        max_size=3),
        st.booleans(), st.none(), ns.json)

    def stage(known):
        """A stage entry: a known key with random values for its own parameter names (or
        random names), a bare name, or something that is no stage at all."""
        keys = sorted(known)

        @st.composite
        def entry(draw):
            kind = draw(st.integers(0, 9))
            if kind == 0:
                return draw(ns.json)
            key = draw(st.sampled_from(keys) if kind > 1 else ns.text)
            if kind == 2:
                return key
            names = [p.name for p in getattr(known.get(key), "params", ())] or ["x"]
            params = draw(st.dictionaries(st.sampled_from(names) | ns.text, ns.param_value,
                                          max_size=4))
            return {key: params}
        return entry()

    def schema_value(param):
        """A value inside the parameter's schema (its range's edges included)."""
        token = st.integers(0, VOCAB + 2) | st.just(2 ** 31 - 1)
        if param.kind == "choice":
            return st.sampled_from(param.choices)
        if param.kind == "int_list":
            return st.lists(token, max_size=3)
        if param.kind == "int_lists":
            return st.lists(st.lists(token, min_size=1, max_size=3), max_size=3)
        if param.kind == "token_bias":
            return st.dictionaries(token.map(str), st.floats(-100, 100), max_size=3)
        if param.kind == "int_map":
            return st.dictionaries(st.integers(0, 4).map(str), token, max_size=2)
        low = param.minimum if param.minimum is not None else -3
        if param.kind == "int":
            high = param.maximum if param.maximum is not None else 2 ** 31 - 1
            return st.one_of(st.integers(int(low), int(min(high, low + 70))),
                             st.sampled_from(sorted({int(low), int(high)})))
        high = param.maximum if param.maximum is not None else 1e6
        edges = [v for v in (low, high, low + 1e-6, 1e-5, 0.5, 1.0, 2.0, 1e30)
                 if low <= v <= high and not (param.exclusive_minimum and v == low)]
        return st.one_of(st.floats(low, min(high, low + 10.0),
                                   exclude_min=param.exclusive_minimum),
                         st.sampled_from(edges))

    def valid_stage(known):
        """A known stage with values inside its schema (any subset of its parameters)."""
        @st.composite
        def entry(draw):
            key = draw(st.sampled_from(sorted(known)))
            schema = getattr(known[key], "params", None) or ()
            chosen = draw(st.lists(st.sampled_from(schema), unique_by=lambda p: p.name,
                                   max_size=len(schema))) if schema else []
            return {key: {p.name: draw(schema_value(p)) for p in chosen}}
        return entry()

    ns.processor = st.one_of(valid_stage(PROCESSORS), valid_stage(PROCESSORS), stage(PROCESSORS))
    ns.selector = st.one_of(st.sampled_from(["greedy", "sample"]), valid_stage(SELECTORS),
                            stage(SELECTORS))
    settings_names = ["max_tokens", "stop_token_ids", "seed", "logprobs", "n", "best_of",
                      "temperature", "top_k"]

    @st.composite
    def policy_spec(draw):
        """A random policy: mostly the right shape with random contents, sometimes any Struct."""
        if draw(st.integers(0, 7)) == 0:
            return draw(st.dictionaries(ns.text, ns.json, max_size=4))
        spec = {}
        if draw(st.booleans()) or draw(st.booleans()):
            spec["chain"] = draw(st.lists(ns.processor, max_size=4))
        if draw(st.integers(0, 5)):
            spec["select"] = draw(ns.selector)
        if draw(st.integers(0, 3)) == 0:
            spec["defaults"] = draw(st.dictionaries(st.sampled_from(settings_names) | ns.text,
                                                    ns.param_value, max_size=3))
        if draw(st.integers(0, 3)) == 0:
            spec["overridable"] = draw(st.lists(st.sampled_from(settings_names) | ns.text
                                                | ns.json_leaf, max_size=3) | ns.json)
        if draw(st.integers(0, 5)) == 0:
            spec[draw(st.sampled_from(["follow_latest", "description", "split"]) | ns.text)] = \
                draw(ns.json)
        return spec
    ns.policy_spec = policy_spec()

    @st.composite
    def params(draw):
        """SamplingParams with any subset of fields set to typical, edge or absurd values."""
        fields = {}
        floats = ["temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty"]
        ints = ["top_k", "min_tokens", "max_tokens", "logprobs", "n", "best_of"]
        for name in draw(st.lists(st.sampled_from(floats + ints + ["seed"]), max_size=4,
                                  unique=True)):
            if name in floats:
                fields[name] = draw(st.one_of(st.floats(0, 2, width=32), ns.float32))
            elif name == "seed":
                fields[name] = draw(ns.uint64)
            else:
                fields[name] = draw(st.one_of(st.integers(-1, 4), ns.int32))
        message = pb.SamplingParams(**fields)
        if draw(st.integers(0, 4)) == 0:
            message.stop_token_ids.extend(draw(ns.token_ids))
        if draw(st.integers(0, 4)) == 0:
            message.allowed_token_ids.extend(draw(ns.token_ids))
        if draw(st.integers(0, 4)) == 0:
            for key, value in draw(st.dictionaries(ns.int32, ns.float32, max_size=3)).items():
                message.logit_bias[key] = value
        if draw(st.integers(0, 4)) == 0:
            for ids in draw(st.lists(ns.token_ids, max_size=3)):
                message.bad_words.add(ids=ids)
        return message
    ns.params = params()

    @st.composite
    def values(draw, count: int, clean: bool = False) -> np.ndarray:
        """`count` float logits: normal, with NaN / ±inf / huge entries, or all -inf."""
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
        out = (rng.standard_normal(count) * draw(st.sampled_from([1.0, 3.0, 1e-3, 1e4])))
        out = out.astype("<f4")
        poison = 9 if clean else draw(st.integers(0, 9))
        if count and poison <= 3:
            where = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=3))
            out[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38]))
        elif count and poison == 4:
            out[:] = -np.inf
        elif poison == 5:
            out[:] = draw(st.sampled_from([0.0, 1.0, -1e30]))  # ties everywhere
        return out
    ns.values = values

    @st.composite
    def region_ref(draw, names=("fuzz-region",)):
        return pb.RegionRef(region=draw(st.sampled_from(list(names)) | ns.text),
                            offset=draw(ns.uint64), byte_size=draw(ns.uint64))
    ns.region_ref = region_ref

    @st.composite
    def tensor(draw, rows: int, vocab: int = VOCAB, regions=("fuzz-region",), clean=False):
        """A tensor meant as [rows, vocab] logits, then broken in one random way (or not;
        `clean`: never)."""
        good = st.sampled_from([pb.FP32, pb.FP32, pb.FP16, pb.BF16])
        dtype = draw(good if clean else st.one_of(
            good, st.sampled_from([pb.DTYPE_UNSPECIFIED, 4, 99, -1, 2 ** 31 - 1])))
        shape = [rows, vocab]
        how = 0 if clean else draw(st.integers(0, 12))
        if how == 1:
            shape = draw(st.lists(st.one_of(st.integers(-2, 40), st.sampled_from(EDGE_INTS)
                                            .filter(lambda e: -2 ** 63 <= e < 2 ** 63)),
                                  max_size=4))
        elif how == 2:
            shape = draw(st.sampled_from([[vocab], [1, 1, vocab], [rows, 0], [0, vocab],
                                          [1] * 65 + [vocab], [rows, -vocab],
                                          [2 ** 31, 2 ** 31], [2 ** 62, 4], [1, 2 ** 40]]))
        count = math.prod(shape) if all(0 <= d < 4096 for d in shape) else 0
        count = count if count <= 8192 else 0
        raw = encode(draw(values(count, clean)), dtype) if dtype in (1, 2, 3) else bytes(4 * count)
        message = pb.Tensor(dtype=dtype, shape=shape)
        if how == 3:
            message.raw = raw[:draw(st.integers(0, max(len(raw) - 1, 0)))]  # truncated
        elif how == 4:
            message.raw = raw + bytes(draw(st.integers(1, 9)))  # oversize
        elif how == 5:
            message.raw = draw(st.binary(max_size=64))
        elif how == 6:
            pass  # no data at all
        elif how == 7:
            message.shared_memory.CopyFrom(draw(region_ref(regions)))
        elif how == 8:
            message.cuda_ipc.CopyFrom(draw(region_ref(regions)))
        else:
            message.raw = raw
        return message
    ns.tensor = tensor

    ns.signals = st.lists(st.builds(
        pb.RowSignals, **{name: st.one_of(st.floats(0, 10, width=32), ns.float32)
                          for name in ("attention_entropy", "attention_varentropy",
                                       "agreement", "interaction_strength")}), max_size=3)

    @st.composite
    def clean_sparse(draw, rows: int):
        """Exact SparseRows for a nonempty subset of `rows` rows (K best of a random row, the
        tail's statistics computed in float64), and the dense rows left: (sparse, dense)."""
        chosen = draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows,
                               unique=True).map(sorted))
        k = draw(st.sampled_from([1, 2, 5, VOCAB - 1, VOCAB]))
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
        full = (rng.standard_normal((rows, VOCAB)) * 3).astype("<f4")
        ids, tails = [], []
        for r in chosen:
            order = np.argsort(-full[r], kind="stable")
            ids.append(order[:k])
            rest = full[r][order[k:]].astype(np.float64)
            if rest.size == 0:
                tails.append(pb.TailStats(max=-math.inf, log_sum_exp=-math.inf))
                continue
            top = rest.max()
            weights = np.exp(rest - top)
            tails.append(pb.TailStats(
                max=float(top), log_sum_exp=float(top + np.log(weights.sum())),
                mean=float((weights * rest).sum() / weights.sum()),
                mean_square=float((weights * rest * rest).sum() / weights.sum())))
        ids = np.stack(ids).astype("<i4")
        values = np.take_along_axis(full[chosen], ids, axis=1)
        dtype = draw(st.sampled_from([pb.FP32, pb.FP16, pb.BF16]))
        message = pb.SparseRows(rows=chosen, vocab_size=VOCAB, token_ids=ids.tobytes(),
                                logits=pb.Tensor(dtype=dtype, shape=list(values.shape),
                                                 raw=encode(values, dtype)), tails=tails)
        dense = [r for r in range(rows) if r not in chosen]
        return message, full[dense]
    ns.clean_sparse = clean_sparse

    @st.composite
    def sparse(draw, rows: int):
        """SparseRows for some of `rows` rows: K best ids, their logits and tails, each
        consistent or broken."""
        chosen = draw(st.one_of(
            st.lists(st.integers(0, max(rows - 1, 0)), min_size=1, max_size=rows or 1,
                     unique=True).map(sorted),
            st.lists(ns.uint32, max_size=3)))
        k = draw(st.sampled_from([1, 2, 5, VOCAB, VOCAB + 1, 0]))
        vocab = draw(st.one_of(st.just(VOCAB), ns.int64))
        rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
        ids = np.stack([rng.permutation(VOCAB)[:min(k, VOCAB)] for _ in chosen]) if chosen \
            else np.zeros((0, k), dtype="<i4")
        ids = ids.astype("<i4")
        broken_ids = draw(st.integers(0, 6))
        if broken_ids == 0 and ids.size:
            ids.flat[draw(st.integers(0, ids.size - 1))] = draw(ns.int32)  # a random id
        elif broken_ids == 1 and ids.shape[1] > 1:
            ids[:, 1] = ids[:, 0]  # duplicates
        token_ids = ids.tobytes()
        if broken_ids == 2:
            token_ids = token_ids[:-3]
        logits = draw(tensor(len(chosen), ids.shape[1] if ids.ndim == 2 else k))
        tails = []
        for _ in range(draw(st.sampled_from([len(chosen), len(chosen), 0, len(chosen) + 1]))):
            if draw(st.booleans()):
                tails.append(pb.TailStats(max=-5.0, log_sum_exp=-2.0, mean=-6.0,
                                          mean_square=37.0))
            else:
                tails.append(pb.TailStats(max=draw(ns.float32), log_sum_exp=draw(ns.any_float),
                                          mean=draw(ns.any_float),
                                          mean_square=draw(ns.any_float)))
        return pb.SparseRows(rows=chosen, vocab_size=vocab, token_ids=token_ids, logits=logits,
                             tails=tails)
    ns.sparse = sparse
    return ns


def run(test_function, examples: int):
    """`test_function` under the suite's settings: deterministic, no deadline."""
    from hypothesis import HealthCheck, settings
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))(test_function)()


def create_pool(fuzz: Fuzzed):
    """Live sequences of every kind for steps to name (fuzz steps change them at random)."""
    configs = [
        pb.SequenceConfig(sequence_id="s0", policy="greedy"),
        pb.SequenceConfig(sequence_id="s1", policy="default", params=pb.SamplingParams(seed=1),
                          prompt_ids=[1, 2, 3], eos_token_ids=[0]),
        pb.SequenceConfig(sequence_id="s2", policy="entropix", params=pb.SamplingParams(seed=2)),
        pb.SequenceConfig(sequence_id="s3", params=pb.SamplingParams(max_tokens=3, logprobs=3)),
        pb.SequenceConfig(sequence_id="beam", policy_spec=struct(
            {"select": {"beam": {"width": 2}}, "defaults": {"max_tokens": 50}})),
        pb.SequenceConfig(sequence_id="fork", policy="default",
                          params=pb.SamplingParams(n=2, seed=3)),
    ]
    fuzz.sampler.CreateSequences(pb.CreateSequencesRequest(sequences=configs), timeout=TIMEOUT_S)


def struct(value: dict):
    from google.protobuf import struct_pb2
    message = struct_pb2.Struct()
    message.update(value)
    return message


# -- the fuzz tests ------------------------------------------------------------------------------

def test_fuzz_steps(fuzzed):
    """Step and StepStream with random rows (live, unknown and duplicate ids; random,
    repeated and out-of-order step numbers and branches), random logits tensors, reference
    logits and signals."""
    pytest.importorskip("hypothesis")
    from hypothesis import given

    ns = strategies()
    st = ns.st
    create_pool(fuzzed)
    row = st.builds(lambda sid, step, branch: pb.StepRow(sequence_id=sid, step=step,
                                                         branch=branch),
                    ns.seq_id, st.none() | st.integers(0, 4) | ns.uint64,
                    st.none() | st.integers(0, 2) | ns.uint32)

    @st.composite
    def request(draw):
        clean = draw(st.integers(0, 2)) == 0  # a third are well formed: they step for real
        if clean:
            rows = [pb.StepRow(sequence_id=s) for s in draw(st.lists(
                st.sampled_from(["s0", "s1", "s2", "s3"]), min_size=1, max_size=3, unique=True))]
        else:
            rows = draw(st.lists(row, max_size=4))
        message = pb.StepRequest(rows=rows, request_id=draw(ns.text),
                                 processed_logprobs=draw(st.booleans()))
        dense = 2 if clean else draw(st.integers(0, 9))
        if dense:
            message.logits.CopyFrom(draw(ns.tensor(len(rows) if dense > 1
                                                   else draw(st.integers(0, 5)), clean=clean)))
        if draw(st.integers(0, 4)) == 0:
            message.reference_logits.CopyFrom(draw(ns.tensor(len(rows))))
        if draw(st.integers(0, 3)) == 0:
            message.signals.extend(draw(ns.signals))
        return message

    @given(requests=st.lists(request(), min_size=1, max_size=3), on_stream=st.booleans())
    def check(requests, on_stream):
        if on_stream:
            fuzzed.stream(requests)
        else:
            for message in requests:
                fuzzed.call("Step", message)
        fuzzed.step_control()

    run(check, 300)
    assert fuzzed.calls.get("OK", 0) >= 20, fuzzed.calls  # the fuzz reaches real steps too


def test_fuzz_create_then_step(fuzzed):
    """CreateSequences with random configs (ids, policies, random policy specs, extreme
    SamplingParams, prompt and EOS ids); whatever is created then steps (a parameter the
    creation accepted must not fail the step imprecisely), is read and released."""
    pytest.importorskip("hypothesis")
    from hypothesis import given

    ns = strategies()
    st = ns.st
    policy_names = st.sampled_from(["greedy", "default", "creative", "edt", "dynatemp",
                                    "entropix", "cot", ""]) | ns.text

    @st.composite
    def config(draw):
        message = pb.SequenceConfig(sequence_id=draw(ns.seq_id))
        source = draw(st.integers(0, 3))
        if source in (0, 3):
            message.policy = draw(policy_names)
        if source in (1, 3):
            message.policy_spec.CopyFrom(struct(draw(ns.policy_spec)))
        if draw(st.booleans()):
            message.params.CopyFrom(draw(ns.params))
        message.prompt_ids.extend(draw(ns.token_ids))
        message.eos_token_ids.extend(draw(st.lists(st.integers(-1, VOCAB), max_size=2)))
        return message

    @given(configs=st.lists(config(), min_size=0, max_size=3), vocab=st.sampled_from(
        [VOCAB, VOCAB, 2, 1]), seed=st.integers(0, 2 ** 16), steps=st.integers(1, 3))
    def check(configs, vocab, seed, steps):
        code, response = fuzzed.call("CreateSequences",
                                     pb.CreateSequencesRequest(sequences=configs))
        created = list(response.sequences) if response is not None else []
        rng = np.random.default_rng(seed)
        for made in created:
            rows = made.running_rows
            for _ in range(steps):
                message = pb.StepRequest(
                    rows=[pb.StepRow(sequence_id=made.sequence_id)] * rows,
                    logits=pb.Tensor(dtype=pb.FP32, shape=[rows, vocab],
                                     raw=rng.standard_normal(rows * vocab).astype("<f4")
                                     .tobytes()))
                code, answer = fuzzed.call("Step", message)
                if code != grpc.StatusCode.OK:
                    break
                rows = sum(not choice.finished for choice in answer.choices)
                if rows == 0:
                    break
            fuzzed.call("GetSequence", pb.GetSequenceRequest(sequence_id=made.sequence_id))
        fuzzed.call("ReleaseSequences", pb.ReleaseSequencesRequest(
            sequence_ids=[made.sequence_id for made in created]))
        fuzzed.step_control()

    run(check, 300)
    assert fuzzed.calls.get("OK", 0) >= 50, fuzzed.calls


def test_fuzz_preview(fuzzed):
    """Preview with random policies or specs, params, logits, history, prompt, EOS ids,
    max_candidates and reference logits."""
    pytest.importorskip("hypothesis")
    from hypothesis import given

    ns = strategies()
    st = ns.st

    @st.composite
    def request(draw):
        message = pb.PreviewRequest()
        source = draw(st.integers(0, 2))
        if source == 0:
            message.policy = draw(st.sampled_from(["greedy", "default", "creative", "edt",
                                                   "dynatemp", "entropix", "cot"]) | ns.text)
        elif source == 1:
            message.policy_spec.CopyFrom(struct(draw(ns.policy_spec)))
        if draw(st.booleans()):
            message.params.CopyFrom(draw(ns.params))
        if draw(st.integers(0, 5)):
            message.logits.CopyFrom(draw(ns.tensor(1, clean=draw(st.booleans()))))
        if draw(st.integers(0, 5)) == 0:
            message.reference_logits.CopyFrom(draw(ns.tensor(1)))
        message.history.extend(draw(ns.token_ids))
        message.prompt_ids.extend(draw(ns.token_ids))
        message.eos_token_ids.extend(draw(st.lists(st.integers(-1, VOCAB), max_size=2)))
        message.max_candidates = draw(ns.uint32)
        return message

    @given(message=request())
    def check(message):
        fuzzed.call("Preview", message)
        fuzzed.step_control()

    run(check, 250)
    assert fuzzed.calls.get("OK", 0) >= 20, fuzzed.calls


def test_fuzz_sparse_rows(fuzzed):
    """Steps whose rows come (partly) as SparseRows: random row indices, vocabulary sizes,
    ids (out of range, duplicated, truncated), K, logits and tail statistics."""
    pytest.importorskip("hypothesis")
    from hypothesis import given

    ns = strategies()
    st = ns.st
    create_pool(fuzzed)

    @st.composite
    def request(draw):
        if draw(st.integers(0, 2)) == 0:  # well formed: the rows the policy allows step
            ids = draw(st.lists(st.sampled_from(["s0", "s1", "s2", "s3"]), min_size=1,
                                max_size=3, unique=True))
            message = pb.StepRequest(rows=[pb.StepRow(sequence_id=i) for i in ids])
            sparse, dense = draw(ns.clean_sparse(len(ids)))
            message.sparse.CopyFrom(sparse)
            if len(dense):
                message.logits.CopyFrom(pb.Tensor(dtype=pb.FP32, shape=list(dense.shape),
                                                  raw=dense.tobytes()))
            return message
        ids = draw(st.lists(st.sampled_from(["s0", "s1", "s2", "s3", "nobody"]), min_size=1,
                            max_size=3))
        message = pb.StepRequest(rows=[pb.StepRow(sequence_id=i) for i in ids])
        message.sparse.CopyFrom(draw(ns.sparse(len(ids))))
        dense = len(ids) - len(message.sparse.rows)
        if draw(st.integers(0, 3)):
            message.logits.CopyFrom(draw(ns.tensor(max(dense, 0))))
        return message

    @given(message=request(), on_stream=st.booleans())
    def check(message, on_stream):
        if on_stream:
            fuzzed.stream([message])
        else:
            fuzzed.call("Step", message)
        fuzzed.step_control()

    run(check, 150)


def test_fuzz_region_references(fuzzed):
    """Tensors by reference to a registered shared-memory region (or none, or a CUDA one on
    a CPU service) at random offsets and sizes, and random SharedMemory calls."""
    pytest.importorskip("hypothesis")
    from hypothesis import given

    ns = strategies()
    st = ns.st
    create_pool(fuzzed)
    segment = shared_memory.SharedMemory(create=True, size=4096)
    try:
        segment.buf[:4096] = np.random.default_rng(5).standard_normal(1024).astype("<f4") \
            .tobytes()
        fuzzed.regions.RegisterSystemRegion(pb.RegisterSystemRegionRequest(
            name="fuzz-region", key=segment.name, byte_size=4096, client_id="owner"),
            timeout=TIMEOUT_S)
        names = ("fuzz-region",)
        shm_names = st.sampled_from(["/nope", "nope", "a/b", "/dev/shm/x", "", "..",
                                     segment.name]) | ns.text

        @st.composite
        def ref_tensor(draw):
            offset = draw(st.one_of(st.integers(0, 4096).map(lambda o: o - o % 4), ns.uint64))
            size = draw(st.sampled_from([4 * VOCAB, 2 * VOCAB, 4 * VOCAB - 1, 0]) | ns.uint64)
            dtype = draw(st.sampled_from([pb.FP32, pb.FP16, pb.BF16, 0, 7]))
            shape = draw(st.sampled_from([[1, VOCAB], [VOCAB], [1, VOCAB // 2], [2, VOCAB]]))
            ref = pb.RegionRef(region=draw(st.sampled_from(names) | ns.text), offset=offset,
                               byte_size=size)
            kind = draw(st.sampled_from(["shared_memory", "shared_memory", "cuda_ipc"]))
            return pb.Tensor(dtype=dtype, shape=shape, **{kind: ref})

        @st.composite
        def admin_call(draw):
            what = draw(st.integers(0, 3))
            if what == 0:
                return "RegisterSystemRegion", pb.RegisterSystemRegionRequest(
                    name=draw(ns.text.filter(lambda n: n != "fuzz-region")),
                    key=draw(shm_names), offset=draw(ns.uint64), byte_size=draw(ns.uint64),
                    client_id=draw(ns.text.filter(lambda c: c != "owner")))
            if what == 1:
                return "RegisterCudaRegion", pb.RegisterCudaRegionRequest(
                    name=draw(ns.text.filter(lambda n: n != "fuzz-region")),
                    raw_handle=draw(st.binary(max_size=80)), device_id=draw(ns.int64),
                    byte_size=draw(ns.uint64), client_id=draw(ns.text))
            if what == 2:
                return "UnregisterRegion", pb.UnregisterRegionRequest(
                    name=draw(ns.text.filter(lambda n: n != "fuzz-region")),
                    client_id=draw(ns.text.filter(lambda c: c != "owner")))
            return "RegionStatus", pb.RegionStatusRequest(name=draw(st.sampled_from(names)
                                                                    | ns.text))

        @given(tensor=ref_tensor(), sid=st.sampled_from(["s0", "s1", "s2", "nobody"]),
               admin=st.none() | admin_call(), as_reference=st.booleans())
        def check(tensor, sid, admin, as_reference):
            if admin is not None:
                method, message = admin
                if method == "UnregisterRegion" and not message.name:
                    # An empty name releases every region of that client id: never "owner".
                    message.client_id = message.client_id or "stranger"
                fuzzed.call(method, message, stub=fuzzed.regions)
            message = pb.StepRequest(rows=[pb.StepRow(sequence_id=sid)])
            if as_reference and tensor.shape[-1:] == [VOCAB]:
                message.logits.CopyFrom(pb.Tensor(dtype=pb.FP32, shape=[1, VOCAB],
                                                  raw=bytes(4 * VOCAB)))
                message.reference_logits.CopyFrom(tensor)
            else:
                message.logits.CopyFrom(tensor)
            fuzzed.call("Step", message)
            fuzzed.step_control()

        run(check, 150)
        status = fuzzed.regions.RegionStatus(pb.RegionStatusRequest(name="fuzz-region"),
                                             timeout=TIMEOUT_S)
        assert [r.name for r in status.regions] == ["fuzz-region"]
        assert status.regions[0].in_use == 0  # no fuzzed step left it pinned
        fuzzed.regions.UnregisterRegion(pb.UnregisterRegionRequest(name="fuzz-region"),
                                        timeout=TIMEOUT_S)
    finally:
        segment.close()
        segment.unlink()


def test_fuzz_sequence_lifecycle(fuzzed):
    """Random sequences of create / step (repeated, skipped and stale step numbers; short
    deadlines) / get / release on a few ids, with GetSequence and ReleaseSequences on random
    ids: statuses stay precise, and a repeated step number answers as the first time."""
    pytest.importorskip("hypothesis")
    from hypothesis import given

    ns = strategies()
    st = ns.st
    ids = ["a", "b", "c"]
    op = st.one_of(
        st.tuples(st.just("create"), st.sampled_from(ids),
                  st.sampled_from(["greedy", "default", "creative"]), ns.uint64),
        st.tuples(st.just("step"), st.lists(st.sampled_from(ids), min_size=1, max_size=3),
                  st.none() | st.integers(0, 5) | ns.uint64, st.integers(0, 2 ** 16),
                  st.none() | st.sampled_from([1e-4, 1e-3, 5e-3])),
        st.tuples(st.just("get"), ns.seq_id | st.sampled_from(ids)),
        st.tuples(st.just("release"), st.lists(ns.seq_id | st.sampled_from(ids), max_size=4)),
    )
    answered: dict[tuple[str, int], int] = {}  # (id, step) -> token, of steps that succeeded

    @given(ops=st.lists(op, min_size=1, max_size=6))
    def check(ops):
        for what, *args in ops:
            if what == "create":
                sid, policy, seed = args
                code, _ = fuzzed.call("CreateSequences", pb.CreateSequencesRequest(sequences=[
                    pb.SequenceConfig(sequence_id=sid, policy=policy,
                                      params=pb.SamplingParams(seed=seed))]))
                if code == grpc.StatusCode.OK:
                    for key in [k for k in answered if k[0] == sid]:
                        del answered[key]
            elif what == "step":
                sids, step, seed, deadline = args
                logits = np.random.default_rng(seed).standard_normal(
                    (len(sids), VOCAB)).astype("<f4")
                message = pb.StepRequest(
                    rows=[pb.StepRow(sequence_id=s, step=step) for s in sids],
                    logits=pb.Tensor(dtype=pb.FP32, shape=[len(sids), VOCAB],
                                     raw=logits.tobytes()))
                code, response = fuzzed.call("Step", message, timeout=deadline or TIMEOUT_S,
                                             allow_deadline=deadline is not None)
                if code == grpc.StatusCode.OK:
                    for choice in response.choices:  # a retried step answers as before
                        first = answered.setdefault((choice.sequence_id, choice.step),
                                                    choice.token_id)
                        assert choice.token_id == first, (choice, first)
            elif what == "get":
                fuzzed.call("GetSequence", pb.GetSequenceRequest(sequence_id=args[0]))
            else:
                code, response = fuzzed.call("ReleaseSequences",
                                             pb.ReleaseSequencesRequest(sequence_ids=args[0]))
                assert code == grpc.StatusCode.OK  # unknown ids are reported, not an error
                assert CONTROL_ID not in response.released
                for key in [k for k in answered if k[0] in response.released]:
                    del answered[key]
        fuzzed.step_control()

    run(check, 200)


def test_fuzz_resume_records(fuzzed):
    """CreateSequences with `resume`: genuine records of every kind of sequence (plain,
    mirostat, beam, forks, CoT), then broken at random (any field of the record or of its
    state replaced, dropped or grown; random output ids and stats); a re-creation that is
    accepted then steps, and the step's status is precise too."""
    pytest.importorskip("hypothesis")
    from google.protobuf import json_format
    from hypothesis import given

    ns = strategies()
    st = ns.st
    kinds = {
        "plain": pb.SequenceConfig(policy="default", params=pb.SamplingParams(seed=1),
                                   prompt_ids=[1, 2], eos_token_ids=[0]),
        "mirostat": pb.SequenceConfig(policy_spec=struct({"select": {"mirostat": {"tau": 3.0}}})),
        "beam": pb.SequenceConfig(policy_spec=struct({"select": {"beam": {"width": 2}},
                                                      "defaults": {"max_tokens": 40}})),
        "fork": pb.SequenceConfig(policy="default", params=pb.SamplingParams(n=2, seed=3)),
        "cot": pb.SequenceConfig(policy_spec=struct({"select": {"cot": {"k": 2}},
                                                     "defaults": {"max_tokens": 40}})),
    }
    genuine: dict[str, tuple[pb.SequenceConfig, pb.ResumeState]] = {}
    rng = np.random.default_rng(0)
    for kind, config in kinds.items():
        config.sequence_id = f"resume-{kind}"
        _, created = fuzzed.call("CreateSequences", pb.CreateSequencesRequest(sequences=[config]))
        rows, tokens = created.sequences[0].running_rows, []
        for _ in range(3):
            logits = rng.standard_normal((rows, VOCAB)).astype("<f4")
            code, answer = fuzzed.call("Step", pb.StepRequest(
                rows=[pb.StepRow(sequence_id=config.sequence_id)] * rows, resume_records=True,
                logits=pb.Tensor(dtype=pb.FP32, shape=[rows, VOCAB], raw=logits.tobytes())))
            assert code == grpc.StatusCode.OK
            rows = sum(not c.finished for c in answer.choices)
            tokens.append(answer.choices[0].token_id)
        point = pb.ResumeState(record=answer.resume[0])
        if kind in ("plain", "mirostat"):
            point.output_ids.extend(tokens)
        genuine[kind] = (config, point)
        fuzzed.call("ReleaseSequences", pb.ReleaseSequencesRequest(
            sequence_ids=[config.sequence_id]))

    @st.composite
    def broken(draw, value):
        """`value` (plain data) with one random node replaced, dropped or grown."""
        if isinstance(value, dict) and value and draw(st.integers(0, 3)):
            key = draw(st.sampled_from(sorted(value)))
            how = draw(st.integers(0, 5))
            if how == 0:
                return {k: v for k, v in value.items() if k != key}
            return {**value, key: draw(broken(value[key]))}
        if isinstance(value, list) and value and draw(st.integers(0, 3)):
            index = draw(st.integers(0, len(value) - 1))
            how = draw(st.integers(0, 5))
            if how == 0:
                return value[:index] + value[index + 1:]
            if how == 1:
                return value + [draw(ns.json)]
            return value[:index] + [draw(broken(value[index]))] + value[index + 1:]
        return draw(ns.json | ns.any_float | st.integers(-2, VOCAB + 2))

    @given(kind=st.sampled_from(sorted(kinds)), how=st.integers(0, 7), data=st.data())
    def check(kind, how, data):
        config, point = genuine[kind]
        message = pb.SequenceConfig()
        message.CopyFrom(config)
        message.resume.CopyFrom(point)
        record = message.resume.record
        if how <= 3:  # the state, broken
            state = json_format.MessageToDict(record.state)
            record.state.Clear()
            state = data.draw(broken(state))
            record.state.update(state if isinstance(state, dict) else {})  # a Struct: a mapping
        elif how == 4:
            record.version = data.draw(ns.uint32)
            record.position = data.draw(ns.uint64)
        elif how == 5:
            record.sequence_id = data.draw(ns.seq_id)
            record.policy_hash = data.draw(ns.text)
            record.seed = data.draw(ns.uint64)
        elif how == 6:
            del message.resume.output_ids[:]
            message.resume.output_ids.extend(data.draw(ns.token_ids))
            message.resume.stats.extend(pb.StepStats(entropy=e, varentropy=v) for e, v in
                                        data.draw(st.lists(st.tuples(ns.float32, ns.float32),
                                                           max_size=4)))
        else:
            message.resume.ClearField("record")
        code, created = fuzzed.call("CreateSequences",
                                    pb.CreateSequencesRequest(sequences=[message]))
        if code == grpc.StatusCode.OK:
            rows = created.sequences[0].running_rows
            logits = np.random.default_rng(how).standard_normal((rows, VOCAB)).astype("<f4")
            fuzzed.call("Step", pb.StepRequest(
                rows=[pb.StepRow(sequence_id=config.sequence_id)] * rows, resume_records=True,
                logits=pb.Tensor(dtype=pb.FP32, shape=[rows, VOCAB], raw=logits.tobytes())))
            fuzzed.call("ReleaseSequences", pb.ReleaseSequencesRequest(
                sequence_ids=[config.sequence_id]))
        fuzzed.step_control()

    run(check, 250)
    assert fuzzed.calls.get("OK", 0) >= 20, fuzzed.calls


# -- bugs the fuzzing found, fixed (each test failed before its fix) ---------------------------

@pytest.mark.parametrize("rows, poison", [([], float("nan")), (["g"], float("inf")),
                                          (["g"], float("-inf"))])
def test_non_finite_logits_in_a_surplus_row(server, rows, poison):
    with grpc.insecure_channel(server.address) as channel:
        stub = sampler_pb2_grpc.SamplerStub(channel)
        stub.CreateSequences(pb.CreateSequencesRequest(sequences=[
            pb.SequenceConfig(sequence_id="g", policy="greedy")]), timeout=TIMEOUT_S)
        values = np.zeros((2, VOCAB), "<f4")
        values[1] = poison if math.isinf(poison) and poison < 0 else 0.0
        values[1, 0] = poison
        request = pb.StepRequest(rows=[pb.StepRow(sequence_id=r) for r in rows],
                                 logits=pb.Tensor(dtype=pb.FP32, shape=[2, VOCAB],
                                                  raw=values.tobytes()))
        assert hits_surplus_row_bug(request)
        with pytest.raises(grpc.RpcError) as err:
            stub.Step(request, timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


@pytest.mark.parametrize("entry", [["temperature"], {"a": 1}])
@pytest.mark.parametrize("rpc", ["CreateSequences", "Preview"])
def test_unhashable_overridable_entry(server, entry, rpc):
    spec = struct({"chain": [{"temperature": {"temperature": 0.7}}], "select": "sample",
                   "overridable": [entry]})
    request = (pb.CreateSequencesRequest(sequences=[pb.SequenceConfig(sequence_id="x",
                                                                      policy_spec=spec)])
               if rpc == "CreateSequences" else pb.PreviewRequest(policy_spec=spec))
    with grpc.insecure_channel(server.address) as channel:
        stub = sampler_pb2_grpc.SamplerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, rpc)(request, timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
