"""The policy administration client: `PolicyAdminClient` (the service's PolicyAdmin API).

The server serves it only when started with an admin token; every call sends that token as
`authorization: Bearer <token>`. Failures raise the typed `SamplerError`s: UnauthenticatedError
(no token), PermissionDeniedError (another token), NotFoundError, FailedPreconditionError (a
pinned policy deleted without force), InvalidArgumentError (with the offending field).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import grpc
from google.protobuf import json_format

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_client.client import DEFAULT_MAX_MESSAGE_BYTES, ChannelClient, TLSConfig
from sampler_client.requests import spec_struct


class PolicyVersion(NamedTuple):
    """`number` grows by one on every change of a name's spec; `hash` digests the spec."""

    number: int
    hash: str


@dataclass(frozen=True)
class PolicyInfo:
    """A policy or split in force: `kind` is "policy" or "split", `spec` as written, `origin`
    "file" or "admin", `live_sequences` how many live sequences pin it."""

    name: str
    kind: str
    spec: dict[str, Any]
    version: PolicyVersion
    origin: str
    live_sequences: int

    @classmethod
    def from_pb(cls, p: pb.PolicyInfo) -> "PolicyInfo":
        return cls(p.name, p.kind, json_format.MessageToDict(p.spec),
                   PolicyVersion(p.version.number, p.version.hash), p.origin, p.live_sequences)


class PolicyAdminClient(ChannelClient):
    """Administers a sampler service's policies. Use as a context manager, or call `close()`.

    >>> with PolicyAdminClient("127.0.0.1:50051", token=os.environ["SAMPLER_ADMIN_TOKEN"]) as admin:
    ...     admin.put_policy("precise", {"chain": [{"temperature": {"temperature": 0.2}}],
    ...                                  "select": "sample"})
    """

    def __init__(self, target: str, *, token: str | None, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel: grpc.Channel | None = None, tls: TLSConfig | bool | None = None):
        super().__init__(target, sampler_pb2_grpc.PolicyAdminStub, timeout=timeout,
                         max_message_bytes=max_message_bytes, channel=channel, tls=tls,
                         metadata=() if token is None else (("authorization", f"Bearer {token}"),))

    def list_policies(self) -> list[PolicyInfo]:
        """Every policy and split in force, sorted by name."""
        response = self._call(self._stub.ListPolicies, pb.ListPoliciesRequest())
        return [PolicyInfo.from_pb(p) for p in response.policies]

    def get_policy(self, name: str) -> PolicyInfo:
        return PolicyInfo.from_pb(self._call(self._stub.GetPolicy, pb.GetPolicyRequest(name=name)))

    def put_policy(self, name: str, spec: Mapping[str, Any]) -> PolicyVersion:
        """Adds or replaces a policy (or a split, `{"split": {...}}`); returns its version
        (unchanged when `spec` equals the one in force)."""
        response = self._call(self._stub.PutPolicy,
                              pb.PutPolicyRequest(name=name, spec=spec_struct(spec)))
        return PolicyVersion(response.version.number, response.version.hash)

    def delete_policy(self, name: str, force: bool = False) -> PolicyInfo:
        """Deletes a policy; refused (FailedPreconditionError) while live sequences pin it
        unless `force`. Returns the policy as it was, with the sequences still running on it."""
        response = self._call(self._stub.DeletePolicy,
                              pb.DeletePolicyRequest(name=name, force=force))
        return PolicyInfo.from_pb(response.deleted)

    def validate_policy(self, document: str | None = None, name: str | None = None,
                        spec: Mapping[str, Any] | None = None) -> list[str]:
        """Validates a YAML policy document (text) or one named spec without changing
        anything; returns the names it defines, or raises InvalidArgumentError."""
        if (document is None) == (spec is None):
            raise ValueError("give either a document or a spec")
        request = (pb.ValidatePolicyRequest(document=document) if document is not None
                   else pb.ValidatePolicyRequest(name=name or "", spec=spec_struct(spec)))
        return list(self._call(self._stub.ValidatePolicy, request).names)
