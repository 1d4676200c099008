"""Declarative parameter schemas shared by processors, selectors and sequence settings.

Each parameter states its type, its default, its "off" value (the value that leaves a row
bit-identical) and its valid range. Validation names the offending field; the same schema
feeds `docs/policies.md` (see `docgen`).

Kinds:
- `float`, `int`, `bool`: scalars; the engine hands them to a stage as one [rows] tensor.
- `int_list`: token ids, e.g. `[2, 13]`.
- `int_lists`: token-id sequences, e.g. `[[7, 8], [9]]` (bad words, DRY sequence breakers);
  where the parameter has a `text_rule`, an entry may be a string instead, which the stage
  encodes with the sequence's tokenizer by that rule (`sampler_service.text.encode`).
- `token_bias`: token id -> float, e.g. `{50256: -100}` (keys may be their decimal text, as
  OpenAI's JSON sends them: `{"50256": -100}`).
- `int_map`: int -> int, e.g. `{0: 1}` (step -> forced token).
- `choice`: one of the words in `choices`; true / false are accepted as "true" / "false"
  (Hugging Face's `early_stopping` is True, False or "never").
- `str_list`: strings (stop strings, structured choices).
- `json_schema`: a JSON schema, as a mapping or its JSON text (kept as compact JSON text);
  `regex`, `grammar`: a regular expression, an EBNF / GBNF grammar. Each is parsed when
  validated (`sampler_service.text.grammar`), so a bad one is refused naming its field; ""
  is off.
Non-scalar kinds reach a stage as a Python list with one value per row.

A parameter may take a peer's other spelling of a value (`aliases`): vLLM's top_k = -1 is
stored as 0 (off), llama.cpp's min_keep = 0 as 1, so a resolved policy has one spelling.

Every number must be finite. An integer given as a float (protobuf Struct and JSON numbers are
doubles) must be at most 2^53 in magnitude, where every integer still has its own double: a
larger one may already have been rounded on its way, so it is refused rather than used
changed (give such a seed as `params.seed`, a uint64). Every integer is bounded: an `int` (or
`int_map` value) without a `maximum` by `MAX_INT`, and token ids (lists, bias and map keys) by
`MAX_TOKEN_ID`, so a value accepted at creation always fits the engine's int64 tensors, with
room for the arithmetic stages do with it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from sampler_service.errors import InvalidArgument, echo

SCALAR_KINDS = ("float", "int", "bool")
#: The largest integer parameter (count, size, window, position) whose schema sets no
#: `maximum`: int32's, as the wire's counts are (sampler.proto), far below int64's.
MAX_INT = 2 ** 31 - 1
#: The largest token id: ids travel as int32 (sampler.proto); a vocabulary is far smaller.
MAX_TOKEN_ID = 2 ** 31 - 1
#: Characters of a caller's key a field path repeats (e.g. `bias[123…]`).
KEY_CHARS = 32
#: The largest integer every double holds exactly: an integer parameter given as a larger
#: float (a Struct or JSON number) may have been rounded on its way, and is refused.
MAX_EXACT_DOUBLE_INT = 2 ** 53
#: A map key given as text: the decimal digits of a token id (OpenAI's `logit_bias` keys).
_DECIMAL_KEY = re.compile(r"-?[0-9]+")


def _label(field: str) -> str:
    return field.rsplit(".", 1)[-1]


def key_text(key: Any) -> str:
    """A caller's key as a field path segment: itself, or its first `KEY_CHARS` characters
    then "…" (a path names the field, it need not repeat a long key whole)."""
    text = str(key)
    return text if len(text) <= KEY_CHARS else f"{text[:KEY_CHARS]}…"


#: Bounds the range text writes as powers of two.
_POWERS = {2 ** 31 - 1: "2^31-1", 2 ** 63 - 1: "2^63-1", 2 ** 64 - 1: "2^64-1"}


def _number_text(value: float) -> str:
    """An integer bound as the range text shows it: exactly (`2^31-1` for int32's max)."""
    return _POWERS.get(int(value), str(int(value))) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Param:
    """One parameter of a processor, selector or sequence setting.

    `minimum` / `maximum` bound the value (for maps: the values); `exclusive_minimum` makes the
    lower bound strict.
    """

    name: str
    kind: str
    default: Any
    off: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    #: Overrides the generated range text (e.g. for ids that are positions, not tokens).
    range_doc: str | None = None
    #: `int_lists` only: how a string entry becomes token-id sequences (a rule of
    #: `sampler_service.text.encode`); "" = token ids only.
    text_rule: str = ""
    #: The allowed words of a `choice` parameter.
    choices: tuple[str, ...] = ()
    #: (value, stored as) pairs: another spelling of a value a peer accepts, replaced when
    #: validated (vLLM's top_k = -1 for 0, llama.cpp's min_keep = 0 for 1).
    aliases: tuple[tuple[Any, Any], ...] = ()
    #: `float` only: the engine hands the stage a float64 tensor (the value as written), not
    #: float32, for a stage that repeats a peer's float64 arithmetic on it (Hugging Face's
    #: 1 − top_p, computed on the Python float).
    float64: bool = False

    def range_text(self) -> str:
        """Human-readable valid range, e.g. `(0, 1]`."""
        if self.range_doc is not None:
            return self.range_doc
        if self.kind == "bool":
            return "true / false"
        if self.kind == "choice":
            return " / ".join(self.choices)
        if self.kind == "int_list":
            return f"token ids in [0, {_number_text(MAX_TOKEN_ID)}]"
        if self.kind == "int_lists":
            ids = f"lists of token ids in [0, {_number_text(MAX_TOKEN_ID)}]"
            return ids + (f", or strings of 1 to {MAX_STRING_CHARS} characters (encoded with the "
                          "sequence's tokenizer)" if self.text_rule else "")
        if self.kind == "str_list":
            return f"at most {MAX_STRINGS} strings of 1 to {MAX_STRING_CHARS} characters"
        if self.kind in GRAMMAR_KINDS:
            return GRAMMAR_KINDS[self.kind]
        integer = self.kind in ("int", "int_map")
        show = _number_text if integer else (lambda v: f"{v:g}")
        upper = self.upper
        low = "-inf" if self.minimum is None else show(self.minimum)
        high = "inf" if upper is None else show(upper)
        left = "(" if self.exclusive_minimum or self.minimum is None else "["
        right = ")" if upper is None else "]"
        bounds = f"{left}{low}, {high}{right}"
        keys = {"token_bias": f"token id in [0, {_number_text(MAX_TOKEN_ID)}]",
                "int_map": f"int in [0, {_number_text(MAX_INT)}]"}
        if self.aliases:
            bounds += "".join(f", or {show(a)} (= {show(b)})" for a, b in self.aliases)
        return f"{keys[self.kind]} -> {bounds}" if self.kind in keys else bounds

    @property
    def upper(self) -> float | None:
        """The largest value allowed: `maximum`, or `MAX_INT` for an integer without one."""
        if self.maximum is None and self.kind in ("int", "int_map"):
            return MAX_INT
        return self.maximum

    def validate(self, value: Any, field: str) -> Any:
        """Returns `value` coerced to the parameter's type, or raises InvalidArgument(field).

        Messages call the parameter by the last segment of `field`, the name the caller wrote
        (`top_p` for a flat request parameter, `p` inside a chain entry). Lists become tuples
        and maps become sorted tuples of pairs, so resolved values are hashable.
        """
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidArgument(f"{_label(field)} must be true or false, got {echo(value)}",
                                      field)
            return value
        if self.kind == "choice":
            word = str(value).lower() if isinstance(value, bool) else value
            if word not in self.choices:
                raise InvalidArgument(f"{_label(field)} must be one of {', '.join(self.choices)}, "
                                      f"got {echo(value)}", field)
            return word
        if self.kind == "int_list":
            return self._token_ids(value, field)
        if self.kind == "str_list":
            return _strings(value, field)
        if self.kind in GRAMMAR_KINDS:
            return _grammar_text(self.kind, value, field)
        if self.kind == "int_lists":
            if not isinstance(value, (list, tuple)):
                raise InvalidArgument(f"{_label(field)} must be a list of token-id lists or "
                                      f"strings, got {echo(value)}", field)
            sequences = tuple(self._sequence_or_text(v, f"{field}[{i}]") if self.text_rule
                              else self._token_ids(v, f"{field}[{i}]")
                              for i, v in enumerate(value))
            if any(not s for s in sequences):
                raise InvalidArgument(f"{_label(field)} must not hold an empty sequence", field)
            return sequences
        if self.kind in ("token_bias", "int_map"):
            if not isinstance(value, dict):
                raise InvalidArgument(f"{_label(field)} must be a mapping, got {echo(value)}",
                                      field)
            pairs = {}
            for key, item in value.items():
                where = f"{field}[{key_text(key)}]"
                number = self._key(key, where)
                if number in pairs:  # "5" and "05" (or 5 and "5") name one id
                    raise InvalidArgument(f"key {echo(key)} gives {number} a second time", where)
                pairs[number] = self._number(item, where, self.kind == "int_map")
            return tuple(sorted(pairs.items()))
        return self._number(value, field, self.kind == "int")

    def plain(self, value: Any) -> Any:
        """A validated value as plain JSON-able data (maps get string keys, as in JSON)."""
        if self.kind in ("token_bias", "int_map"):
            return {str(k): v for k, v in value}
        if self.kind == "int_lists":
            return [s if isinstance(s, str) else list(s) for s in value]
        if self.kind == "json_schema":
            return json.loads(value) if value else ""
        return list(value) if self.kind in ("int_list", "str_list") else value

    def _number(self, value: Any, field: str, integer: bool) -> float | int:
        number = self._integer(value, field) if integer else self._float(value, field)
        for alias, stored in self.aliases:
            if number == alias:
                return stored
        upper = self.upper if integer else self.maximum
        too_low = self.minimum is not None and (
            number <= self.minimum if self.exclusive_minimum else number < self.minimum)
        too_high = upper is not None and number > upper
        if too_low or too_high:
            off = "" if self.off is None else f" (off: {self.off})"
            shown = echo(number) if integer else f"{number:g}"
            raise InvalidArgument(
                f"{_label(field)} = {shown} is out of range: must be in {self.range_text()}{off}",
                field)
        if integer and isinstance(value, float) and abs(value) > MAX_EXACT_DOUBLE_INT:
            raise InvalidArgument(
                f"{_label(field)} = {value:.17g} is a float beyond 2^53, where a double (a "
                "JSON or protobuf Struct number) cannot hold every integer, so it may have been "
                "rounded on its way: give it as an integer (a seed as params.seed, a uint64)",
                field)
        return number

    def _key(self, key: Any, field: str) -> int:
        """A map key: a token id (`token_bias`) or an int (`int_map`), in [0, MAX_INT]; text
        keys must be decimal digits (as OpenAI's JSON sends token ids: `"50256"`)."""
        if isinstance(key, str):
            if not _DECIMAL_KEY.fullmatch(key):
                raise InvalidArgument(f"key {echo(key)} must be an integer (or its decimal "
                                      f"digits) in [0, {_number_text(MAX_INT)}]", field)
            # More digits than any int64 has: out of range (and past what int() converts).
            number = int(key) if len(key.lstrip("-")) <= 19 else MAX_INT + 1
        else:
            number = self._integer(key, field)
        if number < 0 or number > MAX_INT:
            what = "token id" if self.kind == "token_bias" else "key"
            shown = key_text(key) if isinstance(key, str) else number
            raise InvalidArgument(f"{what} {shown} must be in [0, {_number_text(MAX_INT)}]", field)
        return number

    def _sequence_or_text(self, value: Any, field: str) -> tuple[int, ...] | str:
        """One `int_lists` entry: token ids, or a string of 1 to MAX_STRING_CHARS characters."""
        if isinstance(value, str):
            if not 1 <= len(value) <= MAX_STRING_CHARS:
                raise InvalidArgument(f"{_label(field)} must be a string of 1 to "
                                      f"{MAX_STRING_CHARS} characters, got {echo(value)}", field)
            return value
        if not isinstance(value, (list, tuple)):
            raise InvalidArgument(f"{_label(field)} must be a list of token ids or a string "
                                  f"(not both), got {echo(value)}", field)
        return self._token_ids(value, field)

    def _token_ids(self, value: Any, field: str) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise InvalidArgument(f"{_label(field)} must be a list of token ids, got "
                                  f"{echo(value)}", field)
        ids = tuple(self._integer(v, field) for v in value)
        for index, token in enumerate(ids):
            if token < 0 or token > MAX_TOKEN_ID:
                raise InvalidArgument(f"{_label(field)} must hold token ids in "
                                      f"[0, {_number_text(MAX_TOKEN_ID)}], got {token} at index "
                                      f"{index}", field)
        return ids

    def _integer(self, value: Any, field: str) -> int:
        # Integral floats are accepted: protobuf Struct carries every number as a double.
        # (NaN and ±inf are not integral.)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            what = "a finite integer" if isinstance(value, float) and not math.isfinite(value) \
                else "an integer"
            raise InvalidArgument(f"{_label(field)} must be {what}, got {echo(value)}", field)
        return int(value)

    def _float(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{_label(field)} must be a number, got {echo(value)}", field)
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
        if not math.isfinite(number):
            raise InvalidArgument(f"{_label(field)} must be a finite number, got {echo(value)}",
                                  field)
        return number


def validate_values(params: tuple[Param, ...], given: Any, field: str) -> dict[str, Any]:
    """Validates a `{name: value}` mapping against `params`, filling defaults.

    Unknown names are rejected so a typo never silently does nothing.
    """
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise InvalidArgument(f"expected a mapping of parameters, got {echo(given)}", field)
    known = {p.name: p for p in params}
    for name in given:
        if name not in known:
            raise InvalidArgument(
                f"unknown parameter {echo(name)}; known: {', '.join(sorted(known)) or 'none'}",
                f"{field}.{key_text(name)}")
    return {p.name: p.validate(given[p.name], f"{field}.{p.name}") if p.name in given else p.default
            for p in params}


#: A `str_list` parameter (stop strings) holds at most this many strings of at most this many
#: characters: each step searches the text's last MAX_STRING_CHARS characters for them.
MAX_STRINGS = 64
MAX_STRING_CHARS = 256


def _strings(value: Any, field: str) -> tuple[str, ...]:
    """A list of 1 to MAX_STRING_CHARS-character strings, at most MAX_STRINGS of them."""
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(f"{_label(field)} must be a list of strings, got {echo(value)}", field)
    if len(value) > MAX_STRINGS:
        raise InvalidArgument(f"{_label(field)} holds {len(value)} strings; at most {MAX_STRINGS}",
                              field)
    for index, item in enumerate(value):
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_STRING_CHARS:
            raise InvalidArgument(f"{_label(field)}[{index}] must be a string of 1 to "
                                  f"{MAX_STRING_CHARS} characters, got {echo(item)}",
                                  f"{field}[{index}]")
    return tuple(value)


#: The grammar kinds and their range text.
GRAMMAR_KINDS = {"json_schema": "a JSON schema (mapping or JSON text)",
                 "regex": "a regular expression (xgrammar's dialect)",
                 "grammar": "an EBNF / GBNF grammar with a `root` rule"}


def _grammar_text(kind: str, value: Any, field: str) -> str:
    """A json_schema / regex / grammar value, canonical and parsed ("" = off)."""
    from sampler_service.text import grammar
    if isinstance(value, str) and not value:
        return ""
    if kind == "json_schema":
        text = grammar.canonical_schema(value, field)
    else:
        if not isinstance(value, str):
            raise InvalidArgument(f"{_label(field)} must be a string, got {echo(value)}", field)
        if len(value) > grammar.MAX_TEXT_CHARS:
            raise InvalidArgument(f"{_label(field)} has {len(value)} characters; at most "
                                  f"{grammar.MAX_TEXT_CHARS}", field)
        text = value
    grammar.parsed(kind, text, field)
    return text
