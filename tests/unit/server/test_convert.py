"""sampler_service.server.convert: a spec Struct becomes plain data (NaN and ±inf kept for
the spec's validation to name), and worker signals are finite and in range at decode."""
from __future__ import annotations

import math

import pytest
import torch
from google.protobuf import json_format

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import InvalidArgument
from sampler_service.server.convert import (SIGNAL_RANGES, dict_to_struct, signals_from_pb,
                                            struct_to_dict)

CPU = torch.device("cpu")


def test_a_struct_converts_as_json_format_does():
    spec = {"chain": [{"top_k": {"k": 3}}, "min_p", None, True, 0.5, {"a": [1, [2, {}]]}],
            "select": "sample", "empty": {}}
    struct = dict_to_struct(spec)
    assert struct_to_dict(struct) == json_format.MessageToDict(struct)
    assert struct_to_dict(dict_to_struct({})) is None


def test_non_finite_numbers_are_kept_for_validation():
    struct = dict_to_struct({"chain": [{"top_p": {"p": math.nan}}], "x": [math.inf, -math.inf]})
    plain = struct_to_dict(struct)
    assert math.isnan(plain["chain"][0]["top_p"]["p"]) and plain["x"] == [math.inf, -math.inf]


def request(*signals: dict) -> pb.StepRequest:
    return pb.StepRequest(rows=[pb.StepRow(sequence_id=f"s{i}") for i in range(len(signals))],
                          signals=[pb.RowSignals(**s) for s in signals])


def test_signals_decode_per_row_with_unset_fields_zero():
    decoded = signals_from_pb(request({"agreement": 0.5}, {"interaction_strength": 3e38}), CPU)
    assert decoded["agreement"].tolist() == [0.5, 0.0]
    assert decoded["interaction_strength"][1] == pytest.approx(3e38)
    assert signals_from_pb(pb.StepRequest(rows=[pb.StepRow(sequence_id="s")]), CPU) is None


@pytest.mark.parametrize("name", sorted(SIGNAL_RANGES))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5])
def test_a_non_finite_or_negative_signal_names_its_row_and_name(name, value):
    with pytest.raises(InvalidArgument) as err:
        signals_from_pb(request({}, {name: value}), CPU)
    assert err.value.field == f"signals[1].{name}" and "'s1'" in err.value.message
    assert ("must be finite" if not math.isfinite(value) else "must be in [0") in err.value.message


def test_bounded_signals_stop_at_their_bound():
    high = SIGNAL_RANGES["agreement"][1]
    assert signals_from_pb(request({"agreement": high}), CPU)["agreement"].item() == high
    with pytest.raises(InvalidArgument, match=r"must be in \[0, 1e\+06\]"):
        signals_from_pb(request({"agreement": 2 * high}), CPU)
