"""A/B splits: a policy name that stands for weighted variants, assigned per sequence id.

    policies:
      chat: {split: {creative: 0.9, edt: 0.1}}

A sequence created with policy `chat` gets one variant, chosen by a hash of (split name,
sequence id): the same id always gets the same variant (on any replica, after a restart), and
over many ids each variant gets its share of the weights. The sequence pins the variant's
version like any policy; its SequenceInfo names the split and the variant.
"""
from __future__ import annotations

import math

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

from sampler_service.errors import InvalidArgument
from sampler_service.policy.spec import content_digest


@dataclass(frozen=True)
class SplitSpec:
    """A validated split: variants (policy names) with weights summing to 1, in the order
    written."""

    name: str
    variants: tuple[tuple[str, float], ...]
    source: Mapping[str, Any]

    def content_hash(self) -> str:
        return content_digest(self.source)

    def assign(self, sequence_id: str) -> str:
        """The variant of `sequence_id`: a uniform u in [0, 1) from SHA-256 of (split name,
        sequence id), then the first variant whose cumulative weight exceeds u."""
        digest = hashlib.sha256(f"{self.name}\0{sequence_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2 ** 64
        total = 0.0
        for variant, weight in self.variants:
            total += weight
            if u < total:
                return variant
        return self.variants[-1][0]  # u within rounding of 1


def is_split(raw: Any) -> bool:
    return isinstance(raw, dict) and set(raw) == {"split"}


def parse_split(name: str, raw: Mapping[str, Any], field: str) -> SplitSpec:
    """`{split: {variant: weight, ...}}` -> SplitSpec; weights > 0, normalised to sum 1."""
    variants = raw["split"]
    where = f"{field}.split"
    if not isinstance(variants, dict) or not variants:
        raise InvalidArgument("split must map at least one policy name to a weight", where)
    for variant, weight in variants.items():
        if variant == name:
            raise InvalidArgument(f"split {name!r} lists itself as a variant", f"{where}.{variant}")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0
                or not math.isfinite(weight)):
            raise InvalidArgument(f"weight of {variant!r} must be a finite number > 0, got {weight!r}",
                                  f"{where}.{variant}")
    total = float(sum(variants.values()))
    return SplitSpec(name, tuple((v, w / total) for v, w in variants.items()), dict(raw))
