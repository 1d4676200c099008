"""Declarative parameter schemas shared by processors, selectors and sequence settings.

Each parameter states its type, its default, its "off" value (the value that leaves a row
bit-identical) and its valid range. Validation names the offending field; the same schema
feeds `docs/policies.md` (see `docgen`).

Kinds:
- `float`, `int`, `bool`: scalars; the engine hands them to a stage as one [rows] tensor.
- `int_list`: token ids, e.g. `[2, 13]`.
- `int_lists`: token-id sequences, e.g. `[[7, 8], [9]]` (bad words, DRY sequence breakers).
- `token_bias`: token id -> float, e.g. `{50256: -100}` (keys may be strings, as in JSON).
- `int_map`: int -> int, e.g. `{0: 1}` (step -> forced token).
- `choice`: one of the words in `choices`; true / false are accepted as "true" / "false"
  (Hugging Face's `early_stopping` is True, False or "never").
Non-scalar kinds reach a stage as a Python list with one value per row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sampler_service.errors import InvalidArgument

SCALAR_KINDS = ("float", "int", "bool")


def _label(field: str) -> str:
    return field.rsplit(".", 1)[-1]


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
    #: The allowed words of a `choice` parameter.
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        """Human-readable valid range, e.g. `(0, 1]`."""
        if self.range_doc is not None:
            return self.range_doc
        if self.kind == "bool":
            return "true / false"
        if self.kind == "choice":
            return " / ".join(self.choices)
        if self.kind in ("int_list", "int_lists"):
            return "token ids >= 0"
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        left = "(" if self.exclusive_minimum or self.minimum is None else "["
        right = ")" if self.maximum is None else "]"
        bounds = f"{left}{low}, {high}{right}"
        return {"token_bias": f"token id >= 0 -> {bounds}",
                "int_map": f"int >= 0 -> {bounds}"}.get(self.kind, bounds)

    def validate(self, value: Any, field: str) -> Any:
        """Returns `value` coerced to the parameter's type, or raises InvalidArgument(field).

        Messages call the parameter by the last segment of `field`, the name the caller wrote
        (`top_p` for a flat request parameter, `p` inside a chain entry). Lists become tuples
        and maps become sorted tuples of pairs, so resolved values are hashable.
        """
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidArgument(f"{_label(field)} must be true or false, got {value!r}", field)
            return value
        if self.kind == "choice":
            word = str(value).lower() if isinstance(value, bool) else value
            if word not in self.choices:
                raise InvalidArgument(f"{_label(field)} must be one of {', '.join(self.choices)}, "
                                      f"got {value!r}", field)
            return word
        if self.kind == "int_list":
            return self._token_ids(value, field)
        if self.kind == "int_lists":
            if not isinstance(value, (list, tuple)):
                raise InvalidArgument(f"{_label(field)} must be a list of token-id lists, got "
                                      f"{value!r}", field)
            sequences = tuple(self._token_ids(v, f"{field}[{i}]") for i, v in enumerate(value))
            if any(not s for s in sequences):
                raise InvalidArgument(f"{_label(field)} must not hold an empty sequence", field)
            return sequences
        if self.kind in ("token_bias", "int_map"):
            if not isinstance(value, dict):
                raise InvalidArgument(f"{_label(field)} must be a mapping, got {value!r}", field)
            pairs = []
            for key, item in value.items():
                where = f"{field}[{key}]"
                number = self._key(key, where)
                pairs.append((number, self._number(item, where, self.kind == "int_map")))
            return tuple(sorted(pairs))
        return self._number(value, field, self.kind == "int")

    def plain(self, value: Any) -> Any:
        """A validated value as plain JSON-able data (maps get string keys, as in JSON)."""
        if self.kind in ("token_bias", "int_map"):
            return {str(k): v for k, v in value}
        if self.kind == "int_lists":
            return [list(s) for s in value]
        return list(value) if self.kind == "int_list" else value

    def _number(self, value: Any, field: str, integer: bool) -> float | int:
        number = self._integer(value, field) if integer else self._float(value, field)
        too_low = self.minimum is not None and (
            number <= self.minimum if self.exclusive_minimum else number < self.minimum)
        too_high = self.maximum is not None and number > self.maximum
        if too_low or too_high:
            off = "" if self.off is None else f" (off: {self.off})"
            raise InvalidArgument(
                f"{_label(field)} = {number:g} is out of range: must be in {self.range_text()}{off}",
                field)
        return number

    def _key(self, key: Any, field: str) -> int:
        try:
            number = int(key) if isinstance(key, str) else self._integer(key, field)
        except ValueError:
            raise InvalidArgument(f"key {key!r} must be an integer", field) from None
        if number < 0:
            raise InvalidArgument(f"key {number} must be >= 0", field)
        return number

    def _token_ids(self, value: Any, field: str) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise InvalidArgument(f"{_label(field)} must be a list of token ids, got {value!r}", field)
        ids = tuple(self._integer(v, field) for v in value)
        if any(v < 0 for v in ids):
            raise InvalidArgument(f"{_label(field)} must hold token ids >= 0, got {list(ids)}", field)
        return ids

    def _integer(self, value: Any, field: str) -> int:
        # Integral floats are accepted: protobuf Struct carries every number as a double.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise InvalidArgument(f"{_label(field)} must be an integer, got {value!r}", field)
        return int(value)

    def _float(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise InvalidArgument(f"{_label(field)} must be a number, got {value!r}", field)
        return float(value)


def validate_values(params: tuple[Param, ...], given: Any, field: str) -> dict[str, Any]:
    """Validates a `{name: value}` mapping against `params`, filling defaults.

    Unknown names are rejected so a typo never silently does nothing.
    """
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise InvalidArgument(f"expected a mapping of parameters, got {given!r}", field)
    known = {p.name: p for p in params}
    for name in given:
        if name not in known:
            raise InvalidArgument(
                f"unknown parameter {name!r}; known: {', '.join(sorted(known)) or 'none'}",
                f"{field}.{name}")
    return {p.name: p.validate(given[p.name], f"{field}.{p.name}") if p.name in given else p.default
            for p in params}
