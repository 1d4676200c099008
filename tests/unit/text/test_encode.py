"""Text given for token ids, encoded with SmolLM2's tokenizer: bad words as vLLM encodes them,
DRY breakers as llama.cpp processes them (against straightforward references written from the
peers' descriptions), and what happens without an encoder."""
from __future__ import annotations

import dataclasses
import json

import pytest

from sampler_client.vocabulary import Vocabulary
from sampler_service.errors import FailedPrecondition, InvalidArgument
from sampler_service.text import encode

WORDS = ["Hello", " world", "the", "  spaced", "naïve", "日本語", "don't", "\tTab"]


def vllm_bad_words(tokenizer, words):
    """vLLM's SamplingParams rule, step by step, on the Hugging Face tokenizer."""
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


@pytest.mark.parametrize("word", WORDS)
def test_bad_words_are_encoded_as_vllm_encodes_them(word, smollm2_tokenizer, smollm2_vocabulary):
    expected = [tuple(s) for s in vllm_bad_words(smollm2_tokenizer, [word])]
    assert list(encode.bad_word_sequences(smollm2_vocabulary, word, "f")) == expected


def llama_cpp_breakers(vocabulary: Vocabulary, tokenizer, text: str) -> set[tuple[int, ...]]:
    """llama.cpp's processed breakers, stated another way: a token containing the string; or
    a token ending with the string's first k bytes (0 < k < length), followed by the rest
    encoded (at most 20 ids)."""
    target = text.encode()[:40]
    out = set()
    for token_id, word in enumerate(vocabulary.tokens):
        if not word:
            continue
        if target in word:
            out.add((token_id,))
            continue
        for k in range(1, len(target)):
            if word.endswith(target[:k]):
                rest = target[k:].decode()
                out.add((token_id, *tokenizer.encode(rest, add_special_tokens=False)[:20]))
    return out


@pytest.mark.parametrize("text", ["\n", ":", "\"", "*", "\n\n", "Hello world", "###"])
def test_breakers_are_processed_as_llama_cpp_does(text, smollm2_tokenizer, smollm2_vocabulary):
    got = encode.breaker_sequences(smollm2_vocabulary, text, "f")
    assert len(set(got)) == len(got)
    assert set(got) == llama_cpp_breakers(smollm2_vocabulary, smollm2_tokenizer, text)
    assert all(len(s) == 1 for s in got) == (len(text.encode()) == 1)


def test_ids_and_texts_mix_in_order_without_duplicates(smollm2_vocabulary):
    hello = encode.bad_word_sequences(smollm2_vocabulary, "Hello", "f")
    items = ((5, 6), "Hello", hello[0], (7,))
    assert encode.token_sequences(smollm2_vocabulary, "bad_words", items, "f") == \
        ((5, 6), *hello, (7,))
    assert encode.token_sequences(None, "bad_words", ((5, 6),), "f") == ((5, 6),)


def test_without_an_encoder_single_byte_breakers_still_work(smollm2_vocabulary):
    bytes_only = dataclasses.replace(smollm2_vocabulary, encoder_json="")
    assert encode.breaker_sequences(bytes_only, "\n", "f") == \
        encode.breaker_sequences(smollm2_vocabulary, "\n", "f")
    with pytest.raises(FailedPrecondition) as err:
        encode.token_sequences(bytes_only, "bad_words", ("Hello",), "params.bad_words")
    assert err.value.field == "params.bad_words[0]"
    with pytest.raises(InvalidArgument) as err:
        encode.token_sequences(None, "breakers", ("\n",), "chain[0].dry.breakers")
    assert err.value.field == "chain[0].dry.breakers"


def test_a_blank_bad_word_is_refused(smollm2_vocabulary):
    with pytest.raises(InvalidArgument) as err:
        encode.token_sequences(smollm2_vocabulary, "bad_words", ("ok", "  "), "bad_words")
    assert err.value.field == "bad_words[1]"


def test_an_encoder_that_spells_tokens_otherwise_is_refused(smollm2_vocabulary):
    data = json.loads(smollm2_vocabulary.encoder_json)
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    swapped = dataclasses.replace(smollm2_vocabulary, encoder_json=json.dumps(data))
    with pytest.raises(InvalidArgument) as err:
        encode.check_encoder(swapped, "tokenizer_json")
    assert err.value.field == "tokenizer_json" and "id 100" in str(err.value)
    with pytest.raises(InvalidArgument):
        encode.check_encoder(dataclasses.replace(smollm2_vocabulary, encoder_json="{}"), "t")
    encode.check_encoder(smollm2_vocabulary, "tokenizer_json")
