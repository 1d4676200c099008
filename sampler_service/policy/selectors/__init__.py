"""Built-in selectors, found by spec key: one token per row (greedy, sample, mirostat), or a
group of rows (beam search, CoT decoding; see `sampler_service.groups`)."""
from __future__ import annotations

from sampler_service.groups import beam, cot
from sampler_service.policy.processors import defined_stages
from sampler_service.policy.processors.base import GroupSelector, Selector, Stage
from sampler_service.policy.selectors import entropix, greedy, mirostat, sample

SELECTORS: dict[str, type[Stage]] = {**defined_stages((entropix, greedy, mirostat, sample), Selector),
                                     **defined_stages((beam, cot), GroupSelector)}

__all__ = ["SELECTORS", "GroupSelector", "Selector"]
