"""Built-in processors, by spec key. `CANONICAL_ORDER` is vLLM v1's order for flat parameters."""
from __future__ import annotations

from sampler_service.policy.processors.base import Processor, RowBatch, Selector, Stage
from sampler_service.policy.processors.constraints import MinTokens
from sampler_service.policy.processors.penalties import (FrequencyPenalty, PresencePenalty,
                                                         RepetitionPenalty)
from sampler_service.policy.processors.temperature import Temperature
from sampler_service.policy.processors.truncation import MinP, TopK, TopP

#: The chain that flat (vLLM-named) parameters build, in vLLM v1's order of operations.
CANONICAL_ORDER: tuple[type[Processor], ...] = (
    MinTokens, RepetitionPenalty, FrequencyPenalty, PresencePenalty, Temperature, MinP, TopK, TopP,
)

PROCESSORS: dict[str, type[Processor]] = {cls.key: cls for cls in CANONICAL_ORDER}

__all__ = ["CANONICAL_ORDER", "PROCESSORS", "Processor", "RowBatch", "Selector", "Stage"]
