"""sampler_service.policy.spec: a NaN or ±inf anywhere in a spec is refused naming where it
stands; what a message repeats of a spec is bounded."""
from __future__ import annotations

import math

import pytest

from sampler_service.errors import InvalidArgument
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import check_finite, parse_policy, resolve, resolve_flat


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


# -- top_logprobs: OpenAI's name for logprobs ---------------------------------------------------
def test_top_logprobs_alone_sets_logprobs():
    policy = resolve_flat({"top_logprobs": 5})
    assert policy.settings["logprobs"] == 5 and policy.settings["top_logprobs"] is None
    assert policy.spec()["defaults"]["logprobs"] == 5
    assert "top_logprobs" not in policy.spec()["defaults"]


def test_top_logprobs_and_logprobs_together_must_agree():
    assert resolve_flat({"top_logprobs": 3, "logprobs": 3}).settings["logprobs"] == 3
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"top_logprobs": 3, "logprobs": 2})
    assert err.value.field == "params.top_logprobs"
    assert "top_logprobs = 3 and logprobs = 2 disagree" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        parse_policy("p", {"select": "sample", "defaults": {"logprobs": 1, "top_logprobs": 4}})
    assert err.value.field == "spec.defaults.top_logprobs"
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"top_logprobs": 21})
    assert err.value.field == "params.top_logprobs" and "[0, 20]" in err.value.message


def test_a_request_top_logprobs_overrides_a_policys_logprobs():
    spec = parse_policy("p", {"select": "sample", "defaults": {"top_logprobs": 4}})
    assert spec.defaults["logprobs"] == 4 and spec.defaults["top_logprobs"] is None
    assert resolve(spec, PolicyVersion(1, "x"), {"top_logprobs": 2}).settings["logprobs"] == 2
    assert resolve(spec, PolicyVersion(1, "x"), {"logprobs": 1}).settings["logprobs"] == 1
    assert resolve(spec, PolicyVersion(1, "x"), {}).settings["logprobs"] == 4


def test_a_resolved_policy_with_top_logprobs_round_trips_through_its_spec():
    """What a snapshot keeps (`SavedPolicy.resolved`): the spec again, and the same settings."""
    policy = resolve_flat({"top_logprobs": 6, "ignore_eos": True, "top_p": 0.5,
                           "top_p_rule": "hf", "top_k": -1})
    again = resolve(parse_policy("", policy.spec()), policy.version, {})
    assert again.settings == policy.settings
    assert [l.values for l in again.links] == [l.values for l in policy.links]


# -- inline specs: every sequence setting from the request --------------------------------------
def test_an_inline_spec_takes_every_setting_from_the_request():
    spec = parse_policy("inline", {"chain": [{"top_p": {"p": 0.9}}], "select": "sample"})
    settings = {"seed": 2 ** 64 - 1, "max_tokens": 7, "stop_token_ids": [3], "ignore_eos": True,
                "top_logprobs": 2}
    policy = resolve(spec, PolicyVersion(0, "x"), settings, inline=True)
    assert policy.settings["seed"] == 2 ** 64 - 1 and policy.settings["max_tokens"] == 7
    assert policy.settings["stop_token_ids"] == (3,) and policy.settings["logprobs"] == 2
    with pytest.raises(InvalidArgument) as err:  # a named policy still needs `overridable`
        resolve(spec, PolicyVersion(0, "x"), {"seed": 1})
    assert err.value.field == "params.seed" and "overridable" in err.value.message
    with pytest.raises(InvalidArgument) as err:  # processor parameters still need it
        resolve(spec, PolicyVersion(0, "x"), {"top_p": 0.5}, inline=True)
    assert err.value.field == "params.top_p"
    with pytest.raises(InvalidArgument) as err:  # the same validation
        resolve(spec, PolicyVersion(0, "x"), {"max_tokens": -1}, inline=True)
    assert err.value.field == "params.max_tokens"


def test_a_seed_beyond_2_53_as_a_float_is_refused_not_rounded():
    """A Struct (an inline spec) carries numbers as doubles: 2^60 + 1 arrives as 2^60, so an
    integer past 2^53 given as a float is refused, naming where, instead of used changed."""
    with pytest.raises(InvalidArgument) as err:
        parse_policy("inline", {"select": "sample", "defaults": {"seed": float(2 ** 60 + 1)}})
    assert err.value.field == "spec.defaults.seed" and "params.seed" in err.value.message
    spec = parse_policy("inline", {"select": "sample", "defaults": {"seed": 2 ** 60 + 1}})
    assert spec.defaults["seed"] == 2 ** 60 + 1  # an int (YAML, Python) is exact
    assert parse_policy("i", {"select": "sample", "defaults": {"seed": float(2 ** 53)}}
                        ).defaults["seed"] == 2 ** 53
