"""sampler_service.policy.spec: a NaN or ±inf anywhere in a spec is refused naming where it
stands; what a message repeats of a spec is bounded."""
from __future__ import annotations

import math

import pytest

from sampler_service.errors import InvalidArgument
from sampler_service.policy.spec import check_finite, parse_policy, resolve_flat


def refusal(spec) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        parse_policy("p", spec)
    return err.value


@pytest.mark.parametrize("spec, field", [
    ({"chain": [{"top_p": {"p": math.nan}}], "select": "sample"}, "spec.chain[0].top_p.p"),
    ({"chain": [{"top_k": {"k": 3}}, {"min_p": {"p": math.inf}}], "select": "sample"},
     "spec.chain[1].min_p.p"),
    ({"chain": [{"logit_bias": {"bias": {"7": -math.inf}}}], "select": "sample"},
     "spec.chain[0].logit_bias.bias[7]"),
    ({"chain": [], "select": {"mirostat": {"tau": math.nan}}}, "spec.select.mirostat.tau"),
    ({"chain": [], "select": "sample", "defaults": {"seed": math.inf}}, "spec.defaults.seed"),
])
def test_non_finite_parameters_are_refused_with_their_path(spec, field):
    error = refusal(spec)
    assert error.field == field and "finite" in error.message


def test_check_finite_names_the_first_non_finite_number_anywhere():
    check_finite({"a": [1.0, {"b": "x"}], "c": None}, "spec")
    with pytest.raises(InvalidArgument) as err:
        check_finite({"a": [1.0, {"b": [2.0, math.nan]}], "c": math.inf}, "spec")
    assert err.value.field == "spec.a[1].b[1]" and "got nan" in err.value.message


def test_flat_parameters_must_be_finite():
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"temperature": math.inf})
    assert err.value.field == "params.temperature"


def test_a_spec_echoes_long_names_bounded():
    error = refusal({"chain": [{"q" * 50_000: {}}], "select": "sample"})
    assert error.field == "spec.chain[0]" and f"'{'q' * 64}'…(50000 chars)" in error.message
    error = refusal({"k" * 50_000: 1, "select": "sample"})
    assert error.field == "spec." + "k" * 32 + "…" and len(error.message) < 200
    error = refusal({"chain": "c" * 50_000, "select": "sample"})
    assert len(error.message) < 200
    with pytest.raises(InvalidArgument) as err:
        parse_policy("n" * 50_000, ["not", "a", "mapping"])
    assert len(err.value.message) < 200
