"""sampler_service.text.detokenize: IncrementalText gives SmolLM2's
`tokenizer.decode(ids, skip_special_tokens=True)` token by token, holding back a split
character until it completes, U+FFFD once bytes can never complete, and forks independently."""
from __future__ import annotations

import pytest

from sampler_client.vocabulary import Vocabulary
from sampler_service.text.detokenize import IncrementalText

TEXTS = ["Hello, world! How are you today?",
         "日本語のテキストと中文文本。",
         "Emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵",
         "naïve café — “quotes” ∑ ∫ x² ≤ 10⁶",
         "def f(x):\n    return x ** 2  # tabs\tand\r\nlines",
         "Ελληνικά, русский, עברית, العربية, हिन्दी"]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_against_hf(tokenizer, vocab: Vocabulary, ids: list[int]) -> IncrementalText:
    """Appends `ids` one by one and checks every prefix against HF's decode."""
    text = IncrementalText(vocab)
    appended = ""
    for n, token_id in enumerate(ids, 1):
        appended += text.append(token_id)
        assert appended == text.text and len(text) == len(text.text)
        pending = text.pending
        assert len(pending) <= 3
        if pending:  # the start of a character (or of a surrogate, which never completes)
            with pytest.raises(UnicodeDecodeError):
                pending.decode("utf-8")
        assert text.finished_text == decode(tokenizer, ids[:n])
    assert text.bytes == b"".join(vocab.tokens[i] for i in ids)
    return text


def test_real_texts_decode_as_hf(smollm2_tokenizer, smollm2_vocabulary):
    for sample in TEXTS:
        ids = smollm2_tokenizer.encode(sample)
        text = check_against_hf(smollm2_tokenizer, smollm2_vocabulary, ids)
        assert text.text == sample and text.pending == b""


def test_a_split_character_appears_with_its_last_byte(smollm2_tokenizer, smollm2_vocabulary):
    byte_id = {token[0]: i for i, token in enumerate(smollm2_vocabulary.tokens) if len(token) == 1}
    text = IncrementalText(smollm2_vocabulary)
    assert [text.append(byte_id[b]) for b in "😀".encode()] == ["", "", "", "😀"]
    assert text.append(2) == ""  # <|im_end|>: no text
    assert [text.append(byte_id[b]) for b in "中".encode()[:2]] == ["", ""]
    assert text.text == "😀" and text.pending == "中".encode()[:2]
    assert text.append(byte_id[ord("A")]) == "\ufffdA"  # can never complete: one U+FFFD
    assert text.append(byte_id[0x80]) == "\ufffd"  # a lone continuation byte, at once
    assert text.text == decode(smollm2_tokenizer, [byte_id[b] for b in text.bytes])


def test_random_token_sequences_decode_as_hf(smollm2_tokenizer, smollm2_vocabulary):
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    vocab = smollm2_vocabulary
    split = [i for i, token in enumerate(vocab.tokens) if token and not is_utf8(token)]
    real = sorted({i for sample in TEXTS for i in smollm2_tokenizer.encode(sample)})
    ids = st.one_of(st.integers(0, vocab.size - 1), st.sampled_from(split),
                    st.sampled_from(real), st.sampled_from(sorted(vocab.special_ids)))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(ids, max_size=24))
    def check(token_ids):
        check_against_hf(smollm2_tokenizer, vocab, token_ids)

    assert len(split) > 300  # byte fragments of emoji, CJK, accented letters
    check()


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_copy_continues_independently(smollm2_tokenizer, smollm2_vocabulary):
    prefix = smollm2_tokenizer.encode("Beam 日本")
    prefix.append(smollm2_tokenizer.encode("😀")[0])  # ends inside a character
    original = IncrementalText(smollm2_vocabulary)
    original.extend(prefix)
    assert original.pending
    fork = original.copy()
    a = smollm2_tokenizer.encode("語 one")
    b = smollm2_tokenizer.encode("😀")[1:] + smollm2_tokenizer.encode(" two")
    original.extend(a)
    fork.extend(b)
    assert original.text == decode(smollm2_tokenizer, prefix + a)
    assert fork.text == decode(smollm2_tokenizer, prefix + b) == "Beam 日本😀 two"
    assert fork.bytes == b"".join(smollm2_vocabulary.tokens[i] for i in prefix + b)


def test_ids_outside_the_vocabulary_add_nothing():
    vocab = Vocabulary((b"a", b"\xc3", b"\xa9"), frozenset())
    text = IncrementalText(vocab)
    assert text.extend([0, 1, 3, -1, 2]) == "aé"
    assert text.bytes == "aé".encode() and len(text) == 2
