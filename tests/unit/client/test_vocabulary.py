"""sampler_client.vocabulary: exact token bytes from HF tokenizers (byte-level BPE,
SentencePiece with byte fallback, Metaspace, plain), the same vocabulary from a tokenizer object,
its tokenizer.json, its directory and its GGUF, a content digest, and clear refusals."""
from __future__ import annotations

import json

import pytest

from sampler_client.vocabulary import Vocabulary, load_vocabulary, vocabulary_from_json

SMOLLM2_SPECIALS = frozenset(range(17))  # <|endoftext|>, <|im_start|>, <|im_end|>, ...


def test_smollm2_vocabulary_has_the_logits_size_control_tokens_and_eos(smollm2_tokenizer,
                                                                        smollm2_vocabulary):
    vocab = smollm2_vocabulary
    assert vocab.size == len(smollm2_tokenizer) == 49152
    assert vocab.special_ids == SMOLLM2_SPECIALS == frozenset(smollm2_tokenizer.all_special_ids) | SMOLLM2_SPECIALS
    assert vocab.eos_token_ids == (smollm2_tokenizer.eos_token_id,) == (2,)
    assert all(vocab.tokens[i] == b"" for i in vocab.special_ids)
    assert all(vocab.tokens[i] for i in range(vocab.size) if i not in vocab.special_ids)


def test_smollm2_token_bytes_decode_as_hf_decodes_each_token(smollm2_tokenizer, smollm2_vocabulary):
    vocab = smollm2_vocabulary
    ids = [i for i in range(vocab.size) if i not in vocab.special_ids]
    decoded = smollm2_tokenizer.batch_decode([[i] for i in ids])
    wrong = [i for i, text in zip(ids, decoded)
             if vocab.tokens[i].decode("utf-8", errors="replace") != text]
    assert wrong == []
    assert vocab.tokens[smollm2_tokenizer.convert_tokens_to_ids("Ġhello")] == b" hello"


def test_smollm2_token_bytes_are_exact(smollm2_tokenizer, smollm2_vocabulary):
    # "replace" decoding above cannot tell partial characters apart: compare the bytes with
    # transformers' own GPT-2 byte table applied to the token strings.
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = smollm2_vocabulary
    strings = smollm2_tokenizer.convert_ids_to_tokens(list(range(vocab.size)))
    wrong = [i for i, token in enumerate(strings) if i not in vocab.special_ids
             and vocab.tokens[i] != bytes(byte_of[c] for c in token)]
    assert wrong == []
    # Every continuation byte and the lead bytes of U+0080..U+3FFFF have a token of their own
    # (SmolLM2 has none for 0xF1..0xF4 nor for a few ASCII control characters).
    single = {token[0] for token in vocab.tokens if len(token) == 1}
    assert set(range(0x80, 0xC0)) | set(range(0xC2, 0xF1)) <= single


def test_tokenizer_json_directory_and_gguf_give_the_same_vocabulary(smollm2_tokenizer,
                                                                     smollm2_vocabulary,
                                                                     tmp_path):
    from sampler_client.hf import smollm2_gguf_path
    smollm2_tokenizer.save_pretrained(tmp_path)

    from_file = load_vocabulary(tmp_path / "tokenizer.json")
    assert from_file.tokens == smollm2_vocabulary.tokens
    assert from_file.special_ids == smollm2_vocabulary.special_ids
    assert from_file.eos_token_ids == ()  # tokenizer.json names no EOS

    assert load_vocabulary(tmp_path) == smollm2_vocabulary
    from_gguf = load_vocabulary(smollm2_gguf_path())
    assert from_gguf == smollm2_vocabulary
    assert from_gguf.digest == load_vocabulary(str(tmp_path)).digest == smollm2_vocabulary.digest
    # each keeps the tokenizer JSON it came from (for encoding), outside its identity
    for vocabulary in (from_file, from_gguf, smollm2_vocabulary):
        assert json.loads(vocabulary.encoder_json)["model"]["type"] == "BPE"
    assert from_file.encoder_json == (tmp_path / "tokenizer.json").read_text(encoding="utf-8")


def test_digest_is_a_content_hash():
    base = Vocabulary((b"a", b"", b"\xe4"), frozenset({1}), (1,))
    same = Vocabulary(tuple([b"a", b"", b"\xe4"]), frozenset([1]), (1,))
    assert base.digest == same.digest
    assert base.digest.startswith("sha256:") and len(base.digest) == len("sha256:") + 64
    variants = [Vocabulary((b"a", b"", b"\xe5"), frozenset({1}), (1,)),
                Vocabulary((b"a", b"", b"\xe4", b""), frozenset({1}), (1,)),
                Vocabulary((b"a", b"", b"\xe4"), frozenset(), (1,)),
                Vocabulary((b"a", b"", b"\xe4"), frozenset({1}), ()),
                Vocabulary((b"a\x00", b"\xe4"), frozenset({1}), (1,)),  # boundaries count
                Vocabulary((b"a", b"\x00\xe4"), frozenset({1}), (1,))]
    assert len({v.digest for v in [base, *variants]}) == 1 + len(variants)


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: BPE with byte fallback, the Replace/ByteFallback/Fuse/Strip
    decoder chain, <s> and </s> special."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2,
             **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁": 259, "▁a": 260, "b": 261, "é": 262}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>",
                                                     byte_fallback=True))
    tok.decoder = tokenizers.decoders.Sequence([
        tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(),
        tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    tok.add_tokens(["<tool>"])  # not special: keeps its text
    return tok


def test_sentencepiece_byte_fallback_tokens(tmp_path):
    tok = sentencepiece_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    vocab = load_vocabulary(path)
    tool = tok.token_to_id("<tool>")
    assert vocab.size == tool + 1 == 264
    assert vocab.special_ids == {1, 2}
    assert vocab.tokens[3 + 0xE4] == b"\xe4" and vocab.tokens[3 + 0x41] == b"A"
    assert vocab.tokens[259:263] == (b" ", b" a", b"b", "é".encode())
    assert vocab.tokens[tool] == b"<tool>"
    # A text not starting with a space (Strip removes one leading space of a whole text).
    ids = [261, 260, 3 + 0xE4, 3 + 0xB8, 3 + 0x96, 1, 259, 262, tool, 2, 260]
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == "b a世 é<tool> a"
    assert b"".join(vocab.tokens[i] for i in ids).decode() == expected


def test_metaspace_unigram_and_plain_vocabularies():
    unigram = {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁hi", -1.0], ["x", -2.0]]},
               "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                           "split": True},
               "added_tokens": [{"id": 0, "content": "<unk>", "special": True}]}
    assert vocabulary_from_json(unigram).tokens == (b"", b" hi", b"x")
    plain = {"model": {"type": "WordLevel", "vocab": {"ä": 0, "b": 2}}, "decoder": None,
             "added_tokens": [{"id": 3, "content": "<eos>", "special": True}]}
    vocab = vocabulary_from_json(plain, size=6, eos_token_ids=[3])
    assert vocab.tokens == ("ä".encode(), b"", b"b", b"", b"", b"")  # gaps and padding: b""
    assert vocab.special_ids == {3} and vocab.eos_token_ids == (3,)


def test_decoders_that_are_not_bytes_per_token_are_refused():
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0, "##b": 1}},
                 "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True}}
    with pytest.raises(ValueError, match=r"bert.json: decoder \['WordPiece'\]"):
        vocabulary_from_json(wordpiece, source="bert.json")


def test_files_that_are_not_tokenizers_are_refused_naming_the_path(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    no_model = tmp_path / "config.json"
    no_model.write_text(json.dumps({"model_type": "llama"}))
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in [text, no_model, tmp_path / "missing.json", bad_gguf, empty]:
        with pytest.raises(ValueError, match=str(path)):
            load_vocabulary(path)
