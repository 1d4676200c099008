"""sampler_service.errors: what a message echoes is bounded (`echo`), and every error leaves
the edge `clipped` to what a status's trailers may carry."""
from __future__ import annotations

from sampler_service.errors import (MAX_FIELD_BYTES, MAX_MESSAGE_BYTES, InvalidArgument, NotFound,
                                    clip, echo)
from sampler_service.policy.sparse import NotExact, Refusal


def test_echo_keeps_short_values_and_the_start_of_long_ones():
    assert echo("abc") == "'abc'" and echo(3.5) == "3.5" and echo(float("nan")) == "nan"
    assert echo("x" * 100) == f"'{'x' * 64}'…(100 chars)"
    assert echo("é" * 65, limit=4) == "'éééé'…(65 chars)"
    listed = echo(list(range(10_000)))
    assert listed.startswith("[0, 1, 2") and len(listed) <= 65
    nested = echo({"a": ["b" * 10_000]})
    assert nested.startswith("{'a': ['bbb") and len(nested) <= 65


def test_clip_keeps_start_and_end_within_the_bytes():
    assert clip("short", 10) == "short"
    text = "head " + "é" * 5_000 + " tail"
    clipped = clip(text, 100)
    assert len(clipped.encode()) <= 100
    assert clipped.startswith("head ") and clipped.endswith(" tail")
    assert f"…({len(text)} chars)…" in clipped


def test_an_error_within_the_limits_is_sent_as_it_is():
    error = InvalidArgument("top_p = 2 is out of range", "params.top_p")
    assert error.clipped() is error


def test_a_long_error_is_clipped_to_a_copy_of_its_type():
    error = NotFound("sequence '" + "x" * 50_000 + "' does not exist", "f" * 1_000)
    clipped = error.clipped()
    assert type(clipped) is NotFound and clipped is not error and clipped.code == "NOT_FOUND"
    assert len(clipped.message.encode()) <= MAX_MESSAGE_BYTES and str(clipped) == clipped.message
    assert clipped.message.startswith("sequence 'xxx") and clipped.message.endswith("not exist")
    assert len(clipped.field.encode()) <= MAX_FIELD_BYTES
    assert [(len(f.encode()) <= MAX_FIELD_BYTES, len(d.encode()) <= MAX_MESSAGE_BYTES)
            for f, d in clipped.violations] == [(True, True)]
    assert len(error.message) > 50_000  # the original is left alone


def test_clipping_keeps_every_violation_and_the_errors_own_attributes():
    refusals = [Refusal(row, "x" * 2_000) for row in range(40)]
    error = NotExact.of(refusals)
    clipped = error.clipped()
    assert isinstance(clipped, NotExact) and clipped.refusals == error.refusals
    assert [f for f, _ in clipped.violations] == [f"rows[{row}]" for row in range(40)]
    assert all(len(d.encode()) <= MAX_MESSAGE_BYTES for _, d in clipped.violations)


def test_a_detached_error_drops_its_traceback_and_a_bug_keeps_it_as_a_note():
    from sampler_service.errors import NotFound, detached

    def fail(exc):
        try:
            raise exc
        except Exception as caught:
            return caught

    domain = detached(fail(NotFound("gone", "rows[0].sequence_id")))
    assert domain.__traceback__ is None and not getattr(domain, "__notes__", [])
    try:
        try:
            {}["key"]
        except KeyError as inner:
            raise RuntimeError("a bug") from inner
    except RuntimeError as caught:
        bug = detached(caught)
    assert bug.__traceback__ is None and bug.__cause__.__traceback__ is None
    assert "in test_a_detached_error" in bug.__notes__[0]
