"""Built-in selectors, by spec key."""
from __future__ import annotations

from sampler_service.policy.processors.base import Selector
from sampler_service.policy.selectors.greedy import Greedy
from sampler_service.policy.selectors.sample import Sample

SELECTORS: dict[str, type[Selector]] = {cls.key: cls for cls in (Greedy, Sample)}

__all__ = ["SELECTORS", "Selector"]
