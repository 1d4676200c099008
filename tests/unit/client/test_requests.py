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
