"""Groups: sequences that send several rows per step (beam search, forks, CoT decoding).

See `base` for the contract every group follows; one module per kind. Importing this package
registers the group selectors (`beam`, `cot`) in the policy layer's `SELECTORS`, as plug-ins
register theirs: the policy layer never imports groups."""
from sampler_service.groups.base import (AnswerVote, Group, GroupRecord, GroupResult, GroupStep,
                                         Hypothesis)
from sampler_service.groups import beam, cot
from sampler_service.policy.processors import defined_stages
from sampler_service.policy.processors.base import GroupSelector
from sampler_service.policy.selectors import register_selectors

register_selectors(defined_stages((beam, cot), GroupSelector))

__all__ = ["AnswerVote", "Group", "GroupRecord", "GroupResult", "GroupStep", "Hypothesis"]
