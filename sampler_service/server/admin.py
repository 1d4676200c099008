"""The `sampler.v1.PolicyAdmin` servicer: bearer-token check, then `PolicyAdministration`.

Registered only when the server has an admin token. Every call must carry the metadata
`authorization: Bearer <token>`: none (or not a bearer token) is UNAUTHENTICATED, another
token PERMISSION_DENIED; the token is compared in constant time. Changes are logged with the
caller's address.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
from typing import Any, Sequence

from google.protobuf import struct_pb2

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc
from sampler_service.errors import InvalidArgument, PermissionDenied, Unauthenticated
from sampler_service.policy_admin import PolicyAdministration, PolicyView
from sampler_service.server.convert import dict_to_struct, struct_to_dict
from sampler_service.server.metrics import ServiceMetrics
from sampler_service.server.error_mapping import map_errors

log = logging.getLogger(__name__)

ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["PolicyAdmin"].full_name
_BEARER = "bearer "


def check_bearer(metadata: Sequence[tuple[str, str]], token: bytes) -> None:
    """Raises Unauthenticated unless `metadata` has one `authorization: Bearer <t>`, and
    PermissionDenied unless t is `token`."""
    values = [value for key, value in metadata if key == "authorization"]
    if len(values) != 1 or not values[0].lower().startswith(_BEARER) \
            or not values[0][len(_BEARER):].strip():
        raise Unauthenticated("PolicyAdmin calls need the metadata "
                              "`authorization: Bearer <admin token>`")
    if not hmac.compare_digest(values[0][len(_BEARER):].strip().encode(), token):
        raise PermissionDenied("the bearer token is not the admin token")


def _authorized(method):
    """Checks the caller's bearer token before the RPC runs."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        check_bearer(context.invocation_metadata(), self._token)
        return await method(self, request, context)
    return wrapper


def _struct(value: Any) -> struct_pb2.Struct:
    """A spec as written (YAML may have integer keys, e.g. a logit bias) as a Struct."""
    return dict_to_struct(json.loads(json.dumps(value, default=list)))


def policy_info_pb(view: PolicyView) -> pb.PolicyInfo:
    return pb.PolicyInfo(name=view.name, kind=view.kind, spec=_struct(view.spec),
                         version=pb.PolicyVersion(number=view.version.number,
                                                  hash=view.version.hash),
                         origin=view.origin, live_sequences=view.live_sequences)


class PolicyAdminServicer(sampler_pb2_grpc.PolicyAdminServicer):
    def __init__(self, admin: PolicyAdministration, token: str, metrics: ServiceMetrics):
        if not token:
            raise ValueError("the admin token must not be empty")
        self.admin = admin
        self.metrics = metrics
        self._token = token.encode()

    @map_errors
    @_authorized
    async def ListPolicies(self, request, context):
        return pb.ListPoliciesResponse(policies=[policy_info_pb(v) for v in self.admin.list()])

    @map_errors
    @_authorized
    async def GetPolicy(self, request, context):
        return policy_info_pb(self.admin.get(request.name))

    @map_errors
    @_authorized
    async def PutPolicy(self, request, context):
        version = self.admin.put(request.name, struct_to_dict(request.spec))
        log.info("PutPolicy %r from %s: version %d (%s)", request.name, context.peer(),
                 version.number, version.hash)
        return pb.PutPolicyResponse(name=request.name, version=pb.PolicyVersion(
            number=version.number, hash=version.hash))

    @map_errors
    @_authorized
    async def DeletePolicy(self, request, context):
        view = self.admin.get(request.name)
        self.admin.delete(request.name, request.force)
        log.info("DeletePolicy %r from %s (force=%s): %d live sequence(s) keep version %d",
                 request.name, context.peer(), request.force, view.live_sequences,
                 view.version.number)
        return pb.DeletePolicyResponse(deleted=policy_info_pb(view))

    @map_errors
    @_authorized
    async def ValidatePolicy(self, request, context):
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgument("set `document` (a YAML policy document) or `spec`", "document")
        if source == "document":  # parsing a (capped) document takes up to ~1 s: off the loop
            specs = await asyncio.to_thread(self.admin.validate, document=request.document)
        else:
            specs = self.admin.validate(name=request.name, spec=struct_to_dict(request.spec))
        return pb.ValidatePolicyResponse(names=[spec.name for spec in specs])
