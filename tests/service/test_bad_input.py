"""Every bad input gets a precise status naming its field; the server stays up and no other
sequence changes (`bystander`: its state; `control`: a seeded sequence stepped before and
after the bad call gets the tokens of a twin stepped with nothing in between)."""
from __future__ import annotations

import asyncio
import re

import grpc
import numpy as np
import pytest
import torch

from sampler_client import (AlreadyExistsError, AsyncSamplerClient, FailedPreconditionError,
                            InvalidArgumentError, MessageTooLargeError, NotFoundError,
                            ResourceExhaustedError, SamplerClient)
from sampler_proto.sampler.v1 import sampler_pb2 as pb

VOCAB = 32


@pytest.fixture
def bystander(client):
    """A sequence stepped once before the bad call; it must come out untouched."""
    seq = client.create_sequence(policy="default", seed=3, prompt_ids=[1, 2])
    seq.step(torch.randn(VOCAB))
    before = client.get_sequence(seq.sequence_id)
    yield seq
    after = client.get_sequence(seq.sequence_id)
    assert after == before
    assert seq.step(torch.randn(VOCAB)).step == 1  # and it still steps


def raw_step(client, rows, tensor):
    request = pb.StepRequest(rows=[pb.StepRow(sequence_id=r) for r in rows], logits=tensor)
    return client._call(client._stub.Step, request)


def test_byte_length_not_matching_shape(client, bystander):
    tensor = pb.Tensor(dtype=pb.FP32, shape=[1, VOCAB], raw=b"\0" * (4 * VOCAB - 2))
    with pytest.raises(InvalidArgumentError) as err:
        raw_step(client, [bystander.sequence_id], tensor)
    assert err.value.fields == ["logits.raw"]
    assert "needs 128" in err.value.message


def test_unsupported_dtype(client, bystander):
    tensor = pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1, VOCAB], raw=b"\0" * 4 * VOCAB)
    with pytest.raises(InvalidArgumentError) as err:
        raw_step(client, [bystander.sequence_id], tensor)
    assert err.value.fields == ["logits.dtype"]


def test_rows_not_matching_sequence_ids(client, bystander):
    other = client.create_sequence(policy="greedy")
    with pytest.raises(InvalidArgumentError) as err:
        client.step([bystander, other], torch.randn(3, VOCAB))
    assert err.value.fields == ["logits.shape"]
    assert other.info().output_ids == []


def test_vocab_different_from_first_step(client, bystander):
    with pytest.raises(InvalidArgumentError) as err:
        bystander.step(torch.randn(VOCAB + 1))
    assert err.value.fields == ["logits.shape"]
    bystander.next_step = 1


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_positive_inf_in_logits(client, bystander, poison):
    victim = client.create_sequence(policy="greedy")
    logits = torch.randn(2, VOCAB)
    logits[1, 5] = poison
    with pytest.raises(InvalidArgumentError) as err:
        client.step([bystander, victim], logits)
    assert err.value.fields == ["logits"] and "row 1" in err.value.message
    bystander.next_step = 1  # the whole request was refused: the bystander did not advance
    assert victim.info().output_ids == []


def test_row_all_negative_infinity(client, bystander):
    seq = client.create_sequence(policy="greedy")
    with pytest.raises(InvalidArgumentError) as err:
        seq.step(torch.full((VOCAB,), float("-inf")))
    assert "all -inf" in err.value.message


def test_unknown_sequence(client, bystander):
    with pytest.raises(NotFoundError) as err:
        raw_step(client, ["nobody"], pb.Tensor(dtype=pb.FP32, shape=[1, VOCAB],
                                                raw=np.zeros(VOCAB, np.float32).tobytes()))
    assert err.value.fields == ["rows[0].sequence_id"]
    with pytest.raises(NotFoundError):
        client.get_sequence("nobody")


def test_stepping_a_finished_sequence(client, bystander):
    seq = client.create_sequence(policy="greedy", eos_token_ids=[0])
    logits = torch.zeros(VOCAB)
    logits[0] = 1.0
    assert seq.step(logits).finished
    with pytest.raises(FailedPreconditionError) as err:
        seq.step(logits)
    assert "finished (STOP)" in err.value.message


def test_out_of_order_step_number(client, bystander):
    seq = client.create_sequence(policy="greedy")
    seq.next_step = 3
    with pytest.raises(FailedPreconditionError) as err:
        seq.step(torch.randn(VOCAB))
    assert err.value.fields == ["rows[0].step"] and "expects step 0" in err.value.message


def test_duplicate_sequence_id_at_creation(client, bystander):
    with pytest.raises(AlreadyExistsError) as err:
        client.create_sequence(policy="greedy", sequence_id=bystander.sequence_id)
    assert err.value.fields == ["sequences[0].sequence_id"]
    with pytest.raises(InvalidArgumentError):
        client.create_sequences([dict(sequence_id="twin"), dict(sequence_id="twin")])
    with pytest.raises(NotFoundError):
        client.get_sequence("twin")  # creation is atomic


def test_unknown_policy(client, bystander):
    with pytest.raises(NotFoundError) as err:
        client.create_sequence(policy="no-such-policy")
    assert err.value.fields == ["sequences[0].policy"] and "creative" in err.value.message


@pytest.mark.parametrize("params, field", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"), ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": -2}, "min_tokens"),
])
def test_out_of_range_parameters(client, bystander, params, field):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(params=params)
    assert err.value.fields == [f"sequences[0].params.{field}"]
    assert field in err.value.message and "out of range" in err.value.message


def test_override_the_policy_does_not_allow(client, bystander):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy="creative", params={"top_k": 5})
    assert err.value.fields == ["sequences[0].params.top_k"]
    assert "overridable" in err.value.message


def test_invalid_inline_policy_names_the_field(client, bystander):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy={"chain": [{"top_k": {"k": 3}}, {"top_q": {}}], "select": "sample"})
    assert err.value.fields == ["sequences[0].policy_spec.chain[1]"]
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy={"chain": [{"top_k": {"k": -3}}], "select": "sample"})
    assert err.value.fields == ["sequences[0].policy_spec.chain[0].top_k.k"]
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy={"chain": []})
    assert err.value.fields == ["sequences[0].policy_spec.select"]
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy={"chain": [{"top_k": {"k": 3}}, "sample"], "select": "greedy"})
    assert err.value.fields == ["sequences[0].policy_spec.chain[1]"]
    assert "exactly one" in err.value.message


@pytest.mark.parametrize("params", [{"min_tokens": 1}, {"min_tokens": 1, "temperature": 0}])
def test_a_chain_that_masks_every_token(client, bystander, params):
    seq = client.create_sequence(params=params, eos_token_ids=[4])
    logits = torch.full((VOCAB,), float("-inf"))
    logits[4] = 0.0  # only EOS is possible, and min_tokens forbids it
    with pytest.raises(FailedPreconditionError) as err:
        seq.step(logits)
    assert "masked every token" in err.value.message
    assert seq.info().output_ids == []
    logits[7] = -1.0
    assert seq.step(logits).token_id == 7


def test_token_id_outside_the_vocabulary(client, bystander):
    seq = client.create_sequence(policy="greedy", prompt_ids=[VOCAB + 5])
    with pytest.raises(InvalidArgumentError) as err:
        seq.step(torch.randn(VOCAB))
    assert str(VOCAB + 5) in err.value.message


def test_oversize_message(start_server):
    """Inline bytes past --max-message-bytes (shared memory would carry them in a region)."""
    small = start_server(max_message_bytes=64 * 1024)
    with SamplerClient(small.address, transport="inline") as client:
        seq = client.create_sequence(policy="greedy")
        with pytest.raises(ResourceExhaustedError) as err:
            seq.step(torch.randn(64 * 1024))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert seq.step(torch.randn(100)).step == 0  # the server is still up


@pytest.mark.parametrize("params, field", [
    ({"logit_bias": {5: 500.0}}, "sequences[0].params.logit_bias[5]"),
    ({"bad_words": [[]]}, "sequences[0].params.bad_words"),
])
def test_out_of_range_library_parameters(client, bystander, params, field):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(params=params)
    assert err.value.fields == [field]


@pytest.mark.parametrize("spec, field", [
    ({"chain": [{"typical_p": {"p": 0}}], "select": "sample"}, "chain[0].typical_p.p"),
    ({"chain": [{"top_p": {"p": 0.9, "min_keep": 0}}], "select": "sample"}, "chain[0].top_p.min_keep"),
    ({"chain": [{"dry": {"breakers": [[1], "x"]}}], "select": "sample"}, "chain[0].dry.breakers[1]"),
    ({"chain": [{"forced_tokens": {"tokens": {"a": 1}}}], "select": "sample"},
     "chain[0].forced_tokens.tokens[a]"),
    ({"chain": [], "select": {"mirostat": {"version": 3}}}, "select.mirostat.version"),
])
def test_invalid_library_specs_name_the_field(client, bystander, spec, field):
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy=spec)
    assert err.value.fields == [f"sequences[0].policy_spec.{field}"]


def test_flat_library_parameters_take_effect(client, bystander):
    logits = torch.zeros(VOCAB)
    seq = client.create_sequence(params={"temperature": 0, "logit_bias": {9: 3.0},
                                         "allowed_token_ids": [4, 9, 12], "bad_words": [[9]]})
    assert seq.step(logits).token_id == 4  # 9 is biased up but banned; 4 is the lowest allowed id


# -- malformed-request classes that once got INTERNAL or the wrong status (issue 12) -----------
CONTROL_LOGITS = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(12))


def control_tokens(client) -> tuple[object, list[int]]:
    """A seeded sampling sequence and its tokens from the two rows of `CONTROL_LOGITS`."""
    seq = client.create_sequence(policy="default", seed=12, prompt_ids=[1, 2])
    return seq, [seq.step(CONTROL_LOGITS[i]).token_id for i in range(2)]


@pytest.fixture
def control(client):
    """A seeded sequence stepped once before the bad call and once after: both tokens must be
    those of a twin stepped with nothing in between."""
    seq = client.create_sequence(policy="default", seed=12, prompt_ids=[1, 2])
    tokens = [seq.step(CONTROL_LOGITS[0]).token_id]
    yield seq
    tokens.append(seq.step(CONTROL_LOGITS[1]).token_id)
    assert tokens == control_tokens(client)[1]


def step_request(rows, **fields):
    return pb.StepRequest(rows=[pb.StepRow(sequence_id=r) for r in rows], **fields)


def fp32(shape, values=None):
    values = np.zeros(int(np.prod(shape)), np.float32) if values is None else values
    return pb.Tensor(dtype=pb.FP32, shape=list(shape), raw=np.asarray(values, np.float32).tobytes())


@pytest.mark.parametrize("field", ["logits", "reference_logits", "sparse.logits"])
def test_a_tensor_of_more_than_64_dimensions(client, bystander, control, field):
    """torch allows 64 dimensions; every tensor of a step is 1-D or 2-D: INVALID_ARGUMENT
    naming the tensor's shape, whatever tensor it is."""
    seq = client.create_sequence(policy={"chain": [{"kl_temperature": {"t0": 1.0, "t_min": 0.5}}],
                                         "select": "sample"})
    deep = fp32([1] * 65 + [VOCAB])
    fields = {"logits": {"logits": deep},
              "reference_logits": {"logits": fp32([1, VOCAB]), "reference_logits": deep},
              "sparse.logits": {"sparse": pb.SparseRows(rows=[0], vocab_size=VOCAB, logits=deep,
                                                        token_ids=bytes(4 * VOCAB))}}[field]
    with pytest.raises(InvalidArgumentError) as err:
        client._call(client._stub.Step, step_request([seq.sequence_id], **fields))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.fields == [f"{field}.shape"]
    assert "66 dimensions" in err.value.message and "at most 2" in err.value.message
    with pytest.raises(InvalidArgumentError) as err:  # Preview decodes the same way
        client._call(client._stub.Preview, pb.PreviewRequest(policy="greedy", logits=deep))
    assert err.value.fields == ["logits.shape"]
    assert seq.step(torch.randn(VOCAB), reference_logits=torch.randn(VOCAB)).step == 0


@pytest.mark.parametrize("name, value", [
    ("agreement", float("nan")), ("attention_entropy", float("inf")),
    ("interaction_strength", float("-inf")), ("attention_varentropy", -1.0),
])
def test_non_finite_or_negative_entropix_signals(client, bystander, control, name, value):
    """Entropix's attention signals are finite and >= 0; a NaN once sent the selector's
    top-k out of bounds (INTERNAL)."""
    seq = client.create_sequence(policy="entropix", seed=1)
    other = client.create_sequence(policy="entropix", seed=2)
    signals = [{"agreement": 0.5}, {name: value}]
    with pytest.raises(InvalidArgumentError) as err:
        client.step([other, seq], torch.randn(2, VOCAB), signals=signals)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.fields == [f"signals[1].{name}"]
    assert name in err.value.message and ("finite" in err.value.message if value != -1.0
                                          else "must be in [0" in err.value.message)
    assert seq.info().output_ids == other.info().output_ids == []  # refused whole
    assert seq.step(torch.randn(VOCAB), signals={name: 0.5}).step == 0


@pytest.mark.parametrize("spec, params, field, says", [
    ({"chain": [{"temperature": {"temperature": float("nan")}}], "select": "sample"}, None,
     "policy_spec.chain[0].temperature.temperature", "finite number, got nan"),
    ({"chain": [{"top_p": {"p": float("inf")}}], "select": "sample"}, None,
     "policy_spec.chain[0].top_p.p", "finite number, got inf"),
    ({"chain": [{"logit_bias": {"bias": {"5": float("-inf")}}}], "select": "sample"}, None,
     "policy_spec.chain[0].logit_bias.bias[5]", "finite number, got -inf"),
    ({"chain": [], "select": {"entropix": {"top_k": float("nan")}}}, None,
     "policy_spec.select.entropix.top_k", "finite integer, got nan"),
    ({"chain": [], "select": "greedy", "defaults": {"max_tokens": float("inf")}}, None,
     "policy_spec.defaults.max_tokens", "finite integer, got inf"),
    (None, {"temperature": float("inf")}, "params.temperature", "finite number, got inf"),
    (None, {"logit_bias": {3: float("nan")}}, "params.logit_bias[3]", "finite number, got nan"),
])
def test_non_finite_numbers_in_a_policy_spec_or_params(client, bystander, control, spec, params,
                                                       field, says):
    """A Struct carries NaN and ±inf (JSON cannot): they once reached a JSON conversion
    (INTERNAL); now the parameter's schema names where they stand."""
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy=spec, params=params)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.fields == [f"sequences[0].{field}"]
    assert says in err.value.message
    if spec is not None:  # Preview validates an inline spec the same way
        with pytest.raises(InvalidArgumentError) as err:
            client.preview(torch.randn(VOCAB), policy=spec)
        assert err.value.fields == [field]


BIG = float(2 ** 63)  # a Struct number is a double: 2^63 and beyond


@pytest.mark.parametrize("stage, field, says", [
    ({"top_k": {"k": BIG}}, "chain[0].top_k.k", "k = 9223372036854775808 is out of range"),
    ({"top_p": {"p": 0.9, "min_keep": BIG}}, "chain[0].top_p.min_keep", "[1, 2^31-1]"),
    ({"penalties": {"last_n": 2.0 ** 64}}, "chain[0].penalties.last_n", "[-1, 2^31-1]"),
    ({"no_repeat_ngram": {"size": BIG}}, "chain[0].no_repeat_ngram.size", "[0, 1024]"),
    ({"no_repeat_ngram": {"size": 1025}}, "chain[0].no_repeat_ngram.size", "[0, 1024]"),
    ({"allowed_token_ids": {"ids": [1, BIG]}}, "chain[0].allowed_token_ids.ids",
     "token ids in [0, 2^31-1], got 9223372036854775808 at index 1"),
    ({"bad_words": {"sequences": [[1], [2, BIG]]}}, "chain[0].bad_words.sequences[1]",
     "token ids in [0, 2^31-1]"),
    ({"logit_bias": {"bias": {str(2 ** 63): 1.0}}}, "chain[0].logit_bias.bias[9223372036854775808]",
     "token id 9223372036854775808 must be in [0, 2^31-1]"),
    ({"forced_tokens": {"tokens": {"0": BIG}}}, "chain[0].forced_tokens.tokens[0]",
     "[0, 2^31-1]"),
])
def test_integers_past_their_range_are_refused_at_creation(client, bystander, control, stage,
                                                            field, says):
    """Integers >= 2^63 were accepted and failed the first step (INTERNAL); every integer
    parameter now has a range (int32's where its schema sets none) checked at creation."""
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence(policy={"chain": [stage], "select": "sample"})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.fields == [f"sequences[0].policy_spec.{field}"]
    assert says in err.value.message


def test_integers_at_the_top_of_their_range_step(client, bystander, control):
    """The largest accepted values fit the engine: they step (a token id past the
    vocabulary is refused at the step, naming the logits' shape)."""
    top = float(2 ** 31 - 1)
    seq = client.create_sequence(policy={"chain": [
        {"top_k": {"k": top}}, {"top_p": {"p": 0.9, "min_keep": top}},
        {"penalties": {"last_n": top, "repeat": 1.1}}, {"min_tokens": {"min_tokens": top}},
        {"exponential_decay_length_penalty": {"start": top, "factor": 1.5}},
        {"no_repeat_ngram": {"size": 1024}}],
        "select": {"mirostat": {"version": 1.0, "m": top}}, "defaults": {"max_tokens": top}},
        prompt_ids=[1, 2, 1])
    assert [seq.step(torch.randn(VOCAB)).step for _ in range(2)] == [0, 1]
    seq = client.create_sequence(policy={"chain": [{"allowed_token_ids": {"ids": [1, top]}}],
                                         "select": "sample"})
    with pytest.raises(InvalidArgumentError) as err:
        seq.step(torch.randn(VOCAB))
    assert err.value.fields == ["logits.shape"] and "2147483647" in err.value.message


LONG = 20_000  # characters: an echo of it passes gRPC's default metadata limits (8 / 16 KiB)


def test_long_ids_and_names_keep_their_status(server, bystander, control):
    """A message echoing a long id or name once made the status's trailers pass the caller's
    metadata limit: it got RESOURCE_EXHAUSTED instead. Messages are clipped (1 KiB, start
    and end kept), through a channel with gRPC's default limits and the SDK's own."""
    plain = SamplerClient(server.address, channel=grpc.insecure_channel(server.address))
    with plain:
        with pytest.raises(NotFoundError) as err:
            plain.get_sequence("x" * LONG)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        message = err.value.message
        assert message.startswith("sequence 'xxx") and message.endswith("idle)")
        assert re.search(r" …\(\d+ chars\)… ", message) and len(message.encode()) <= 1024
        assert err.value.fields == ["sequence_id"]
        plain.create_sequence(policy="greedy", sequence_id="y" * LONG)
        with pytest.raises(AlreadyExistsError) as err:
            plain.create_sequence(policy="greedy", sequence_id="y" * LONG)
        assert err.value.fields == ["sequences[0].sequence_id"]
        assert err.value.message.endswith("already exists; release it first or choose another id")
        with pytest.raises(NotFoundError) as err:
            plain.create_sequence(policy="p" * LONG)
        assert err.value.fields == ["sequences[0].policy"]
        with pytest.raises(InvalidArgumentError) as err:  # spec.py / params.py echo 64 chars
            plain.create_sequence(policy={"chain": [{"k" * LONG: {}}], "select": "sample"})
        assert err.value.fields == ["sequences[0].policy_spec.chain[0]"]
        assert f"'{'k' * 64}'…({LONG} chars)" in err.value.message
        with pytest.raises(NotFoundError) as err:  # a step names the row's sequence
            plain._call(plain._stub.Step, step_request(["z" * LONG], logits=fp32([1, VOCAB])))
        assert err.value.fields == ["rows[0].sequence_id"]
    with SamplerClient(server.address) as sdk, pytest.raises(NotFoundError):
        sdk.get_sequence("x" * 3_000_000)  # past even the SDK's 4 MiB metadata limit


def test_the_sdk_refuses_a_step_too_large_for_the_stream(server, bystander):
    """gRPC refuses a message over the channel's max send size by ending the whole StepStream
    (every sequence on it); the SDK refuses it first, naming its size and the cap, and the
    stream goes on: a control sequence steps on it before and after, as its twin does."""
    cap = 64 * 1024
    oversize = torch.randn(2 * cap // 4)
    with SamplerClient(server.address, transport="inline", max_message_bytes=cap) as small:
        seq = small.create_sequence(policy="greedy")
        control = small.create_sequence(policy="default", seed=12, prompt_ids=[1, 2])
        with small.stream() as stream:
            tokens = [stream.step([control], CONTROL_LOGITS[0])[0].token_id]
            with pytest.raises(MessageTooLargeError) as err:
                stream.step([seq], oversize)
            assert isinstance(err.value, ResourceExhaustedError)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.limit == cap and err.value.size > cap
            assert f"{err.value.size} bytes" in err.value.message and str(cap) in err.value.message
            assert "transport='shm'" in err.value.message and "sparse_top_k" in err.value.message
            assert stream.step([seq], torch.randn(VOCAB))[0].step == 0  # nothing was sent
            tokens.append(stream.step([control], CONTROL_LOGITS[1])[0].token_id)
        assert tokens == control_tokens(small)[1]
        with pytest.raises(MessageTooLargeError):  # a unary step alike
            seq.step(oversize)

    async def twin():
        async with AsyncSamplerClient(server.address, transport="inline",
                                      max_message_bytes=cap) as aio:
            async with aio.stream() as aio_stream:
                with pytest.raises(MessageTooLargeError):
                    await aio_stream.step([seq], oversize)
                return (await aio_stream.step([seq], torch.randn(VOCAB)))[0].step
    assert asyncio.run(twin()) == 1
