"""sampler_client.requests.check_size: a request over the channel's max send size is refused
before it is sent, naming its size and the cap."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from sampler_client.errors import MessageTooLargeError, ResourceExhaustedError
from sampler_client.requests import check_size, step_request


def test_a_request_within_the_cap_passes_and_one_past_it_is_refused():
    request = step_request([("s", 0, None)], np.zeros((1, 1000), np.float32))
    size = request.ByteSize()
    check_size(request, size)
    with pytest.raises(MessageTooLargeError) as err:
        check_size(request, size - 1)
    assert isinstance(err.value, ResourceExhaustedError)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (err.value.size, err.value.limit) == (size, size - 1)
    assert err.value.message.startswith(f"StepRequest of {size} bytes exceeds the client's max "
                                        f"send size of {size - 1} bytes")
    assert "transport='shm'" in err.value.message and "sparse_top_k" in err.value.message


def test_a_choice_explanation_with_an_infinite_number_converts():
    """An explanation may hold ±inf (kl_temperature's KL of a degenerate row): json_format's
    MessageToDict raises on it, the SDK's conversion keeps it."""
    from google.protobuf import struct_pb2

    from sampler_client.types import Choice
    from sampler_proto.sampler.v1 import sampler_pb2 as pb
    explanation = struct_pb2.Struct()
    explanation.update({"kl_temperature": {"kl": float("inf"), "temperature": 0.5}})
    choice = Choice.from_pb(pb.Choice(sequence_id="s", token_id=3, explanation=explanation))
    assert choice.explanation == {"kl_temperature": {"kl": float("inf"), "temperature": 0.5}}


# -- sampling_params: OpenAI's logit_bias keys, the parity fields ------------------------------
def test_logit_bias_takes_token_ids_as_ints_or_their_decimal_text():
    from sampler_client.requests import sampling_params
    params = sampling_params({"logit_bias": {"50256": -100, 7: 5.5, "0": 1}})
    assert dict(params.logit_bias) == {50256: -100.0, 7: 5.5, 0: 1.0}
    assert dict(sampling_params({"logit_bias": {"-3": 1}}).logit_bias) == {-3: 1.0}  # server's


@pytest.mark.parametrize("bias, says", [
    ({"abc": 1}, "'abc' must be a token id"), ({"+5": 1}, "'+5' must be a token id"),
    ({" 5": 1}, "must be a token id"), ({5.0: 1}, "5.0 must be a token id"),
    ({True: 1}, "True must be a token id"), ({"5": 1, 5: 2}, "gives token id 5 twice"),
    ({"9" * 40: 1}, "must be a token id"), ([(5, 1)], "takes a mapping"),
])
def test_logit_bias_refuses_what_is_no_token_id(bias, says):
    from sampler_client.requests import sampling_params
    with pytest.raises(ValueError) as err:
        sampling_params({"logit_bias": bias})
    assert says in str(err.value) and len(str(err.value)) < 200


def test_the_parity_fields_are_sampling_params():
    from sampler_client.requests import sampling_params
    params = sampling_params({"top_k": -1, "ignore_eos": True, "top_logprobs": 3,
                              "top_p": 0.9, "top_p_rule": "hf"})
    assert (params.top_k, params.ignore_eos, params.top_logprobs, params.top_p_rule) == \
        (-1, True, 3, "hf")
    assert params.HasField("ignore_eos") and not params.HasField("logprobs")
