"""Built-in selectors, found by spec key in the modules below."""
from __future__ import annotations

from sampler_service.policy.processors import defined_stages
from sampler_service.policy.processors.base import Selector
from sampler_service.policy.selectors import greedy, mirostat, sample

SELECTORS: dict[str, type[Selector]] = defined_stages((greedy, mirostat, sample), Selector)

__all__ = ["SELECTORS", "Selector"]
