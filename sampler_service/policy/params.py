"""Declarative parameter schemas shared by processors, selectors and sequence settings.

Each parameter states its type, its default, its "off" value (the value that leaves a row
bit-identical) and its valid range. Validation names the offending field; the same schema
feeds `docs/policies.md` (see `docgen`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sampler_service.errors import InvalidArgument


def _label(field: str) -> str:
    return field.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Param:
    """One parameter of a processor, selector or sequence setting.

    `minimum` / `maximum` bound the value; `exclusive_minimum` makes the lower bound strict.
    `kind` is "float", "int" or "int_list".
    """

    name: str
    kind: str
    default: Any
    off: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def range_text(self) -> str:
        """Human-readable valid range, e.g. `(0, 1]`."""
        if self.kind == "int_list":
            return "token ids >= 0"
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        left = "(" if self.exclusive_minimum or self.minimum is None else "["
        right = ")" if self.maximum is None else "]"
        return f"{left}{low}, {high}{right}"

    def validate(self, value: Any, field: str) -> Any:
        """Returns `value` coerced to the parameter's type, or raises InvalidArgument(field).

        Messages call the parameter by the last segment of `field`, the name the caller wrote
        (`top_p` for a flat request parameter, `p` inside a chain entry).
        """
        if self.kind == "int_list":
            if not isinstance(value, (list, tuple)):
                raise InvalidArgument(f"{_label(field)} must be a list of token ids, got {value!r}", field)
            ids = [self._integer(v, field) for v in value]
            if any(v < 0 for v in ids):
                raise InvalidArgument(f"{_label(field)} must hold token ids >= 0, got {ids}", field)
            return tuple(ids)
        number = self._integer(value, field) if self.kind == "int" else self._float(value, field)
        too_low = self.minimum is not None and (
            number <= self.minimum if self.exclusive_minimum else number < self.minimum)
        too_high = self.maximum is not None and number > self.maximum
        if too_low or too_high:
            raise InvalidArgument(
                f"{_label(field)} = {number:g} is out of range: must be in {self.range_text()}"
                f" (off: {self.off})", field)
        return number

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
