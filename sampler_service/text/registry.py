"""The vocabularies the service knows, by content id and by name.

A vocabulary comes from `--tokenizer NAME=PATH` at start or from a worker's RegisterTokenizer
call. It is identified by its content digest (`Vocabulary.digest`), so registering the same
vocabulary again is a no-op that answers the same id; a name is an alias a sequence may use.
"""
from __future__ import annotations

import threading
from typing import Callable

from sampler_client.vocabulary import Vocabulary
from sampler_service.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, echo
from sampler_service.text import encode, grammar

#: Vocabularies one service keeps (`--max-tokenizers`): a sidecar serves one or a few models.
DEFAULT_MAX_TOKENIZERS = 16
#: The largest vocabulary accepted (ids are int32; real ones are under 300k), and the longest
#: token in bytes.
MAX_VOCAB = 1 << 21
MAX_TOKEN_BYTES = 1024


def checked_vocabulary(tokens: list[bytes], special_ids: list[int], eos_token_ids: list[int],
                       tokenizer_json: str = "") -> Vocabulary:
    """A Vocabulary from a RegisterTokenizer request's fields, checked (InvalidArgument naming
    the field; a tokenizer JSON must spell every id as `tokens` do)."""
    if not tokens:
        raise InvalidArgument("a vocabulary needs at least one token", "tokens")
    if len(tokens) > MAX_VOCAB:
        raise InvalidArgument(f"{len(tokens)} tokens; at most {MAX_VOCAB}", "tokens")
    for index, token in enumerate(tokens):
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidArgument(f"token {index} has {len(token)} bytes; at most "
                                  f"{MAX_TOKEN_BYTES}", f"tokens[{index}]")
    for name, ids in (("special_ids", special_ids), ("eos_token_ids", eos_token_ids)):
        for index, token_id in enumerate(ids):
            if not 0 <= token_id < len(tokens):
                raise InvalidArgument(f"id {token_id} is outside the vocabulary of "
                                      f"{len(tokens)} tokens", f"{name}[{index}]")
    vocabulary = Vocabulary(tuple(tokens), frozenset(special_ids), tuple(eos_token_ids),
                            encoder_json=tokenizer_json)
    encode.check_encoder(vocabulary, "tokenizer_json")
    return vocabulary


class TokenizerRegistry:
    """Thread-safe map of vocabularies by digest, with names as aliases."""

    def __init__(self, max_tokenizers: int = DEFAULT_MAX_TOKENIZERS):
        self._by_id: dict[str, Vocabulary] = {}
        self._names: dict[str, str] = {}
        self._max = max_tokenizers
        self._lock = threading.Lock()
        #: Called with (vocabulary, names bound to it) after a registration that changed what
        #: is kept (a new vocabulary, one now able to encode, a new name), before `register`
        #: returns: `--state-dir` keeps them. None: nothing is called.
        self.on_change: Callable[[Vocabulary, tuple[str, ...]], None] | None = None

    def register(self, vocabulary: Vocabulary, name: str = "") -> str:
        """Adds `vocabulary` (a no-op when it is known, except that one with its tokenizer JSON
        replaces one without) and binds `name` to it; its id. Builds
        its grammar compiler first (`grammar.warm`): call it off the event loop."""
        digest = vocabulary.digest
        grammar.warm(vocabulary)  # outside the lock: structured outputs compile fast from now on
        if vocabulary.encoder_json:  # and text is encoded without building the encoder first
            encode.encoder(vocabulary, "tokenizer_json")
        with self._lock:
            bound = self._names.get(name)
            if name and bound is not None and bound != digest:
                raise AlreadyExists(f"tokenizer name {echo(name)} is bound to another vocabulary "
                                    f"({bound[:19]}…); choose another name", "name")
            known = self._by_id.get(digest)
            changed = known is None or bool(name and bound is None)
            if known is not None and vocabulary.encoder_json and not known.encoder_json:
                self._by_id[digest] = vocabulary  # the same vocabulary, now able to encode
                changed = True
            elif known is None:
                if len(self._by_id) >= self._max:
                    raise ResourceExhausted(f"{len(self._by_id)} tokenizers are registered, the "
                                            "cap (--max-tokenizers)", "--max-tokenizers")
                self._by_id[digest] = vocabulary
            if name:
                self._names[name] = digest
            kept = self._by_id[digest]
            names = tuple(n for n, d in self._names.items() if d == digest)
        if changed and self.on_change is not None:
            self.on_change(kept, names)
        return digest

    def get(self, key: str, field: str) -> tuple[str, Vocabulary]:
        """(id, vocabulary) of a registered name or id; NOT_FOUND naming `field`."""
        digest = self._names.get(key, key)
        vocabulary = self._by_id.get(digest)
        if vocabulary is None:
            raise NotFound(f"no tokenizer {echo(key)}: register it with RegisterTokenizer (the "
                           "SDK's register_tokenizer) or start the service with --tokenizer "
                           "NAME=PATH", field)
        return digest, vocabulary
