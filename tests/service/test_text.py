"""Tokenizers and stop strings through the real server and SDK: RegisterTokenizer, a sequence
that names its tokenizer, stop strings found across tokens, the text so far, and the refusals."""
from __future__ import annotations

import dataclasses
import json

import grpc
import pytest
import torch

from sampler_client.errors import (AlreadyExistsError, FailedPreconditionError,
                                   InvalidArgumentError, NotFoundError)
from sampler_client.vocabulary import Vocabulary, vocabulary_from_hf
from sampler_proto.sampler.v1 import sampler_pb2 as pb, sampler_pb2_grpc

#: A toy vocabulary: id 0 is EOS (special), the others are short pieces of text.
PIECES = [b"", b"Hel", b"lo", b" wor", b"ld", b"!", b"\n", b"\xe2\x82", b"\xac", b" the", b" end"]
VOCAB = Vocabulary(tuple(PIECES), frozenset({0}), (0,))


def forcing(token: int, width: int = len(PIECES)) -> torch.Tensor:
    """Logits [1, width] whose argmax is `token`."""
    logits = torch.zeros(1, width)
    logits[0, token] = 10.0
    return logits


def run(sequence, tokens):
    choices = []
    for token in tokens:
        choices.append(sequence.step(forcing(token)))
        if choices[-1].finished:
            break
    return choices


def test_a_stop_string_spanning_tokens_ends_the_sequence_and_is_cut_from_the_text(client):
    tokenizer_id = client.register_tokenizer(VOCAB, name="toy")
    assert tokenizer_id == VOCAB.digest == client.register_tokenizer(VOCAB)  # idempotent
    sequence = client.create_sequence("greedy", tokenizer="toy", params={"stop": ["o wo", "!!"]})
    assert sequence.resumption.tokenizer.name == "toy"  # replay can teach a restarted service
    choices = run(sequence, [1, 2, 3, 4, 5])
    assert [c.token_id for c in choices] == [1, 2, 3]  # "Hel" "lo" " wor": "o wo" completed
    assert choices[-1].finished and choices[-1].finish_reason == "stop"
    assert choices[-1].stop_string == "o wo" and choices[-1].stop_token_id is None
    info = sequence.info()
    assert (info.text, info.stop_string, info.tokenizer_id) == ("Hell", "o wo", tokenizer_id)


def test_include_stop_str_in_output_keeps_it_and_an_id_names_the_tokenizer(client):
    tokenizer_id = client.register_tokenizer(VOCAB)
    sequence = client.create_sequence(
        "greedy", tokenizer=tokenizer_id,
        params={"stop": ["€"], "include_stop_str_in_output": True})
    choices = run(sequence, [1, 7, 8, 9])  # "€" is split over two tokens
    assert [c.token_id for c in choices] == [1, 7, 8] and choices[-1].stop_string == "€"
    assert sequence.info().text == "Hel€"


def test_without_a_stop_string_the_text_grows_and_eos_still_stops(client):
    client.register_tokenizer(VOCAB, name="toy")
    sequence = client.create_sequence("greedy", tokenizer="toy", eos_token_ids=[0])
    choices = run(sequence, [1, 2, 6, 9, 0, 1])
    assert choices[-1].token_id == 0 and choices[-1].finish_reason == "stop"
    assert sequence.info().text == "Hello\n the"


def test_forks_keep_a_text_per_row(client):
    client.register_tokenizer(VOCAB, name="toy")
    group = client.create_sequence(None, tokenizer="toy", seed=3,
                                   params={"n": 2, "stop": ["lo"], "temperature": 0.0})
    first = group.step(forcing(1))
    assert len(first) == 2 and not any(c.finished for c in first)
    second = group.step(torch.cat([forcing(2), forcing(6)]))
    assert [c.stop_string for c in second] == ["lo", None]
    assert [c.finished for c in second] == [True, False]


def test_refusals_are_precise(client):
    with pytest.raises(NotFoundError) as err:
        client.create_sequence("greedy", tokenizer="nope")
    assert err.value.fields == ["sequences[0].tokenizer"]
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence("greedy", params={"stop": ["x"]})
    assert err.value.fields == ["sequences[0].params.stop"]
    client.register_tokenizer(VOCAB, name="toy")
    with pytest.raises(InvalidArgumentError) as err:
        client.create_sequence("greedy", tokenizer="toy", params={"stop": [""]})
    assert err.value.fields == ["sequences[0].params.stop[0]"]
    with pytest.raises(AlreadyExistsError):
        client.register_tokenizer(Vocabulary((b"a", b"b"), frozenset()), name="toy")
    with pytest.raises(InvalidArgumentError) as err:
        client.register_tokenizer(Vocabulary((b"a",), frozenset({3})))
    assert err.value.fields == ["special_ids[0]"]
    sequence = client.create_sequence("greedy", tokenizer="toy")
    with pytest.raises(InvalidArgumentError) as err:  # narrower logits than the vocabulary
        sequence.step(forcing(1, width=len(PIECES) - 1))
    assert err.value.fields == ["logits.shape"]
    assert sequence.step(forcing(1, width=len(PIECES) + 5)).token_id == 1  # padded: fine


def test_a_sequence_with_text_resumes_with_it(client, start_server):
    """Re-created from its resume record on another service, a sequence's text and its stop
    strings' state come back from its tokens."""
    from sampler_client import SamplerClient

    client.register_tokenizer(VOCAB, name="toy")
    sequence = client.create_sequence("greedy", tokenizer="toy", params={"stop": ["lo w"]})
    run(sequence, [1, 2])
    other = start_server()
    with SamplerClient(other.address) as moved, grpc.insecure_channel(other.address) as channel:
        moved.register_tokenizer(VOCAB, name="toy")
        sampler_pb2_grpc.SamplerStub(channel).CreateSequences(
            pb.CreateSequencesRequest(sequences=[sequence.resumption.config_now()]))
        info = moved.get_sequence(sequence.sequence_id)
        assert info.text == "Hello" and not info.finished
        stub = sampler_pb2_grpc.SamplerStub(channel)
        from sampler_client.requests import step_request
        answer = stub.Step(step_request([(sequence.sequence_id, 2, None)], forcing(3)))
        assert answer.choices[0].stop_string == "lo w"


def test_tokenizer_flag_loads_a_gguf_at_start_and_a_bad_path_is_refused(start_server, tmp_path,
                                                                       smollm2_vocabulary):
    from sampler_client import SamplerClient
    from sampler_client.hf import smollm2_gguf_path
    from sampler_service.server.app import ServerConfig, loaded_tokenizers

    server = start_server(tokenizers=(("smollm2", smollm2_gguf_path()),))
    with SamplerClient(server.address) as client:
        assert client.register_tokenizer(smollm2_vocabulary, "smollm2") == smollm2_vocabulary.digest
        sequence = client.create_sequence("greedy", tokenizer="smollm2", params={"stop": ["lo"]})
        hello = smollm2_vocabulary.tokens.index(b"Hello")
        choice = sequence.step(forcing(hello, width=smollm2_vocabulary.size))
        assert choice.stop_string == "lo" and sequence.info().text == "Hel"
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="--tokenizer bad="):
        loaded_tokenizers(ServerConfig(tokenizers=(("bad", tmp_path / "junk.json"),)))


def test_bad_words_and_dry_breakers_given_as_text(client, smollm2_tokenizer):
    """Encoded with the tokenizer the SDK registered (it sends its tokenizer.json): a bad word's
    tokens, alone and after a space, are never chosen; DRY breakers as strings are accepted."""
    client.register_tokenizer(smollm2_tokenizer, name="smollm2")
    width = len(smollm2_tokenizer)
    banned = [smollm2_tokenizer.encode(w, add_special_tokens=False) for w in ("Hello", " Hello")]
    assert all(len(ids) == 1 for ids in banned)
    sequence = client.create_sequence("greedy", tokenizer="smollm2",
                                      params={"bad_words": ["Hello", [5, 6]]})
    logits = torch.zeros(1, width)
    logits[0, banned[0][0]], logits[0, banned[1][0]], logits[0, 7] = 10.0, 9.0, 8.0
    assert sequence.step(logits).token_id == 7
    dry = client.create_sequence({"chain": [{"dry": {"multiplier": 0.8, "breakers": ["\n", ":"]}}],
                                  "select": "greedy"}, tokenizer="smollm2")
    assert dry.step(logits).token_id == banned[0][0]


def test_text_for_token_ids_is_refused_precisely(server, client, smollm2_tokenizer):
    with pytest.raises(InvalidArgumentError) as err:  # no tokenizer
        client.create_sequence("greedy", params={"bad_words": ["Hello"]})
    assert err.value.fields == ["sequences[0].params.bad_words[0]"]
    full = vocabulary_from_hf(smollm2_tokenizer)
    client.register_tokenizer(dataclasses.replace(full, encoder_json=""), name="bytes-only")
    with pytest.raises(FailedPreconditionError) as err:  # a tokenizer that cannot encode
        client.create_sequence("greedy", tokenizer="bytes-only", params={"bad_words": ["Hello"]})
    assert err.value.fields == ["sequences[0].params.bad_words[0]"]
    with pytest.raises(FailedPreconditionError) as err:
        client.create_sequence({"chain": [{"dry": {"multiplier": 0.8, "breakers": ["Hi there"]}}],
                                "select": "greedy"}, tokenizer="bytes-only")
    assert err.value.fields == ["sequences[0].policy_spec.chain[0].dry.breakers[0]"]
    client.create_sequence({"chain": [{"dry": {"multiplier": 0.8, "breakers": ["\n"]}}],
                            "select": "greedy"}, tokenizer="bytes-only")  # bytes are enough
    data = json.loads(full.encoder_json)
    data["model"]["vocab"]["Hello"] += 1
    with pytest.raises(InvalidArgumentError) as err:
        client.register_tokenizer(dataclasses.replace(full, encoder_json=json.dumps(data)))
    assert err.value.fields == ["tokenizer_json"]
    both = pb.SamplingParams(bad_words=[pb.TokenIds(ids=[5], text="x")])  # one of the two
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as raw:
            sampler_pb2_grpc.SamplerStub(channel).CreateSequences(pb.CreateSequencesRequest(
                sequences=[pb.SequenceConfig(sequence_id="b", policy="greedy", params=both)]))
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad_words[0]" in raw.value.details()
