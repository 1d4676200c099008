"""Incremental detokenization of one generated sequence, token by token.

The output text is the UTF-8 decoding of the concatenated token bytes (`Vocabulary.tokens`),
control tokens contributing nothing: for byte-level BPE tokenizers (SmolLM2, GPT-2, Llama 3)
with `clean_up_tokenization_spaces=False` this is exactly Hugging Face's
`tokenizer.decode(ids, skip_special_tokens=True)` once the sequence ends (`finished_text`).
While it runs, an incomplete trailing multi-byte character is held back until it completes,
as vLLM's incremental detokenizer holds back a trailing U+FFFD; a byte sequence that can never
complete is replaced by U+FFFD as soon as that is known, one per maximal invalid subpart
(Python's errors="replace", the same rule as Rust's `from_utf8_lossy` that `tokenizers` uses).
"""
from __future__ import annotations

import codecs

from sampler_client.vocabulary import Vocabulary

_Decoder = codecs.getincrementaldecoder("utf-8")


class IncrementalText:
    """The output text of one sequence. `append` costs O(token length); `text` and `bytes`
    join what was appended since their last call (O(output length) when there is new text)."""

    __slots__ = ("_vocab", "_decoder", "_pieces", "_bytes", "_chars")

    def __init__(self, vocabulary: Vocabulary) -> None:
        self._vocab = vocabulary
        self._decoder = _Decoder(errors="replace")
        self._pieces: list[str] = []
        self._bytes = bytearray()
        self._chars = 0

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocab

    def append(self, token_id: int) -> str:
        """Adds one token; returns the characters it completed ("" for a control token, an id
        outside the vocabulary, or a token that only extends an incomplete character)."""
        tokens = self._vocab.tokens
        data = tokens[token_id] if 0 <= token_id < len(tokens) else b""
        if not data:
            return ""
        self._bytes += data
        new = self._decoder.decode(data)
        if new:
            self._pieces.append(new)
            self._chars += len(new)
        return new

    def extend(self, token_ids) -> str:
        """Appends each id in turn; returns the characters they completed."""
        return "".join([self.append(token_id) for token_id in token_ids])

    @property
    def text(self) -> str:
        """The complete characters so far (an incomplete trailing character held back)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def __len__(self) -> int:
        """len(self.text), without joining."""
        return self._chars

    @property
    def bytes(self) -> bytes:
        """Every byte appended, the held-back ones included."""
        return bytes(self._bytes)

    @property
    def pending(self) -> bytes:
        """The bytes of the incomplete trailing character held back (at most 3). Python's
        incremental decoder also holds the first two bytes of an encoded surrogate (ED A0-BF),
        which no byte completes: the next one turns them into U+FFFD, as HF's decode does."""
        return self._decoder.getstate()[0]

    @property
    def finished_text(self) -> str:
        """The text if the sequence ended now: the held-back bytes become U+FFFD, as
        `tokenizer.decode` of the whole sequence gives. Does not change this object."""
        return self.text + self.pending.decode("utf-8", errors="replace")

    def copy(self) -> IncrementalText:
        """An independent continuation (a beam or fork branch) from this point."""
        other = IncrementalText.__new__(IncrementalText)
        other._vocab = self._vocab
        other._decoder = _Decoder(errors="replace")
        other._decoder.setstate(self._decoder.getstate())
        other._pieces = [self.text] if self._chars else []
        other._bytes = bytearray(self._bytes)
        other._chars = self._chars
        return other
