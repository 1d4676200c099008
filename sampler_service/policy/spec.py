"""Parses and validates policy specs (YAML or inline dicts) and resolves them for a sequence.

A spec (docs/policies.md; docs/architecture.md for where it is resolved):

    description: text
    chain: [ {processor_key: {param: value}}, ... ]   # run in the order written
    select: greedy | sample | {selector_key: {param: value}}
    defaults: {max_tokens: 256, stop_token_ids: [...], seed: 1, logprobs: 0}   # any setting
    overridable: [flat parameter names a request may set]
    follow_latest: false   # true: running sequences move to a new version at their next step

Without a policy, flat vLLM-named parameters build `CANONICAL_ORDER` with a sample selector.
Every error names the field it is about. Every number anywhere in a spec must be finite
(`check_finite`): NaN and ±inf are refused with the path where they stand.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from sampler_service.errors import InvalidArgument, echo
from sampler_service.policy.params import key_text, validate_values
from sampler_service.policy.processors import CANONICAL_ORDER, PROCESSORS
from sampler_service.policy.resolved import (ALWAYS_OVERRIDABLE, SETTING_NAMES, SETTINGS, Link,
                                             PolicyVersion, ResolvedPolicy, fold_aliases)
from sampler_service.policy.selectors import SELECTORS

SPEC_KEYS = ("description", "chain", "select", "defaults", "overridable", "follow_latest")

#: Flat request parameter -> (processor key, parameter name), from the processors' schemas.
FLAT_PROCESSOR_PARAMS: dict[str, tuple[str, str]] = {
    flat: (cls.key, param)
    for cls in CANONICAL_ORDER for param, flat in cls.flat_names.items()
}
#: Flat request parameter -> the processor whose values it sets together, as a mapping.
FLAT_GROUPS: dict[str, str] = {cls.flat_group: cls.key for cls in CANONICAL_ORDER
                               if cls.flat_group}
FLAT_NAMES = frozenset(FLAT_PROCESSOR_PARAMS) | frozenset(FLAT_GROUPS) | SETTING_NAMES


def check_finite(value: Any, field: str) -> None:
    """Raises InvalidArgument naming the first NaN or ±inf in `value` (nested mappings and
    lists; e.g. `spec.chain[0].top_p.p`). Parameter schemas refuse each they read (naming a
    map entry `bias[5]`); this catches any other: a spec holding one could be no policy's,
    and could not be sent back as a Struct."""
    stack = [(value, field)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidArgument(f"{_label(where)} must be a finite number, got {item}", where)
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{key_text(k)}") for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(item))))


def _label(field: str) -> str:
    return field.rsplit(".", 1)[-1]


def _canonical(value: Any) -> Any:
    """`value` with every number a float (a Struct or JSON round trip turns 40 into 40.0)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def content_digest(source: Mapping[str, Any]) -> str:
    """Digest of the canonical JSON of a spec as written: the same for the same content
    whatever the key order or number type, so a spec read back and put again keeps its
    version."""
    canonical = json.dumps(_canonical(source), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PolicySpec:
    """A validated policy: chain and selector as (key, values) pairs, settings, overridable."""

    name: str
    description: str
    chain: tuple[tuple[str, Mapping[str, Any]], ...]
    select: tuple[str, Mapping[str, Any]]
    defaults: Mapping[str, Any]
    overridable: frozenset[str]
    source: Mapping[str, Any]
    follow_latest: bool = False

    def content_hash(self) -> str:
        return content_digest(self.source)


def _stage_entry(entry: Any, known: Mapping[str, Any], what: str, field: str) -> tuple[str, dict]:
    """`key`, `{key: params}` or `{key: null}` -> (key, validated params)."""
    if isinstance(entry, str):
        key, given = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        key, given = next(iter(entry.items()))
    else:
        raise InvalidArgument(f"each {what} must be a name or a one-key mapping "
                              f"{{name: {{param: value}}}}, got {echo(entry)}", field)
    if key not in known:
        hint = ""
        if what == "processor" and key in SELECTORS:
            hint = f"; {key!r} is a selector: a chain ends in exactly one, given by `select`"
        elif what == "selector" and key in PROCESSORS:
            hint = f"; {key!r} is a processor: put it in `chain`"
        raise InvalidArgument(f"unknown {what} {echo(key)}{hint}; known: "
                              f"{', '.join(sorted(known))}", field)
    values = validate_values(known[key].params, given, f"{field}.{key}")
    known[key].check_values(values, f"{field}.{key}")
    return key, values


def parse_policy(name: str, raw: Any, field: str = "spec") -> PolicySpec:
    """Validates one policy spec; raises InvalidArgument naming the offending field."""
    if not isinstance(raw, dict):
        raise InvalidArgument(f"policy {echo(name)} must be a mapping, got {echo(raw)}", field)
    for key in raw:
        if key not in SPEC_KEYS:
            raise InvalidArgument(f"unknown key {echo(key)}; a policy has {', '.join(SPEC_KEYS)}",
                                  f"{field}.{key_text(key)}")
    chain_raw = raw.get("chain") or []
    if not isinstance(chain_raw, list):
        raise InvalidArgument("chain must be a list of processors", f"{field}.chain")
    chain = tuple(_stage_entry(e, PROCESSORS, "processor", f"{field}.chain[{i}]")
                  for i, e in enumerate(chain_raw))
    keys = [k for k, _ in chain]
    for key in set(keys):
        if keys.count(key) > 1:
            raise InvalidArgument(f"processor {key!r} appears {keys.count(key)} times; give it once",
                                  f"{field}.chain")
    if "select" not in raw:
        raise InvalidArgument("a policy must end in exactly one selector: set `select` to one of "
                              + ", ".join(sorted(SELECTORS)), f"{field}.select")
    select = _stage_entry(raw["select"], SELECTORS, "selector", f"{field}.select")
    defaults = fold_aliases(validate_values(SETTINGS, raw.get("defaults"), f"{field}.defaults"),
                            raw.get("defaults") or (), f"{field}.defaults")
    overridable_raw = raw.get("overridable") or []
    if not isinstance(overridable_raw, list):
        raise InvalidArgument("overridable must be a list of parameter names",
                              f"{field}.overridable")
    for i, flat in enumerate(overridable_raw):
        where = f"{field}.overridable[{i}]"
        if not isinstance(flat, str) or flat not in FLAT_NAMES:
            raise InvalidArgument(f"{echo(flat)} is not a request parameter; known: "
                                  + ", ".join(sorted(FLAT_NAMES)), where)
        owner = FLAT_PROCESSOR_PARAMS[flat][0] if flat in FLAT_PROCESSOR_PARAMS \
            else FLAT_GROUPS.get(flat)
        if owner is not None and owner not in keys:
            raise InvalidArgument(f"{flat!r} is overridable but the chain has no "
                                  f"{owner!r} processor; add it (with its "
                                  "off value if it should start off)", where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise InvalidArgument("description must be text", f"{field}.description")
    follow_latest = raw.get("follow_latest", False)
    if not isinstance(follow_latest, bool):
        raise InvalidArgument("follow_latest must be true or false", f"{field}.follow_latest")
    check_finite(raw, field)  # the schemas refuse each they read; this, any other
    return PolicySpec(name=name, description=description, chain=chain, select=select,
                      defaults=defaults, overridable=frozenset(overridable_raw), source=raw,
                      follow_latest=follow_latest)


def resolve(spec: PolicySpec, version: PolicyVersion, overrides: Mapping[str, Any],
            field: str = "params", split: str = "", inline: bool = False) -> ResolvedPolicy:
    """Applies request overrides to a policy, checking each is allowed and in range.

    `inline`: the spec came with the request (an inline `policy_spec`), so its author is the
    caller: every sequence setting (seed, max_tokens, stop ids, ...) may be set by the request
    too, as in the spec's `defaults:`, whatever its `overridable` says. Processor parameters
    still need `overridable` (their stage must be in the chain)."""
    chain = {key: dict(values) for key, values in spec.chain}
    settings = dict(spec.defaults)
    free = spec.overridable | ALWAYS_OVERRIDABLE | (SETTING_NAMES if inline else frozenset())
    for flat, value in overrides.items():
        where = f"{field}.{flat}"
        if flat not in FLAT_NAMES:
            raise InvalidArgument(f"unknown parameter {echo(flat)}", where)
        if flat not in free:
            allowed = ", ".join(sorted(free))
            raise InvalidArgument(f"policy {echo(spec.name)} does not let a request set {flat!r}; "
                                  f"overridable: {allowed}", where)
        if flat in SETTING_NAMES:
            settings[flat] = next(p for p in SETTINGS if p.name == flat).validate(value, where)
        elif flat in FLAT_GROUPS:
            cls = PROCESSORS[FLAT_GROUPS[flat]]
            chain[cls.key] = validate_values(cls.params, value, where)
            cls.check_values(chain[cls.key], where)
        else:
            key, param = FLAT_PROCESSOR_PARAMS[flat]
            schema = next(p for p in PROCESSORS[key].params if p.name == param)
            chain[key][param] = schema.validate(value, where)
    settings = fold_aliases(settings, overrides, field)
    links = tuple(Link(PROCESSORS[key](), chain[key]) for key, _ in spec.chain)
    selector = Link(SELECTORS[spec.select[0]](), dict(spec.select[1]))
    return ResolvedPolicy(spec.name, version, links, selector, settings, split=split,
                          follow_latest=spec.follow_latest, overrides=dict(overrides))


#: Flat parameters build this spec: every canonical processor at its off value, all overridable.
FLAT_SPEC = parse_policy("", {
    "description": "Flat vLLM-named parameters in vLLM v1's order.",
    "chain": [{cls.key: {}} for cls in CANONICAL_ORDER],
    "select": "sample",
    "overridable": sorted(FLAT_NAMES),
})
FLAT_VERSION = PolicyVersion(0, FLAT_SPEC.content_hash())


def resolve_flat(params: Mapping[str, Any], field: str = "params") -> ResolvedPolicy:
    """A sequence given flat parameters and no policy."""
    return resolve(FLAT_SPEC, FLAT_VERSION, params, field)
