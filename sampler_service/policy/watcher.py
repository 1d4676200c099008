"""Hot reload: watch the policy file (or directory) and swap in a changed one atomically.

The watcher polls, every `interval_s`, a fingerprint of the policy files' names and contents.
Reading through symlinks makes it see a Kubernetes ConfigMap update, which atomically
re-points the mount's `..data` symlink to a new directory (the files themselves are symlinks
into it). Polling content rather than watching inotify events is what works across that swap,
on every filesystem. A `subPath` mount is a copy made at pod start and never updates: mount
the whole ConfigMap directory instead.

A changed file is parsed and validated completely off to the side; only a valid one replaces
the file policies (`PolicyRegistry.replace_file_policies`), all at once. An invalid one is
rejected as a whole: the old policies keep serving, the error is logged and reported through
`on_reload`, and the watcher tries again when the content changes again. Running sequences
keep the version they pinned (or move at their next step when their policy says
`follow_latest: true`).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable

from sampler_service.errors import SamplerServiceError
from sampler_service.policy.registry import Change, PolicyRegistry, file_policies, policy_files

log = logging.getLogger(__name__)


def fingerprint(path: str | Path) -> str:
    """A digest of the policy files' names and contents (through symlinks); a missing or
    unreadable path gives a digest of the error, so its appearance counts as a change."""
    digest = hashlib.sha256()
    try:
        for file in policy_files(path):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    except OSError as exc:
        digest.update(f"unreadable: {exc}".encode())
    return digest.hexdigest()


class PolicyWatcher:
    """Reloads `registry`'s file policies from `path` when its content changes.

    `on_reload(change, error)` is called after every attempt: with the `Change` on success, or
    with the error message on failure (for metrics)."""

    def __init__(self, registry: PolicyRegistry, path: str | Path, include_defaults: bool = True,
                 interval_s: float = 2.0,
                 on_reload: Callable[[Change | None, str | None], None] | None = None):
        self.registry = registry
        self.path = Path(path)
        self.include_defaults = include_defaults
        self.interval_s = interval_s
        self.on_reload = on_reload
        self._seen = fingerprint(self.path)  # the registry was built from this content
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> Change | None:
        """Reloads if the content changed since the last attempt; returns the change, or None
        when nothing changed or the new content was rejected."""
        seen = fingerprint(self.path)
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            change = self.registry.replace_file_policies(
                file_policies(self.path, self.include_defaults))
        except (SamplerServiceError, OSError) as exc:
            field = getattr(exc, "field", None)
            message = f"{exc}" + (f" (at {field})" if field else "")
            log.error("policy reload from %s rejected, the old policies keep serving: %s",
                      self.path, message)
            self._report(None, message)
            return None
        log.info("policies reloaded from %s: added %s, changed %s, removed %s", self.path,
                 list(change.added), list(change.changed), list(change.removed))
        self._report(change, None)
        return change

    def _report(self, change: Change | None, error: str | None) -> None:
        if self.on_reload is not None:
            self.on_reload(change, error)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policy-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
