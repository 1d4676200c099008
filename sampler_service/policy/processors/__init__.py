"""Built-in processors, found by spec key in the family modules below (a file per family).

`CANONICAL_ORDER` is the chain flat (vLLM-named) request parameters build, in vLLM v1's order.
"""
from __future__ import annotations

import inspect

from sampler_service.policy.processors import (adaptive, constraints, penalties, structured,
                                               temperature, truncation)
from sampler_service.policy.processors.base import Processor, RowBatch, Selector, Stage
from sampler_service.policy.processors.constraints import (AllowedTokenIds, BadWords, LogitBias,
                                                           MinTokens)
from sampler_service.policy.processors.penalties import (FrequencyPenalty, PresencePenalty,
                                                         RepetitionPenalty)
from sampler_service.policy.processors.structured import Structured
from sampler_service.policy.processors.temperature import Temperature
from sampler_service.policy.processors.truncation import MinP, TopK, TopP

FAMILIES = (adaptive, constraints, penalties, structured, temperature, truncation)


def defined_stages(modules, base: type) -> dict[str, type]:
    """Concrete subclasses of `base` defined in `modules`, by spec key."""
    return {cls.key: cls for module in modules for cls in vars(module).values()
            if isinstance(cls, type) and issubclass(cls, base) and not inspect.isabstract(cls)
            and cls.__module__ == module.__name__}


#: The chain that flat (vLLM-named) parameters build, in vLLM v1's order of operations (the
#: structured-output bitmask first, as vLLM applies it before the sampling parameters).
CANONICAL_ORDER: tuple[type[Processor], ...] = (
    Structured, AllowedTokenIds, BadWords, MinTokens, LogitBias, RepetitionPenalty, FrequencyPenalty,
    PresencePenalty, Temperature, MinP, TopK, TopP,
)

PROCESSORS: dict[str, type[Processor]] = defined_stages(FAMILIES, Processor)

__all__ = ["CANONICAL_ORDER", "PROCESSORS", "Processor", "RowBatch", "Selector", "Stage",
           "defined_stages"]
