"""sampler_client.sparse: top-K rows and tail statistics against a float64 reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_client.sparse import top_k_with_tail
from sampler_client.tensors import wire_tensor


def _numpy(dtype):
    return lambda values: values.astype(dtype)


def _torch(dtype_name, transposed=False):
    def make(values):
        torch = pytest.importorskip("torch")
        tensor = torch.from_numpy(values).to(getattr(torch, dtype_name))
        # a non-contiguous view of the same values, as out.logits[:, -1, :] is
        return tensor.t().contiguous().t() if transposed else tensor
    return make


SOURCES = {
    "numpy-fp32": _numpy(np.float32), "numpy-fp16": _numpy(np.float16),
    "numpy-fp64": _numpy(np.float64), "torch-fp32": _torch("float32"),
    "torch-fp16": _torch("float16"), "torch-bf16": _torch("bfloat16"),
    "torch-fp64-strided": _torch("float64", transposed=True),
}


@st.composite
def logits_and_k(draw):
    """[rows, vocab] float32 logits, about one in ten -inf (masked tokens), and a K."""
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 48))
    values = draw(arrays(np.float32, (rows, vocab), elements=st.floats(-40, 40, width=32)))
    masked = draw(arrays(np.int8, (rows, vocab), elements=st.integers(0, 9))) == 0
    values[masked] = -np.inf
    return values, draw(st.integers(1, vocab))


def tail_reference(row: np.ndarray, sent: np.ndarray) -> tuple[float, float, float, float]:
    """(max, log_sum_exp, mean, mean_square) of the entries of `row` not in `sent`, in float64."""
    tail = np.delete(row.astype(np.float64), sent)
    tail = tail[np.isfinite(tail)]
    if tail.size == 0:
        return -math.inf, -math.inf, 0.0, 0.0
    top = tail.max()
    weights = np.exp(tail - top)
    q = weights / weights.sum()
    return top, top + math.log(weights.sum()), float(q @ tail), float(q @ tail ** 2)


def assert_matches_reference(source, k: int) -> None:
    wire = wire_tensor(source)
    seen = wire.float32()
    seen = np.asarray(seen if isinstance(seen, np.ndarray) else seen.numpy(), dtype=np.float32)
    top = top_k_with_tail(wire, k)
    assert top.token_ids.shape == (seen.shape[0], k) and top.token_ids.dtype == np.int32
    assert top.sendable.tolist() == [bool(np.isfinite(row).any()) for row in seen]
    assert top.values.dtype == wire.dtype and top.values.shape == (seen.shape[0], k)
    values = top.values.float32()
    values = values if isinstance(values, np.ndarray) else values.numpy()
    for r, row in enumerate(seen):
        ids = top.token_ids[r]
        assert len(set(ids.tolist())) == k and ids.min() >= 0 and ids.max() < row.size
        np.testing.assert_array_equal(values[r], row[ids])  # the wire's values, exactly
        expected_max, lse, mean, mean_square = tail_reference(row, ids)
        if k < row.size:
            assert row[ids].min() >= np.delete(row, ids).max()  # really the K best
        assert top.max[r] == expected_max
        if expected_max == -math.inf:
            assert (top.log_sum_exp[r], top.mean[r], top.mean_square[r]) == (-math.inf, 0.0, 0.0)
            continue
        spread = 1.0 + abs(expected_max)
        assert top.log_sum_exp[r] == pytest.approx(lse, abs=1e-5 * spread)
        assert top.mean[r] == pytest.approx(mean, abs=1e-5 * spread)
        variance = mean_square - mean ** 2
        assert top.mean_square[r] - top.mean[r] ** 2 == pytest.approx(variance, abs=1e-5 * spread ** 2)


@pytest.mark.parametrize("source", SOURCES)
@settings(max_examples=60, deadline=None)
@given(case=logits_and_k())
def test_tail_statistics_equal_a_float64_reference(source, case):
    values, k = case
    assert_matches_reference(SOURCES[source](values), k)


@settings(max_examples=40, deadline=None)
@given(case=logits_and_k())
def test_numpy_and_torch_pick_the_same_rows_and_statistics(case):
    torch = pytest.importorskip("torch")
    values, k = case
    on_numpy, on_torch = (top_k_with_tail(wire_tensor(v), k) for v in (values, torch.from_numpy(values)))
    for r, row in enumerate(values):
        # the same sets of values (ids may differ only between equal logits)
        assert sorted(row[on_numpy.token_ids[r]]) == sorted(row[on_torch.token_ids[r]])
    np.testing.assert_array_equal(on_numpy.max, on_torch.max)
    for name in ("log_sum_exp", "mean", "mean_square"):
        np.testing.assert_allclose(getattr(on_numpy, name), getattr(on_torch, name),
                                   rtol=1e-5, atol=1e-5)


def test_large_rows_keep_their_precision():
    """A 128256-token row of a realistic spread: still within 1e-5 of float64."""
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((2, 128256)) * 4 + 10).astype(np.float32)
    assert_matches_reference(values, 50)
    torch = pytest.importorskip("torch")
    assert_matches_reference(torch.from_numpy(values), 50)


def test_an_empty_tail_is_minus_infinity_with_zero_moments():
    top = top_k_with_tail(wire_tensor(np.array([[1.0, 3.0, 2.0]], np.float32)), 3)
    assert top.token_ids.tolist() == [[1, 2, 0]]
    assert (top.max[0], top.log_sum_exp[0], top.mean[0], top.mean_square[0]) == (
        -math.inf, -math.inf, 0.0, 0.0)


def test_hand_computed_tail():
    """Tail {0, log 3} of [0, log 3, 5]: softmax (1/4, 3/4)."""
    row = np.array([[0.0, math.log(3.0), 5.0]], np.float32)
    top = top_k_with_tail(wire_tensor(row), 1)
    assert top.token_ids.tolist() == [[2]]
    assert top.max[0] == np.float32(math.log(3.0))
    assert top.log_sum_exp[0] == pytest.approx(math.log(4.0), abs=1e-7)
    l1 = float(np.float32(math.log(3.0)))
    assert top.mean[0] == pytest.approx(0.75 * l1, abs=1e-7)
    assert top.mean_square[0] == pytest.approx(0.75 * l1 ** 2, abs=1e-7)


@pytest.mark.parametrize("source", ["numpy-fp32", "torch-fp32"])
def test_rows_holding_nan_or_plus_infinity_or_no_finite_logit_are_not_sendable(source):
    values = np.array([[0.0, 1.0, 2.0, 3.0],
                       [0.0, np.nan, 2.0, 3.0],
                       [0.0, 1.0, np.inf, 3.0],
                       [np.nan, np.nan, np.nan, 3.0],
                       [-np.inf, -np.inf, -np.inf, -np.inf],
                       [-np.inf, -np.inf, -np.inf, 1.0]], np.float32)
    top = top_k_with_tail(wire_tensor(SOURCES[source](values)), 2)
    assert top.sendable.tolist() == [True, False, False, False, False, True]


def test_take_and_message_carry_the_chosen_rows():
    values = np.array([[0.0, 4.0, 1.0, 2.0], [5.0, 0.0, -1.0, 3.0]], np.float32)
    top = top_k_with_tail(wire_tensor(values), 2)
    second = top.take([1])
    assert second.token_ids.tolist() == [[0, 3]]
    assert second.max.tolist() == [0.0]
    values_tensor = pb.Tensor(dtype=pb.FP32, shape=[1, 2], raw=second.values.raw())
    message = second.message([3], 4, values_tensor)
    assert list(message.rows) == [3] and message.vocab_size == 4
    assert np.frombuffer(message.token_ids, "<i4").tolist() == [0, 3]
    assert np.frombuffer(message.logits.raw, "<f4").tolist() == [5.0, 3.0]
    (tail,) = message.tails
    assert tail.max == 0.0
    assert tail.log_sum_exp == pytest.approx(second.log_sum_exp[0])
    assert (tail.mean, tail.mean_square) == (second.mean[0], second.mean_square[0])


@pytest.mark.parametrize("source", ["numpy-fp32", "torch-bf16"])
def test_rows_computed_in_blocks_equal_rows_computed_alone(source):
    """19 rows of 100000 span two host blocks: each row picks what it picks alone, and its
    statistics differ at most by float32 summation order."""
    values = (np.random.default_rng(1).standard_normal((19, 100_000)) * 3).astype(np.float32)
    values[4, :50_000] = -np.inf
    made = SOURCES[source](values)
    together = top_k_with_tail(wire_tensor(made), 40)
    for r in (0, 4, 9, 10, 18):
        alone = top_k_with_tail(wire_tensor(made[r:r + 1]), 40)
        np.testing.assert_array_equal(together.token_ids[r], alone.token_ids[0])
        assert together.max[r] == alone.max[0]
        for name in ("log_sum_exp", "mean", "mean_square"):
            assert getattr(together, name)[r] == pytest.approx(getattr(alone, name)[0], rel=1e-6)
    assert together.values.raw() == b"".join(
        top_k_with_tail(wire_tensor(made[r:r + 1]), 40).values.raw() for r in range(19))
