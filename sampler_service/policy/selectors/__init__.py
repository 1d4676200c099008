"""Selectors, found by spec key: the built-in ones that choose one token per row (greedy,
sample, mirostat, entropix) and those registered from above: group selectors (beam search,
CoT decoding), which `sampler_service.groups` registers on import, and plug-ins
(`policy.plugins`). Code that parses policies imports `sampler_service.groups` first, as it
loads plug-ins first."""
from __future__ import annotations

from sampler_service.policy.processors import defined_stages
from sampler_service.policy.processors.base import GroupSelector, Selector, Stage
from sampler_service.policy.selectors import entropix, greedy, mirostat, sample

SELECTORS: dict[str, type[Stage]] = defined_stages((entropix, greedy, mirostat, sample), Selector)


def register_selectors(stages: dict[str, type[Stage]]) -> None:
    """Adds selectors defined above this layer (by key); a key taken by another class is a
    ValueError. Registering the same classes again changes nothing."""
    for key, stage in stages.items():
        if SELECTORS.get(key, stage) is not stage:
            raise ValueError(f"selector key {key!r} is taken by {SELECTORS[key].__qualname__}")
        SELECTORS[key] = stage


__all__ = ["SELECTORS", "GroupSelector", "Selector", "register_selectors"]
