"""Stop strings: finish a sequence when its output text contains one of them.

After each token, with `text` the output text (`IncrementalText.text`) and `new_from` its
length before the token, `StopStrings.find(text, new_from)` returns the stop string occurrence
that ends in the new text:

    occurrences = {(i, k) : text[i : i + len(s_k)] == s_k  and  i + len(s_k) > new_from}
    match       = the one with the least start i, ties to the least list index k

Only text[max(0, new_from - (L - 1)):] is searched, L the longest stop string's length: a stop
string spanning several tokens is found at the token that completes it, and text searched
before is not searched again (an earlier token would already have stopped the sequence).

Peers:

* Hugging Face `StopStringCriteria`: generation stops at the token during which a stop string
  is completed (the stop string may end inside that token); the token ids are not truncated.
  `find` returning a match is exactly that condition.
* vLLM `SamplingParams.stop`: the sequence finishes with reason STOP at that same token and the
  output text is truncated: `text[:i]`, or `text[:i + len(s_k)]` with
  `include_stop_str_in_output` (`truncated`); token ids are kept. vLLM searches the stop strings
  in list order and takes the first one that occurs; `find` takes the earliest occurrence in
  the text instead, which differs from vLLM only when two different stop strings complete at
  the same token (then `find` truncates at the one that starts first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class Match:
    """A stop string occurrence: text[start:end] == stop, `index` its position in the list."""

    start: int
    end: int
    index: int
    stop: str


class StopStrings:
    """Validated stop strings: at most 64, each a non-empty str of at most 256 characters."""

    __slots__ = ("strings", "lookback")

    def __init__(self, strings: Sequence[str]) -> None:
        strings = tuple(strings)
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: {len(strings)} stop strings, at most {MAX_STOP_STRINGS}")
        for i, s in enumerate(strings):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}]: a stop string is a non-empty string, got {s!r:.40}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop[{i}]: {len(s)} characters, at most {MAX_STOP_STRING_CHARS}")
        self.strings = strings
        self.lookback = max((len(s) for s in strings), default=1) - 1

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, text: str, new_from: int) -> Match | None:
        """The earliest stop string occurrence ending after `new_from` (see the module doc)."""
        if not 0 <= new_from <= len(text):
            raise ValueError(f"new_from {new_from} outside the text (0..{len(text)})")
        if new_from == len(text):
            return None
        best: Match | None = None
        for k, s in enumerate(self.strings):
            i = text.find(s, max(0, new_from - len(s) + 1))
            if i >= 0 and (best is None or i < best.start):
                best = Match(i, i + len(s), k, s)
        return best

    @staticmethod
    def truncated(text: str, match: Match, include: bool) -> str:
        """The output text vLLM returns: cut before the stop string, or after it when
        `include` (include_stop_str_in_output); text after it in the same token is dropped."""
        return text[:match.end] if include else text[:match.start]
