"""The policies in force: the shipped defaults plus an optional user file, by name."""
from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from sampler_service.errors import InvalidArgument, NotFound
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import PolicySpec, parse_policy

DEFAULT_POLICIES = "default_policies.yaml"


def parse_policy_document(document: Any, source: str) -> dict[str, PolicySpec]:
    """`{policies: {name: spec}}` -> validated specs; raises InvalidArgument naming the field."""
    if not isinstance(document, dict) or not isinstance(document.get("policies"), dict):
        raise InvalidArgument(f"{source}: expected a top-level `policies:` mapping", "policies")
    extra = set(document) - {"policies"}
    if extra:
        raise InvalidArgument(f"{source}: unknown top-level keys {sorted(extra)}", sorted(extra)[0])
    return {name: parse_policy(name, raw, f"policies.{name}")
            for name, raw in document["policies"].items()}


def load_policy_file(path: str | Path) -> dict[str, PolicySpec]:
    """Reads and validates a YAML policy file."""
    text = Path(path).read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path}: not valid YAML: {exc}", "policies") from exc
    return parse_policy_document(document, str(path))


def shipped_policies() -> dict[str, PolicySpec]:
    text = resources.files("sampler_service.policy").joinpath(DEFAULT_POLICIES).read_text()
    return parse_policy_document(yaml.safe_load(text), DEFAULT_POLICIES)


class PolicyRegistry:
    """Maps policy names to (spec, version). Versions start at 1; `put` of a changed spec bumps
    the number. Sequences pin the resolved policy they were created with, so a later change
    never alters a running sequence."""

    def __init__(self, specs: Mapping[str, PolicySpec] = ()):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[PolicySpec, PolicyVersion]] = {}
        for spec in dict(specs).values():
            self.put(spec)

    @classmethod
    def from_files(cls, path: str | Path | None = None, include_defaults: bool = True) -> "PolicyRegistry":
        specs = shipped_policies() if include_defaults else {}
        if path is not None:
            specs.update(load_policy_file(path))
        return cls(specs)

    def put(self, spec: PolicySpec) -> PolicyVersion:
        with self._lock:
            old = self._entries.get(spec.name)
            digest = spec.content_hash()
            if old is not None and old[1].hash == digest:
                return old[1]
            version = PolicyVersion((old[1].number + 1) if old else 1, digest)
            self._entries[spec.name] = (spec, version)
            return version

    def get(self, name: str, field: str = "policy") -> tuple[PolicySpec, PolicyVersion]:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"policy {name!r} does not exist; known: {', '.join(self.names())}",
                           field)
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)
