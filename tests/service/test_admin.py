"""The PolicyAdmin API through the SDK: the admin token, list/get/put/delete/validate, and what
changes do (and do not do) to new and running sequences."""
from __future__ import annotations

import grpc
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from sampler_client import (FailedPreconditionError, InvalidArgumentError, NotFoundError,
                            PermissionDeniedError, PolicyAdminClient, SamplerClient, SamplerError,
                            UnauthenticatedError)
from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_proto.sampler.v1 import sampler_pb2_grpc

TOKEN = "s3cret-admin-token"
#: Argmax (every token allowed).
ARGMAX = {"chain": [{"temperature": {"temperature": 1.0}}], "select": "greedy"}
#: Always token 0.
ZERO = {"chain": [{"allowed_token_ids": {"ids": [0]}}], "select": "greedy"}
VOCAB = 50


@pytest.fixture
def admin_server(start_server):
    return start_server(admin_token=TOKEN)


@pytest.fixture
def admin(admin_server):
    with PolicyAdminClient(admin_server.address, token=TOKEN) as sdk:
        yield sdk


@pytest.fixture
def sampler(admin_server):
    with SamplerClient(admin_server.address) as sdk:
        yield sdk


def rows(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Logits rows whose argmax is never token 0."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        row = torch.randn(VOCAB, generator=generator)
        row[0] = row.min() - 1.0
        out.append(row)
    return out


ADMIN_CALLS = {
    "list": lambda a: a.list_policies(),
    "get": lambda a: a.get_policy("creative"),
    "put": lambda a: a.put_policy("sneaky", ARGMAX),
    "delete": lambda a: a.delete_policy("creative", force=True),
    "validate": lambda a: a.validate_policy(name="x", spec=ARGMAX),
}


@pytest.mark.parametrize("call", ADMIN_CALLS)
def test_admin_calls_without_the_token_are_unauthenticated_and_with_another_denied(
        admin_server, admin, call):
    with PolicyAdminClient(admin_server.address, token=None) as anonymous:
        with pytest.raises(UnauthenticatedError):
            ADMIN_CALLS[call](anonymous)
    with PolicyAdminClient(admin_server.address, token=TOKEN + "x") as intruder:
        with pytest.raises(PermissionDeniedError):
            ADMIN_CALLS[call](intruder)
    names = {p.name for p in admin.list_policies()}
    assert "creative" in names and "sneaky" not in names  # refused calls changed nothing


def test_a_token_that_is_not_a_bearer_token_is_unauthenticated(admin_server):
    with grpc.insecure_channel(admin_server.address) as channel:
        stub = sampler_pb2_grpc.PolicyAdminStub(channel)
        with pytest.raises(grpc.RpcError) as basic:
            stub.ListPolicies(pb.ListPoliciesRequest(), metadata=(("authorization", f"Basic {TOKEN}"),))
        assert basic.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = stub.ListPolicies(pb.ListPoliciesRequest(),
                                   metadata=(("authorization", f"bearer {TOKEN}"),))
        assert "creative" in {p.name for p in listed.policies}


def test_without_an_admin_token_the_service_is_not_served(server):
    with PolicyAdminClient(server.address, token=TOKEN) as admin:
        with pytest.raises(SamplerError) as refused:
            admin.list_policies()
    assert refused.value.code == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(server.address) as channel:
        assert "sampler.v1.PolicyAdmin" not in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_with_an_admin_token_reflection_lists_the_service(admin_server):
    with grpc.insecure_channel(admin_server.address) as channel:
        assert "sampler.v1.PolicyAdmin" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_an_empty_admin_token_is_refused_at_start(start_server):
    with pytest.raises(ValueError, match="empty"):
        start_server(admin_token="")


def test_sampling_needs_no_token(sampler):
    sequence = sampler.create_sequence(policy="greedy")
    assert sequence.step(torch.tensor([0.0, 2.0, 1.0])).token_id == 1
    assert sampler.preview(torch.tensor([0.0, 2.0, 1.0]), "greedy") == [(1, 1.0)]


def test_list_and_get_show_the_shipped_policies(admin):
    policies = {p.name: p for p in admin.list_policies()}
    assert {"greedy", "default", "creative", "edt"} <= set(policies)
    creative = admin.get_policy("creative")
    assert creative == policies["creative"]
    assert (creative.kind, creative.origin, creative.version.number, creative.live_sequences) == \
        ("policy", "file", 1, 0)
    assert creative.spec["select"] == "sample"
    assert [next(iter(stage)) for stage in creative.spec["chain"]] == \
        ["repetition_penalty", "temperature", "top_k", "top_p", "min_p"]
    with pytest.raises(NotFoundError) as missing:
        admin.get_policy("nope")
    assert missing.value.fields == ["name"]


def test_put_versions_grow_only_when_the_spec_changes(admin):
    first = admin.put_policy("mine", ARGMAX)
    assert first.number == 1
    assert admin.put_policy("mine", ARGMAX) == first
    second = admin.put_policy("mine", ZERO)
    assert (second.number, second.hash != first.hash) == (2, True)
    shown = admin.get_policy("mine")
    assert (shown.version, shown.origin, shown.spec) == (second, "admin", ZERO)
    assert admin.put_policy("mine", ARGMAX).number == 3  # back to the first spec: still a change


def test_put_invalid_spec_names_the_field_and_changes_nothing(admin):
    with pytest.raises(InvalidArgumentError) as bad:
        admin.put_policy("creative", {"chain": [{"top_p": {"p": 3}}], "select": "sample"})
    assert bad.value.fields == ["spec.chain[0].top_p.p"]
    assert admin.get_policy("creative").version.number == 1
    with pytest.raises(InvalidArgumentError) as unnamed:
        admin.put_policy("", ARGMAX)
    assert unnamed.value.fields == ["name"]


def test_a_put_policy_serves_new_sequences_while_running_ones_keep_their_version(admin, sampler):
    logits = rows(6)
    v1 = admin.put_policy("swap", ARGMAX)
    running = sampler.create_sequence(policy="swap", sequence_id="running")
    before = [running.step(row).token_id for row in logits[:3]]
    v2 = admin.put_policy("swap", ZERO)
    fresh = sampler.create_sequence(policy="swap", sequence_id="fresh")
    after = [running.step(row).token_id for row in logits[3:]]
    assert before + after == [int(row.argmax()) for row in logits]  # same logits, same tokens
    assert [fresh.step(row).token_id for row in logits[3:]] == [0, 0, 0]
    assert running.info().policy_version == tuple(v1)
    assert fresh.info().policy_version == tuple(v2)
    assert admin.get_policy("swap").live_sequences == 2


def test_delete_is_refused_while_pinned_and_forced_leaves_the_sequence_stepping(admin, sampler):
    logits = rows(4, seed=1)
    admin.put_policy("doomed", ARGMAX)
    pinned = sampler.create_sequence(policy="doomed")
    assert pinned.step(logits[0]).token_id == int(logits[0].argmax())
    with pytest.raises(FailedPreconditionError) as refused:
        admin.delete_policy("doomed")
    assert refused.value.fields == ["force"]
    assert admin.get_policy("doomed").live_sequences == 1
    deleted = admin.delete_policy("doomed", force=True)
    assert (deleted.name, deleted.version.number, deleted.live_sequences) == ("doomed", 1, 1)
    with pytest.raises(NotFoundError):
        admin.get_policy("doomed")
    with pytest.raises(NotFoundError):
        sampler.create_sequence(policy="doomed")
    assert [pinned.step(row).token_id for row in logits[1:]] == \
        [int(row.argmax()) for row in logits[1:]]
    with pytest.raises(NotFoundError) as again:
        admin.delete_policy("doomed")
    assert again.value.fields == ["name"]


def test_delete_unpinned_after_release(admin, sampler):
    admin.put_policy("brief", ARGMAX)
    sequence = sampler.create_sequence(policy="brief")
    sequence.release()
    assert admin.get_policy("brief").live_sequences == 0
    assert admin.delete_policy("brief").live_sequences == 0
    assert "brief" not in {p.name for p in admin.list_policies()}


def test_validate_a_document_or_a_spec_without_changing_anything(admin):
    document = ("policies:\n"
                "  precise: {chain: [temperature: {temperature: 0.2}], select: sample}\n"
                "  chat: {split: {precise: 0.5, creative: 0.5}}\n")
    assert admin.validate_policy(document=document) == ["precise", "chat"]
    assert admin.validate_policy(name="solo", spec=ARGMAX) == ["solo"]
    assert not {"precise", "chat", "solo"} & {p.name for p in admin.list_policies()}
    with pytest.raises(InvalidArgumentError) as bad_document:
        admin.validate_policy(document=document.replace("0.2}", "-1}"))
    assert bad_document.value.fields == ["policies.precise.chain[0].temperature.temperature"]
    with pytest.raises(InvalidArgumentError) as bad_spec:
        admin.validate_policy(name="solo", spec={"chain": [{"top_k": {"k": -2}}], "select": "sample"})
    assert bad_spec.value.fields == ["spec.chain[0].top_k.k"]
    with pytest.raises(InvalidArgumentError) as not_yaml:
        admin.validate_policy(document="policies: [")
    assert not_yaml.value.fields == ["policies"]


def test_validate_with_nothing_to_validate_names_the_document(admin_server):
    with grpc.insecure_channel(admin_server.address) as channel:
        stub = sampler_pb2_grpc.PolicyAdminStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            stub.ValidatePolicy(pb.ValidatePolicyRequest(),
                                metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "document" in empty.value.details()


def test_splits_put_through_the_admin_api(admin, sampler):
    with pytest.raises(InvalidArgumentError) as missing:
        admin.put_policy("ab", {"split": {"creative": 0.5, "missing": 0.5}})
    assert missing.value.fields[0].endswith("split.missing")
    with pytest.raises(NotFoundError):
        admin.get_policy("ab")
    admin.put_policy("zero", ZERO)
    version = admin.put_policy("ab", {"split": {"greedy": 0.5, "zero": 0.5}})
    shown = admin.get_policy("ab")
    assert (shown.kind, shown.version) == ("split", version)
    sequences = sampler.create_sequences([{"policy": "ab", "sequence_id": f"s{i}"} for i in range(40)])
    assert {s.info().policy for s in sequences} == {"greedy", "zero"}
    assert admin.get_policy("ab").live_sequences == 40
    with pytest.raises(FailedPreconditionError) as still_named:
        admin.delete_policy("zero", force=True)  # the split still names it
    assert "'ab'" in still_named.value.message
