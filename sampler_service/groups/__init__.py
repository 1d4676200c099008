"""Groups: sequences that send several rows per step (beam search, forks, CoT decoding).

See `base` for the contract every group follows; one module per kind."""
from sampler_service.groups.base import (AnswerVote, Group, GroupRecord, GroupResult, GroupStep,
                                         Hypothesis)

__all__ = ["AnswerVote", "Group", "GroupRecord", "GroupResult", "GroupStep", "Hypothesis"]
