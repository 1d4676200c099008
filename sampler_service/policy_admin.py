"""Policy administration without its transport: list, show, put, delete and validate the
policies in force, with how many live sequences pin each (the PolicyAdmin gRPC service and
the `sampler-service policies` CLI sit on top).

Deleting a policy that live sequences pin is refused unless forced: a forced delete leaves
those sequences running on their pinned version (they never needed the registry again), and
only stops new sequences from using the name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sampler_service.errors import FailedPrecondition, InvalidArgument
from sampler_service.policy.registry import (AnySpec, Entry, PolicyRegistry,
                                             check_split_variants, parse_entry, parse_policy_text)
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.splits import SplitSpec
from sampler_service.state import SequenceStore


@dataclass(frozen=True)
class PolicyView:
    """One policy or split as the admin API shows it."""

    name: str
    kind: str                      # "policy" or "split"
    spec: Mapping[str, Any]        # as written
    version: PolicyVersion
    origin: str                    # "file" or "admin"
    live_sequences: int            # live sequences and groups that pinned this name


class PolicyAdministration:
    def __init__(self, registry: PolicyRegistry, store: SequenceStore):
        self.registry = registry
        self.store = store

    def _pins(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.store.snapshot():
            policy = (entry.root if hasattr(entry, "root") else entry).policy
            for name in {policy.name, policy.split} - {""}:
                counts[name] = counts.get(name, 0) + 1
        return counts

    @staticmethod
    def _view(name: str, entry: Entry, pins: Mapping[str, int]) -> PolicyView:
        return PolicyView(name, "split" if isinstance(entry.spec, SplitSpec) else "policy",
                          dict(entry.spec.source), entry.version, entry.origin, pins.get(name, 0))

    def list(self) -> list[PolicyView]:
        pins = self._pins()
        return [self._view(name, entry, pins) for name, entry in sorted(self.registry.entries().items())]

    def get(self, name: str) -> PolicyView:
        return self._view(name, self.registry.entry(name, "name"), self._pins())

    def put(self, name: str, spec: Any) -> PolicyVersion:
        """Validates `spec` (a policy or split, as in a policy file) and puts it under `name`."""
        if not name:
            raise InvalidArgument("a policy needs a name", "name")
        return self.registry.put(parse_entry(name, spec, "spec"))

    def delete(self, name: str, force: bool = False) -> None:
        pinned = self._pins().get(name, 0)
        self.registry.entry(name, "name")
        if pinned and not force:
            raise FailedPrecondition(f"{pinned} live sequence(s) pin policy {name!r}; release them "
                                     "or delete with force (they keep running on their version)",
                                     "force")
        self.registry.delete(name)

    def validate(self, document: str | None = None, name: str = "",
                 spec: Any = None) -> list[AnySpec]:
        """Validates a whole YAML policy document, or one named spec, without changing
        anything; returns what it defines or raises InvalidArgument naming the field."""
        parsed = (parse_policy_text(document, "document") if document is not None
                  else {name or "unnamed": parse_entry(name or "unnamed", spec, "spec")})
        known = {k: e.spec for k, e in self.registry.entries().items()}
        check_split_variants({**known, **parsed})
        return list(parsed.values())
