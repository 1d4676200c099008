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

Files are read within bounds (`sampler_service.policy.files`): at most 1 MiB each (checked
before reading; a larger file is watched by its size and modification time, never read),
UTF-8, and what YAML aliases may repeat is bounded. Whatever goes wrong in a reload (a file
over the cap, bytes that are not UTF-8, an alias bomb, an unexpected error) rejects that
reload alone: it is logged with the file and counted in
`sampler_policy_reloads_total{result="error"}`, `sampler_policy_reload_failing` is 1 until a
reload succeeds, health stays SERVING on the old policies, and the watcher goes on to pick up
the next change.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import yaml

from sampler_service.errors import SamplerServiceError
from sampler_service.policy.files import content_stamp
from sampler_service.policy.registry import Change, PolicyRegistry, file_policies, policy_files

log = logging.getLogger(__name__)

#: Longest error message a failed reload logs and reports.
MAX_ERROR_CHARS = 2000

#: Errors that reject a file's content or access: logged without a traceback.
_REJECTIONS = (SamplerServiceError, OSError)
#: What a rejection may wrap (a parse or decoding error) and still need no traceback.
_PARSE_ERRORS = (SamplerServiceError, OSError, ValueError, RecursionError, yaml.YAMLError)


def fingerprint(path: str | Path) -> str:
    """A digest of the policy files' names and contents (through symlinks; a file over the
    size cap by its size and modification time, unread); a missing or unreadable path gives a
    digest of the error, so its appearance counts as a change."""
    digest = hashlib.sha256()
    try:
        for file in policy_files(path):
            digest.update(os.fsencode(file.name) + b"\0" + content_stamp(file) + b"\0")
    except OSError as exc:
        digest.update(f"unreadable: {exc}".encode(errors="backslashreplace"))
    return digest.hexdigest()


def _describe(exc: BaseException) -> str:
    """A reload error in one line: a domain error's message and field; anything else with its
    type. Cut to MAX_ERROR_CHARS."""
    if isinstance(exc, _REJECTIONS):
        field = getattr(exc, "field", None)
        message = f"{exc}" + (f" (at {field})" if field else "")
    else:
        message = f"{type(exc).__name__}: {exc}"
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."


def _unexpected(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is not a plain rejection, so its traceback is logged."""
    return not isinstance(exc, _REJECTIONS) or (
        exc.__cause__ is not None and not isinstance(exc.__cause__, _PARSE_ERRORS))


class PolicyWatcher:
    """Reloads `registry`'s file policies from `path` when its content changes.

    `on_reload(change, error)` is called after every attempt: with the `Change` on success, or
    with the error message on failure (for metrics). No error stops the watcher: a failed
    attempt (whatever it raised, `on_reload` included) is logged, and the next change is
    tried again."""

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
        when nothing changed or the new content was rejected. Never raises."""
        try:
            seen = fingerprint(self.path)
            if seen == self._seen:
                return None
            self._seen = seen  # a rejected content is not tried again until it changes
            change = self.registry.replace_file_policies(
                file_policies(self.path, self.include_defaults))
        except Exception as exc:  # noqa: BLE001 - one bad reload must not end the watcher
            message = _describe(exc)
            log.error("policy reload from %s rejected, the old policies keep serving: %s",
                      self.path, message, exc_info=exc if _unexpected(exc) else None,
                      extra={"event": "reload", "result": "error", "path": str(self.path),
                             "reason": message})
            self._report(None, message)
            return None
        log.info("policies reloaded from %s: added %s, changed %s, removed %s", self.path,
                 list(change.added), list(change.changed), list(change.removed),
                 extra={"event": "reload", "result": "ok", "path": str(self.path),
                        "added": list(change.added), "changed": list(change.changed),
                        "removed": list(change.removed)})
        self._report(change, None)
        return change

    def _report(self, change: Change | None, error: str | None) -> None:
        if self.on_reload is not None:
            try:
                self.on_reload(change, error)
            except Exception:  # noqa: BLE001 - a failing observer must not end the watcher
                log.exception("policy reload observer failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policy-watcher", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the watcher's thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - check() does not raise; this is the last guard
                log.exception("policy watcher: unexpected error checking %s", self.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
