"""Python SDK of Sampler Sidecar: create sequences, step them with logits, preview policies.

`sampler_client.hf` (needs torch and transformers) drives a Hugging Face model through it.
"""
from sampler_client.aio import AsyncSamplerClient, AsyncSequence, AsyncStepStream
from sampler_client.client import SamplerClient, Sequence, StepStream
from sampler_client.errors import (AlreadyExistsError, FailedPreconditionError, FieldViolation,
                                   InvalidArgumentError, NotFoundError, ResourceExhaustedError,
                                   SamplerError, UnavailableError)
from sampler_client.types import Choice, SequenceInfo

__all__ = [
    "AlreadyExistsError", "AsyncSamplerClient", "AsyncSequence", "AsyncStepStream", "Choice",
    "FailedPreconditionError", "FieldViolation", "InvalidArgumentError", "NotFoundError",
    "ResourceExhaustedError", "SamplerClient", "SamplerError", "Sequence", "SequenceInfo",
    "StepStream", "UnavailableError",
]
