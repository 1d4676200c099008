"""sampler_service.policy.params: every number is finite, every integer bounded (int32's max
where a schema sets none, token ids likewise), and messages echo bounded values."""
from __future__ import annotations

import math

import pytest

from sampler_service.errors import InvalidArgument
from sampler_service.policy.params import MAX_INT, MAX_TOKEN_ID, Param, validate_values
from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.resolved import SETTINGS
from sampler_service.policy.selectors import SELECTORS

COUNT = Param("k", "int", default=0, off=0, minimum=0, doc="")
WIDE = Param("seed", "int", default=None, off=None, minimum=0, maximum=2 ** 64 - 1, doc="")
RATIO = Param("p", "float", default=1.0, off=1.0, minimum=0.0, doc="")
IDS = Param("ids", "int_list", default=(), off=(), doc="")
BIAS = Param("bias", "token_bias", default=(), off=(), minimum=-100.0, maximum=100.0, doc="")
FORCED = Param("tokens", "int_map", default=(), off=(), minimum=0, doc="")


def refusal(param: Param, value) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        param.validate(value, f"spec.{param.name}")
    return err.value


def test_every_integer_parameter_has_an_upper_bound_within_int64():
    stages = [*PROCESSORS.values(), *SELECTORS.values()]
    params = [p for stage in stages for p in stage.params] + list(SETTINGS)
    integers = [p for p in params if p.kind in ("int", "int_map")]
    assert integers and all(p.upper is not None and p.upper <= 2 ** 64 - 1 for p in integers)
    assert all(p.upper <= 2 ** 63 - 1 for p in integers if p.name != "seed")


def test_an_integer_without_a_maximum_stops_at_int32s():
    assert COUNT.validate(float(MAX_INT), "k") == MAX_INT
    error = refusal(COUNT, float(2 ** 63))
    assert error.field == "spec.k" and "k = 9223372036854775808 is out of range" in error.message
    assert "[0, 2^31-1]" in error.message and COUNT.range_text() == "[0, 2^31-1]"
    assert WIDE.validate(2 ** 64 - 1, "seed") == 2 ** 64 - 1  # an explicit maximum stands
    assert WIDE.range_text() == "[0, 2^64-1]"


def test_a_huge_integer_is_echoed_bounded():
    error = refusal(COUNT, 10 ** 400)
    assert len(error.message) < 150 and "out of range" in error.message


@pytest.mark.parametrize("value, says", [
    (math.nan, "must be a finite integer, got nan"),
    (math.inf, "must be a finite integer, got inf"),
    (1.5, "must be an integer, got 1.5"), ("3", "must be an integer, got '3'"),
])
def test_an_integer_must_be_one(value, says):
    assert says in refusal(COUNT, value).message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10 ** 400])
def test_a_float_must_be_finite(value):
    error = refusal(RATIO, value)
    assert error.field == "spec.p" and "must be a finite number" in error.message


def test_token_ids_stop_at_int32s():
    assert IDS.validate([0, MAX_TOKEN_ID], "ids") == (0, MAX_TOKEN_ID)
    error = refusal(IDS, [1, 2, 2 ** 63])
    assert "token ids in [0, 2^31-1], got 9223372036854775808 at index 2" in error.message
    assert "at index 0" in refusal(IDS, [-1]).message
    assert IDS.range_text() == "token ids in [0, 2^31-1]"


def test_map_keys_and_values_are_bounded():
    assert BIAS.validate({str(MAX_TOKEN_ID): 1.0}, "bias") == ((MAX_TOKEN_ID, 1.0),)
    error = refusal(BIAS, {str(2 ** 63): 1.0})
    assert error.field == "spec.bias[9223372036854775808]"
    assert "token id 9223372036854775808 must be in [0, 2^31-1]" in error.message
    assert refusal(BIAS, {"5": -math.inf}).field == "spec.bias[5]"
    error = refusal(BIAS, {"9" * 10_000: 1.0})  # past Python's int() digits: not an integer
    assert error.field == "spec.bias[" + "9" * 32 + "…]" and len(error.message) < 150
    assert "[0, 2^31-1] -> [0, 2^31-1]" in FORCED.range_text()
    assert refusal(FORCED, {"0": float(2 ** 31)}).field == "spec.tokens[0]"


def test_long_values_and_names_are_echoed_bounded():
    for param, value in ((IDS, "z" * 50_000), (COUNT, "z" * 50_000), (BIAS, ["z"] * 50_000)):
        error = refusal(param, value)
        assert len(error.message) < 200, error.message
    with pytest.raises(InvalidArgument) as err:
        validate_values((COUNT,), {"n" * 50_000: 1}, "spec.top_k")
    assert err.value.field == "spec.top_k." + "n" * 32 + "…"
    assert f"'{'n' * 64}'…(50000 chars)" in err.value.message and len(err.value.message) < 200


# -- map keys as OpenAI sends them; aliases -----------------------------------------------------
def test_map_keys_are_ids_or_their_decimal_digits_once_each():
    assert BIAS.validate({"50256": -100, 7: 5.0}, "bias") == ((7, 5.0), (50256, -100))
    for key in ("+5", " 5", "5 ", "1_000", "5.0", "0x10", "", "٣"):
        error = refusal(BIAS, {key: 1.0})
        assert error.field.startswith("spec.bias[") and "decimal digits" in error.message, key
    error = refusal(BIAS, {"-3": 1.0})
    assert error.field == "spec.bias[-3]" and "token id -3 must be in [0, 2^31-1]" in error.message
    for twice in ({"5": 1.0, "05": 2.0}, {5: 1.0, "5": 2.0}):
        error = refusal(BIAS, twice)
        assert "gives 5 a second time" in error.message


def test_an_alias_is_stored_as_its_value_and_shown_in_the_range():
    k = Param("k", "int", default=0, off=0, minimum=0, aliases=((-1, 0),), doc="")
    assert k.validate(-1, "k") == 0 and k.validate(-1.0, "k") == 0 and k.validate(3, "k") == 3
    assert k.range_text() == "[0, 2^31-1], or -1 (= 0)"
    assert "or -1 (= 0)" in refusal(k, -2).message


def test_an_integer_past_2_53_given_as_a_float_is_refused():
    assert WIDE.validate(2 ** 64 - 1, "seed") == 2 ** 64 - 1
    assert WIDE.validate(float(2 ** 53), "seed") == 2 ** 53
    error = refusal(WIDE, float(2 ** 53 + 2))
    assert error.field == "spec.seed" and "beyond 2^53" in error.message
