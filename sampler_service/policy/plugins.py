"""Plug-in processors and selectors from installed Python packages.

Contract: a distribution declares entry points in the group `sampler_service.processors`, each
loading one stage class, a concrete subclass of `Processor` or `Selector`
(`sampler_service.policy.processors.base`) constructible without arguments, whose spec `key`
is the entry point's name (snake_case) and whose `params` is a tuple of `Param`:

    [project.entry-points."sampler_service.processors"]
    logit_softcap = "sampler_plugin_example:LogitSoftcap"

`load_plugins()` runs when the server starts, before the policies are parsed (a policy may
name a plug-in stage), and registers each class in `PROCESSORS` or `SELECTORS`, where
policies find it exactly like a built-in. Every entry point is checked before any is
registered; if one fails to import, is not such a class, or takes a key a built-in or another
plug-in has, each bad one is logged and the start fails with one `PluginError` naming them
all: a policy may depend on the plug-in, and serving without it would change its tokens.

A stage that explains categorical decisions (text or true/false fields of `batch.explain`)
declares their values in `decisions` (field -> allowed values) to have them counted in
`sampler_decisions_total`; anything undeclared is counted as decision="other", so a plug-in
cannot create unbounded metric series.

Only installed packages are loaded, and only at start-up: nothing is ever loaded because of a
client request (no code over the wire). A policy, inline or put through the admin API, can
only name stages registered here. `docs/policies.md` documents the built-ins only: `make
docs` runs `docgen` in a process that never loads plug-ins.
"""
from __future__ import annotations

import inspect
import logging
import re
from importlib.metadata import EntryPoint, entry_points
from typing import Iterable

from sampler_service.policy.params import Param
from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.processors.base import PLUGIN_KEYS, Processor, Selector, Stage
from sampler_service.policy.selectors import SELECTORS

log = logging.getLogger(__name__)

GROUP = "sampler_service.processors"
#: What a processor's `role` may be (see `Processor`).
ROLES = ("filter", "transform", "constraint", "monitor")
KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]*")

#: The plug-in stages registered in this process, by key.
PLUGINS: dict[str, type[Stage]] = {}


class PluginError(ValueError):
    """One or more plug-in entry points cannot be used; the message names each of them."""


def load_plugins(found: Iterable[EntryPoint] | None = None) -> dict[str, type[Stage]]:
    """Registers the stages of `found` (default: the installed entry points of `GROUP`) and
    returns them by key. All or nothing: raises PluginError, registering none, if any entry
    point is unusable. Loading the same entry points again changes nothing."""
    found = list(entry_points(group=GROUP) if found is None else found)
    stages: dict[str, type[Stage]] = {}
    problems = []
    for point in found:
        try:
            stage = _stage_of(point)
            _check_key(point, stage, stages)
        except PluginError as exc:
            log.error("%s", exc)
            problems.append(str(exc))
            continue
        stages[stage.key] = stage
    if problems:
        raise PluginError(f"cannot start with the installed plug-ins ({len(problems)} unusable "
                          "entry points): " + "; ".join(problems))
    for key, stage in stages.items():
        if key not in PLUGINS:
            (PROCESSORS if issubclass(stage, Processor) else SELECTORS)[key] = stage
            PLUGINS[key] = stage
            PLUGIN_KEYS.add(key)
            log.info("plug-in %s %r loaded from %s", _kind(stage), key, _origin(stage))
    return stages


def _describe(point: EntryPoint) -> str:
    return f"entry point {point.name} = {point.value!r} (group {point.group})"


def _kind(stage: type[Stage]) -> str:
    return "processor" if issubclass(stage, Processor) else "selector"


def _origin(stage: type[Stage]) -> str:
    return f"{stage.__module__}.{stage.__qualname__}"


def _stage_of(point: EntryPoint) -> type[Stage]:
    """The entry point's class, checked against the contract in the module docstring."""
    where = _describe(point)
    try:
        stage = point.load()
    except Exception as exc:  # any import-time failure of third-party code is reported as such
        raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(stage, type) and issubclass(stage, (Processor, Selector))):
        raise PluginError(f"{where} loads {stage!r}, not a subclass of "
                          f"{Processor.__module__}.Processor or .Selector")
    if inspect.isabstract(stage):
        missing = ", ".join(sorted(stage.__abstractmethods__))
        raise PluginError(f"{where}: {_origin(stage)} is abstract (does not define {missing})")
    params = getattr(stage, "params", None)
    if not (isinstance(params, tuple) and all(isinstance(p, Param) for p in params)):
        raise PluginError(f"{where}: {_origin(stage)}.params must be a tuple of "
                          f"sampler_service.policy.params.Param, got {params!r}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise PluginError(f"{where}: {_origin(stage)}.params names a parameter twice: {names}")
    if issubclass(stage, Processor) and getattr(stage, "role", None) not in ROLES:
        raise PluginError(f"{where}: {_origin(stage)}.role must be one of {', '.join(ROLES)}, "
                          f"got {getattr(stage, 'role', None)!r}")
    try:
        stage()
    except Exception as exc:  # a policy instantiates its stages on every resolve
        failure = f"{type(exc).__name__}: {exc}"
        raise PluginError(f"{where}: {_origin(stage)}() failed: {failure}") from exc
    return stage


def _check_key(point: EntryPoint, stage: type[Stage], taken: dict[str, type[Stage]]) -> None:
    """The class's key must be the entry point's name, and no other stage may have it."""
    where = _describe(point)
    key = getattr(stage, "key", None)
    if key != point.name:
        raise PluginError(f"{where}: {_origin(stage)}.key is {key!r}; it must be the entry "
                          f"point's name {point.name!r}")
    if not KEY_PATTERN.fullmatch(key):
        raise PluginError(f"{where}: key {key!r} must be snake_case ([a-z][a-z0-9_]*)")
    registered = PROCESSORS.get(key) or SELECTORS.get(key)
    if registered is not None and PLUGINS.get(key) is not stage:
        owner = "another plug-in" if key in PLUGINS else "a built-in"
        raise PluginError(f"{where}: key {key!r} clashes with {owner} "
                          f"{_kind(registered)} ({_origin(registered)})")
    if key in taken and taken[key] is not stage:
        raise PluginError(f"{where}: key {key!r} clashes with another plug-in "
                          f"({_origin(taken[key])})")
