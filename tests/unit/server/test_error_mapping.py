"""sampler_service.server.error_mapping: every error leaves clipped, an unexpected one as
INTERNAL."""
from __future__ import annotations

from sampler_service.errors import MAX_MESSAGE_BYTES, AlreadyExists
from sampler_service.server.error_mapping import as_service_error


def test_a_domain_error_leaves_clipped():
    error = AlreadyExists("sequence '" + "y" * 100_000 + "' already exists",
                          "sequences[0].sequence_id")
    sent = as_service_error(error)
    assert type(sent) is AlreadyExists and sent.field == "sequences[0].sequence_id"
    assert len(sent.message.encode()) <= MAX_MESSAGE_BYTES
    assert sent.message.endswith("already exists")


def test_an_unexpected_error_is_internal_and_clipped(caplog):
    sent = as_service_error(ValueError("v" * 100_000))
    assert sent.code == "INTERNAL" and len(sent.message.encode()) <= MAX_MESSAGE_BYTES
    assert sent.message.startswith("internal error: ValueError: vvv")
    assert "unexpected error" in caplog.text
