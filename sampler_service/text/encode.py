"""Text given where token ids are expected (bad words, DRY sequence breakers), encoded with the
sequence's tokenizer, as the peer that defined each parameter does it.

A vocabulary can encode when it carries its `tokenizers` JSON (`Vocabulary.encoder_json`: the
SDK sends it with RegisterTokenizer from a Hugging Face tokenizer, and `--tokenizer` keeps
it from a tokenizer.json, a tokenizer directory or a GGUF file). Encoding is
`tokenizers.Tokenizer.encode(text, add_special_tokens=False)`, what a Hugging Face fast
tokenizer's `encode(text, add_special_tokens=False)` gives.

- `bad_word_sequences` (vLLM `bad_words`): the word with its leading whitespace stripped,
  encoded; and " " + that, encoded, kept when it differs in its first id but not in length
  (a word that also exists as a space-prefixed token), as vLLM's `SamplingParams` does.
- `breaker_sequences` (llama.cpp's DRY `seq_breakers`, from koboldcpp): the string's first
  40 bytes; every token whose bytes contain it is a single-token breaker; a token whose bytes
  end with a proper prefix of it (at each place that prefix starts) heads a sequence whose
  tail is the rest of the string encoded, cut to 20 ids. Control tokens have no bytes here
  (llama.cpp renders them as text), so they never break a repeat; a tail that would split a
  UTF-8 character cannot be encoded as text and is left out.

Results are cached by (vocabulary digest, rule, texts).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from sampler_service.errors import FailedPrecondition, InvalidArgument
from sampler_service.text.lru import LruCache

if TYPE_CHECKING:
    import tokenizers
    from sampler_client.vocabulary import Vocabulary

#: llama.cpp's caps on a DRY breaker: its bytes (MAX_CHAR_LEN) and its tail's ids (MAX_SEQ_LEN).
BREAKER_MAX_BYTES = 40
BREAKER_MAX_TAIL = 20
#: Encoders kept (a sidecar serves one or a few models).
ENCODERS = 8
_RESOLVED_CACHE = 1024

_encoders: "LruCache[str, tokenizers.Tokenizer]" = LruCache(ENCODERS)
_sequences: "LruCache[tuple[str, bool, str, tuple[Any, ...]], tuple[tuple[int, ...], ...]]" = \
    LruCache(_RESOLVED_CACHE)


def tokenizer_from_json(text: str, field: str) -> "tokenizers.Tokenizer":
    """A `tokenizers.Tokenizer` from its JSON, or InvalidArgument naming `field`."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - the server extra installs it
        raise FailedPrecondition("encoding text needs the tokenizers package: pip install "
                                 "'sampler-sidecar[server]'", field) from None
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise InvalidArgument(f"not a tokenizers JSON document: {str(exc)[:200]}",
                              field) from None


def check_encoder(vocabulary: "Vocabulary", field: str) -> None:
    """Refuses (InvalidArgument naming `field`) an encoder JSON that is not one or that spells
    any token id otherwise than the vocabulary's bytes."""
    from sampler_client.vocabulary import vocabulary_from_json
    if not vocabulary.encoder_json:
        return
    tokenizer_from_json(vocabulary.encoder_json, field)
    try:
        spelt = vocabulary_from_json(json.loads(vocabulary.encoder_json), size=vocabulary.size)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field) from None
    if spelt.tokens != vocabulary.tokens:
        index = next(i for i, (a, b) in enumerate(zip(spelt.tokens, vocabulary.tokens)) if a != b)
        raise InvalidArgument(f"the tokenizer JSON does not describe these tokens: id {index} is "
                              f"{spelt.tokens[index]!r} there and {vocabulary.tokens[index]!r} in "
                              "tokens", field)


def encoder(vocabulary: "Vocabulary", field: str) -> "tokenizers.Tokenizer":
    """The vocabulary's encoder (cached by digest); FailedPrecondition naming `field` when the
    vocabulary came without its tokenizer JSON."""
    if not vocabulary.encoder_json:
        raise FailedPrecondition(
            "text here needs a tokenizer the service can encode with, and this one was "
            "registered as token bytes only: register it from a Hugging Face tokenizer (the SDK "
            "sends its tokenizer.json) or with --tokenizer, or give token ids", field)
    found = _encoders.get(vocabulary.digest)
    if found is not None:
        return found
    return _encoders.put(vocabulary.digest, tokenizer_from_json(vocabulary.encoder_json, field))


def _encode(vocabulary: "Vocabulary", text: str, field: str) -> tuple[int, ...]:
    return tuple(encoder(vocabulary, field).encode(text, add_special_tokens=False).ids)


def bad_word_sequences(vocabulary: "Vocabulary", word: str, field: str
                       ) -> tuple[tuple[int, ...], ...]:
    """vLLM's token sequences for one bad word (see the module docstring)."""
    if not word.strip():
        raise InvalidArgument("a bad word needs a character other than whitespace", field)
    plain = _encode(vocabulary, word.lstrip(), field)
    spaced = _encode(vocabulary, " " + word.lstrip(), field)
    result = [plain] if plain else []
    if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
        result.append(spaced)
    return tuple(result)


def breaker_sequences(vocabulary: "Vocabulary", text: str, field: str
                      ) -> tuple[tuple[int, ...], ...]:
    """llama.cpp's (head, *tail) sequences for one DRY breaker (see the module docstring)."""
    target = text.encode("utf-8")[:BREAKER_MAX_BYTES]
    result: dict[tuple[int, ...], None] = {}
    first = target[:1]
    for token_id, word in enumerate(vocabulary.tokens):
        if not word or first not in word:
            continue
        if target in word:
            result[(token_id,)] = None
            continue
        position = word.find(first)
        while position >= 0:
            rest = word[position:]
            if len(rest) < len(target) and target.startswith(rest):
                try:
                    remainder = target[len(rest):].decode("utf-8")
                except UnicodeDecodeError:  # the tail would split a character: not text
                    remainder = ""
                if remainder:
                    tail = _encode(vocabulary, remainder, field)[:BREAKER_MAX_TAIL]
                    result[(token_id, *tail)] = None
            position = word.find(first, position + 1)
    return tuple(result)


_RULES = {"bad_words": bad_word_sequences, "breakers": breaker_sequences}


def has_text(items: Iterable[Any]) -> bool:
    return any(isinstance(item, str) for item in items)


def _resolved(vocabulary: "Vocabulary", rule: str, items: tuple[Any, ...], field: str
              ) -> tuple[tuple[int, ...], ...]:
    key = (vocabulary.digest, bool(vocabulary.encoder_json), rule, items)
    found = _sequences.get(key)
    if found is not None:
        return found
    out: dict[tuple[int, ...], None] = {}
    for index, item in enumerate(items):
        if isinstance(item, str):
            for sequence in _RULES[rule](vocabulary, item, f"{field}[{index}]"):
                out[sequence] = None
        else:
            out[item] = None
    return _sequences.put(key, tuple(out))


def token_sequences(vocabulary: "Vocabulary | None", rule: str, items: tuple[Any, ...],
                    field: str) -> tuple[tuple[int, ...], ...]:
    """`items` (token-id sequences and texts) as token-id sequences, the texts encoded by
    `rule` ("bad_words" or "breakers"), duplicates dropped, in order; `items` itself when it
    holds no text. InvalidArgument naming `field` when texts come without a tokenizer,
    FailedPrecondition when the tokenizer cannot encode."""
    if not has_text(items):
        return items
    if vocabulary is None:
        raise InvalidArgument("text here needs the sequence's tokenizer (SequenceConfig."
                              "tokenizer); or give token ids", field)
    return _resolved(vocabulary, rule, items, field)


def cache_clear() -> None:
    """Forgets the encoders and encoded texts (tests)."""
    _encoders.clear()
    _sequences.clear()


__all__ = ["BREAKER_MAX_BYTES", "BREAKER_MAX_TAIL", "bad_word_sequences", "breaker_sequences",
           "check_encoder", "encoder", "has_text", "token_sequences"]
