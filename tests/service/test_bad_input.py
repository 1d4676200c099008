"""Every bad input gets a precise status naming its field; the server stays up and no other
sequence changes."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from sampler_client import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError,
                            NotFoundError, ResourceExhaustedError, SamplerClient)
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
    ({"top_k": -1}, "top_k"), ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
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
