"""The policies in force, by name: the shipped defaults, the user's policy file(s) and what
the admin API put, each with a version (a number that grows on every change of the name's
spec, and a content hash). Sequences pin the resolved policy they were created with.

A policy file may also define A/B splits (`sampler_service.policy.splits`). Every change is
validated whole before it is applied, and applied atomically under one lock.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from sampler_service.errors import (FailedPrecondition, InvalidArgument, NotFound,
                                    SamplerServiceError)
from sampler_service.policy.files import load_yaml, read_policy_file
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import PolicySpec, parse_policy
from sampler_service.policy.splits import SplitSpec, is_split, parse_split

AnySpec = PolicySpec | SplitSpec

DEFAULT_POLICIES = "default_policies.yaml"


def parse_entry(name: str, raw: Any, field: str) -> AnySpec:
    """One named entry of a policy document: a policy spec or a split."""
    return parse_split(name, raw, field) if is_split(raw) else parse_policy(name, raw, field)


def parse_policy_document(document: Any, source: str) -> dict[str, AnySpec]:
    """`{policies: {name: spec}}` -> validated specs; raises InvalidArgument naming the field."""
    if not isinstance(document, dict) or not isinstance(document.get("policies"), dict):
        raise InvalidArgument(f"{source}: expected a top-level `policies:` mapping", "policies")
    extra = sorted(map(str, set(document) - {"policies"}))  # str: YAML keys may be any type
    if extra:
        raise InvalidArgument(f"{source}: unknown top-level keys {extra}", extra[0])
    for name in document["policies"]:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{source}: a policy name must be a non-empty string, got a "
                                  f"{type(name).__name__}", "policies")
    return {name: parse_entry(name, raw, f"policies.{name}")
            for name, raw in document["policies"].items()}


def parse_policy_text(text: str, source: str) -> dict[str, AnySpec]:
    """A YAML policy document -> validated specs. The document is size-capped and parsed with
    alias expansion bounded (`sampler_service.policy.files`)."""
    return parse_policy_document(load_yaml(text, source), source)


def load_policy_file(path: str | Path) -> dict[str, AnySpec]:
    """Reads and validates a YAML policy file: refused before reading when it is over the
    size cap, and when it is not UTF-8 (`sampler_service.policy.files`)."""
    return parse_policy_text(read_policy_file(path), str(path))


def shipped_policies() -> dict[str, AnySpec]:
    text = resources.files("sampler_service.policy").joinpath(DEFAULT_POLICIES).read_text("utf-8")
    return parse_policy_text(text, DEFAULT_POLICIES)


@dataclass(frozen=True)
class Entry:
    """A named policy or split in force, its version, and where it came from ("file" for the
    shipped and user policy files, "admin" for the admin API)."""

    spec: AnySpec
    version: PolicyVersion
    origin: str


@dataclass(frozen=True)
class Change:
    """What replacing the file policies changed, by name."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]


class PolicyRegistry:
    """Maps names to `Entry`s. Versions start at 1 and grow by one whenever a name's spec
    changes (an identical spec keeps its version). Splits must name existing policies."""

    def __init__(self, specs: Mapping[str, AnySpec] = ()):
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self.replace_file_policies(dict(specs))

    @classmethod
    def from_files(cls, path: str | Path | None = None, include_defaults: bool = True) -> "PolicyRegistry":
        return cls(file_policies(path, include_defaults))

    # -- changes ------------------------------------------------------------------------------
    def _versioned(self, spec: AnySpec, origin: str) -> Entry:
        old = self._entries.get(spec.name)
        digest = spec.content_hash()
        if old is not None and old.version.hash == digest:
            return Entry(spec, old.version, origin)
        return Entry(spec, PolicyVersion((old.version.number + 1) if old else 1, digest), origin)

    def _check_splits(self, entries: Mapping[str, Entry]) -> None:
        check_split_variants({name: entry.spec for name, entry in entries.items()})

    def put(self, spec: AnySpec, origin: str = "admin") -> PolicyVersion:
        """Adds or replaces one policy or split."""
        with self._lock:
            entries = dict(self._entries)
            entries[spec.name] = self._versioned(spec, origin)
            self._check_splits(entries)
            self._entries = entries
            return entries[spec.name].version

    def delete(self, name: str) -> None:
        """Removes a policy or split; FAILED_PRECONDITION while a split names it."""
        with self._lock:
            if name not in self._entries:
                raise NotFound(f"policy {name!r} does not exist", "name")
            users = sorted(k for k, v in self._entries.items() if isinstance(v.spec, SplitSpec)
                           and name in dict(v.spec.variants))
            if users:
                raise FailedPrecondition(f"split(s) {users} name policy {name!r}: change or delete "
                                         "them first", "name")
            self._entries = {k: v for k, v in self._entries.items() if k != name}

    def replace_file_policies(self, specs: Mapping[str, AnySpec]) -> Change:
        """Makes `specs` the policies that come from files: new names are added, changed ones
        get a new version, file policies no longer listed are removed; policies put by the
        admin API that `specs` does not name stay. All or nothing."""
        with self._lock:
            entries = {k: v for k, v in self._entries.items() if v.origin == "admin" or k in specs}
            before = dict(self._entries)
            for spec in specs.values():
                entries[spec.name] = self._versioned(spec, "file")
            self._check_splits(entries)
            self._entries = entries
            return Change(
                added=tuple(sorted(set(entries) - set(before))),
                changed=tuple(sorted(k for k in entries if k in before
                                     and entries[k].version != before[k].version)),
                removed=tuple(sorted(set(before) - set(entries))))

    # -- reads --------------------------------------------------------------------------------
    def entry(self, name: str, field: str = "policy") -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"policy {name!r} does not exist; known: {', '.join(self.names())}",
                           field)
        return entry

    def get(self, name: str, field: str = "policy",
            sequence_id: str = "") -> tuple[PolicySpec, PolicyVersion, str]:
        """The policy `name` stands for and its version, and the split's name when `name` is a
        split (its variant for `sequence_id` is returned)."""
        entries = self._entries  # one snapshot: a concurrent change cannot mix two versions
        entry = entries.get(name) or self.entry(name, field)
        if isinstance(entry.spec, SplitSpec):
            variant = entries[entry.spec.assign(sequence_id)]
            return variant.spec, variant.version, name  # type: ignore[return-value]
        return entry.spec, entry.version, ""  # type: ignore[return-value]

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)


def check_split_variants(specs: Mapping[str, AnySpec]) -> None:
    """Every split's variants must be policies (not splits) among `specs`."""
    for name, spec in specs.items():
        if isinstance(spec, SplitSpec):
            for variant, _ in spec.variants:
                target = specs.get(variant)
                if target is None or isinstance(target, SplitSpec):
                    raise InvalidArgument(
                        f"split {name!r}: variant {variant!r} is not a policy"
                        + ("" if target is None else " (a split cannot contain a split)"),
                        f"policies.{name}.split.{variant}")


def file_policies(path: str | Path | None, include_defaults: bool = True) -> dict[str, AnySpec]:
    """The shipped policies (unless excluded) and those of `path`: one YAML file, or a
    directory whose *.yaml / *.yml files are read in name order (a Kubernetes ConfigMap
    mount); a later definition of a name replaces an earlier one."""
    specs = shipped_policies() if include_defaults else {}
    for file in policy_files(path):
        specs.update(_load_named(file))
    return specs


def _load_named(file: Path) -> dict[str, AnySpec]:
    """`load_policy_file`, any unexpected error turned into InvalidArgument naming the file
    (the original is its `__cause__`)."""
    try:
        return load_policy_file(file)
    except (SamplerServiceError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a file's content made the parser raise
        raise InvalidArgument(f"{file}: cannot be loaded: {type(exc).__name__}: {exc}",
                              "policies") from exc


def policy_files(path: str | Path | None) -> list[Path]:
    """The policy files `path` names (see `file_policies`); dot-files (a ConfigMap's `..data`
    machinery) are skipped."""
    if path is None:
        return []
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
    return [path]
