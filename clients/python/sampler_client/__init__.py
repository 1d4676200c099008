"""Python SDK of Sampler Sidecar: create sequences, step them with logits, preview policies.

Logits travel inline, through shared memory or CUDA IPC, in full or as sparse top-K rows
(`SamplerClient(transport=..., sparse_top_k=...)`; its docstring's section Transports).
`sampler_client.hf` (needs torch and transformers) drives a Hugging Face model through it.
`PolicyAdminClient` lists, puts and deletes the service's policies (with its admin token).
"""
from sampler_client.admin import PolicyAdminClient, PolicyInfo, PolicyVersion
from sampler_client.aio import (AsyncSamplerClient, AsyncSequence, AsyncSequenceGroup,
                                AsyncStepStream)
from sampler_client.client import SamplerClient, Sequence, SequenceGroup, StepStream, TLSConfig
from sampler_client.errors import (AlreadyExistsError, FailedPreconditionError, FieldViolation,
                                   InvalidArgumentError, MessageTooLargeError, NotFoundError,
                                   PermissionDeniedError, ResourceExhaustedError, SamplerError,
                                   UnauthenticatedError, UnavailableError)
from sampler_client.types import (AnswerVote, Choice, GroupInfo, GroupResult, Hypothesis,
                                  RegionInfo, SequenceInfo)

__all__ = [
    "AlreadyExistsError", "AnswerVote", "AsyncSamplerClient", "AsyncSequence",
    "AsyncSequenceGroup", "AsyncStepStream", "Choice", "FailedPreconditionError", "FieldViolation",
    "GroupInfo", "GroupResult", "Hypothesis", "InvalidArgumentError", "MessageTooLargeError",
    "NotFoundError", "PermissionDeniedError", "PolicyAdminClient", "PolicyInfo", "PolicyVersion",
    "RegionInfo",
    "ResourceExhaustedError", "SamplerClient", "SamplerError", "Sequence", "SequenceGroup",
    "SequenceInfo", "StepStream", "TLSConfig", "UnauthenticatedError", "UnavailableError",
]
