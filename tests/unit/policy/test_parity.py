"""sampler_service.policy.parity: the table of the peers' parameters covers every field of the
wire's SamplingParams, and every entry it points to exists."""
from __future__ import annotations

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.policy import parity
from sampler_service.docgen import _parity_section
from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.selectors import SELECTORS
from sampler_service.policy.spec import FLAT_NAMES

STAGES = {**PROCESSORS, **SELECTORS}


def test_every_sampling_params_field_is_in_the_table():
    ours = {row.ours for row in parity.ROWS}
    missing = [f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.name not in ours]
    assert not missing, f"SamplingParams fields with no row in parity.ROWS: {missing}"


def test_every_entry_names_a_flat_parameter_a_stage_or_a_stage_parameter():
    for row in parity.ROWS:
        assert row.peer in parity.PEERS, row
        assert row.field, row
        if not row.ours:
            assert row.note, f"{row.field}: a parameter not taken must say why"
            continue
        if row.ours in FLAT_NAMES or row.ours in STAGES:
            continue
        key, _, name = row.ours.partition(".")
        assert key in STAGES, f"{row.field}: {row.ours!r} is no flat parameter or stage"
        assert name in {p.name for p in STAGES[key].params}, \
            f"{row.field}: stage {key!r} has no parameter {name!r}"


def test_each_peer_lists_a_field_once():
    seen = [(row.peer, row.field) for row in parity.ROWS]
    assert len(seen) == len(set(seen))


def test_every_flat_parameter_a_peer_names_alike_maps_to_itself():
    """Where a peer's field has our flat name (vLLM's, mostly), it is taken by that name."""
    for row in parity.ROWS:
        if row.field in FLAT_NAMES and row.ours:
            assert row.ours == row.field or "." in row.ours or row.ours in STAGES, row


def test_the_table_is_in_the_generated_docs():
    """(`make check-docs` checks that docs/policies.md is what docgen writes.)"""
    text = "\n".join(_parity_section())
    assert "## Parity: the peers' parameters" in text
    for peer in parity.PEERS:
        assert f"### {peer}" in text
    assert "| `top_logprobs` | `top_logprobs` |" in text
