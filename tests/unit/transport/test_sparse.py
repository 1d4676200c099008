"""decode_sparse: sparse rows from the wire equal the reference top-K + tail statistics of the
same logits (any entry order, every wire dtype), and every inconsistent message is refused
with INVALID_ARGUMENT naming its field under `sparse.`."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import InvalidArgument
from sampler_service.transport.codec import decode_tensor
from sampler_service.transport.sparse import decode_sparse
from tests.unit.helpers import random_logits, sparse_rows

CPU = torch.device("cpu")
INF = math.inf
WIRE = {pb.FP32: (torch.float32, "<f4"), pb.FP16: (torch.float16, "<f2")}


def decode_values(tensor: pb.Tensor, field: str) -> torch.Tensor:
    return decode_tensor(tensor, field, CPU)


def encode(logits: torch.Tensor, k: int, rows: list[int], dtype: int = pb.FP32,
           shuffle: int | None = None) -> pb.SparseRows:
    """The message a worker sends for `logits` [len(rows), V]: top-K of the logits as the wire
    dtype holds them, entries in a random order when `shuffle` seeds one."""
    torch_dtype, numpy_dtype = WIRE[dtype]
    sparse = sparse_rows(logits.to(torch_dtype).float(), k)
    ids, values = sparse.ids, sparse.values
    if shuffle is not None:
        order = torch.argsort(torch.rand(ids.shape, generator=torch.Generator().manual_seed(
            shuffle)), dim=1)
        ids, values = ids.gather(1, order), values.gather(1, order)
    return pb.SparseRows(
        rows=rows, vocab_size=logits.shape[1],
        token_ids=ids.numpy().astype("<i4").tobytes(),
        logits=pb.Tensor(dtype=dtype, shape=list(values.shape),
                         raw=values.numpy().astype(numpy_dtype).tobytes()),
        tails=[pb.TailStats(max=m, log_sum_exp=lse, mean=mean, mean_square=square)
               for m, lse, mean, square in zip(sparse.tail_max.tolist(), sparse.tail_lse.tolist(),
                                               sparse.tail_mean.tolist(),
                                               sparse.tail_mean_square.tolist())])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(2, 120), st.data(), st.sampled_from(list(WIRE)))
def test_decoded_rows_are_the_reference_top_k(rows, vocab, data, dtype):
    k = data.draw(st.integers(1, vocab))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    listed = sorted(data.draw(st.sets(st.integers(0, rows + 3), min_size=rows, max_size=rows)))
    message = encode(logits, k, listed, dtype, shuffle=data.draw(st.integers(0, 1000)))
    got_rows, sparse = decode_sparse(message, rows + 4, CPU, decode_values)
    expected = sparse_rows(logits.to(WIRE[dtype][0]).float(), k)
    assert got_rows == listed
    assert sparse.vocab == vocab and sparse.ids.dtype == torch.int64
    assert torch.equal(sparse.values, expected.values)  # best first
    assert torch.equal(sparse.values, sparse.values.sort(dim=1, descending=True).values)
    assert torch.equal(torch.sort(sparse.ids, dim=1).values, torch.sort(expected.ids, dim=1).values)
    assert torch.equal(logits.to(WIRE[dtype][0]).float().gather(1, sparse.ids), sparse.values)
    for name in ("tail_max", "tail_lse", "tail_mean", "tail_mean_square"):
        assert torch.equal(getattr(sparse, name), getattr(expected, name)), name


def test_empty_and_all_masked_tails_are_accepted():
    logits = random_logits(1, rows=2, vocab=6)
    whole = decode_sparse(encode(logits, 6, [0, 1]), 2, CPU, decode_values)[1]
    assert torch.isneginf(whole.tail_max).all() and torch.isneginf(whole.tail_lse).all()
    logits[:, 4:] = -INF  # a padded vocabulary: its tail is all −inf
    padded = decode_sparse(encode(logits, 4, [0, 1]), 2, CPU, decode_values)[1]
    assert torch.isneginf(padded.tail_max).all()
    assert padded.tail_mean.tolist() == [0.0, 0.0]


def _tail(message: pb.SparseRows, **values) -> None:
    for name, value in values.items():
        setattr(message.tails[0], name, value)


#: (what is wrong, how to break a valid message of 2 rows of 8 tokens with K = 4, the field).
BROKEN = [
    ("no rows", lambda m: m.ClearField("rows"), "sparse.rows"),
    ("descending rows", lambda m: m.rows.__setitem__(slice(None), [2, 1]), "sparse.rows[1]"),
    ("repeated row", lambda m: m.rows.__setitem__(slice(None), [1, 1]), "sparse.rows[1]"),
    ("row out of range", lambda m: m.rows.__setitem__(slice(None), [1, 3]), "sparse.rows[1]"),
    ("no vocabulary", lambda m: setattr(m, "vocab_size", 0), "sparse.vocab_size"),
    ("K above the vocabulary", lambda m: setattr(m, "vocab_size", 3), "sparse.logits.shape"),
    ("logits rows", lambda m: m.rows.insert(0, 0), "sparse.logits.shape"),
    ("logits dtype", lambda m: setattr(m.logits, "dtype", 99), "sparse.logits.dtype"),
    ("short ids", lambda m: setattr(m, "token_ids", m.token_ids[:-4]), "sparse.token_ids"),
    ("id out of range", lambda m: setattr(m, "token_ids", np.array(
        [8, 1, 2, 3, 0, 1, 2, 3], "<i4").tobytes()), "sparse.token_ids"),
    ("negative id", lambda m: setattr(m, "token_ids", np.array(
        [-1, 1, 2, 3, 0, 1, 2, 3], "<i4").tobytes()), "sparse.token_ids"),
    ("repeated id", lambda m: setattr(m, "token_ids", np.array(
        [0, 1, 2, 3, 0, 1, 1, 3], "<i4").tobytes()), "sparse.token_ids"),
    ("NaN logit", lambda m: setattr(m.logits, "raw", np.array(
        [9, math.nan, 7, 6, 9, 8, 7, 6], "<f4").tobytes()), "sparse.logits"),
    ("+inf logit", lambda m: setattr(m.logits, "raw", np.array(
        [9, INF, 7, 6, 9, 8, 7, 6], "<f4").tobytes()), "sparse.logits"),
    ("row without a finite logit", lambda m: setattr(m.logits, "raw", np.array(
        [9, 8, 7, 6] + [-INF] * 4, "<f4").tobytes()), "sparse.logits"),
    ("tails count", lambda m: m.tails.pop(), "sparse.tails"),
    ("NaN tail max", lambda m: _tail(m, max=math.nan), "sparse.tails[0].max"),
    ("NaN mean", lambda m: _tail(m, mean=math.nan), "sparse.tails[0].mean"),
    ("+inf tail max", lambda m: _tail(m, max=INF), "sparse.tails[0].max"),
    ("tail above a sent logit", lambda m: _tail(m, max=6.5), "sparse.tails[0].max"),
    ("empty tail with a mass", lambda m: _tail(m, max=-INF), "sparse.tails[0].log_sum_exp"),
    ("empty tail with a mean", lambda m: _tail(m, max=-INF, log_sum_exp=-INF),
     "sparse.tails[0].mean"),
    ("log-sum-exp below max", lambda m: _tail(m, log_sum_exp=m.tails[0].max - 0.1),
     "sparse.tails[0].log_sum_exp"),
    ("log-sum-exp above max + ln n", lambda m: _tail(m, log_sum_exp=m.tails[0].max + 1.5),
     "sparse.tails[0].log_sum_exp"),
    ("mean above max", lambda m: _tail(m, mean=m.tails[0].max + 0.1), "sparse.tails[0].mean"),
    ("entropy above ln n", lambda m: _tail(m, mean=m.tails[0].log_sum_exp - 1.5),
     "sparse.tails[0].mean"),
    ("negative variance", lambda m: _tail(m, mean_square=m.tails[0].mean ** 2 - 0.1),
     "sparse.tails[0].mean_square"),
]


@pytest.mark.parametrize("why, breaks, field", BROKEN, ids=[b[0] for b in BROKEN])
def test_inconsistent_messages_name_their_field(why, breaks, field):
    logits = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0],
                           [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]])
    message = encode(logits, 4, [1, 2])
    decode_sparse(message, 3, CPU, decode_values)  # valid as built
    breaks(message)
    with pytest.raises(InvalidArgument) as caught:
        decode_sparse(message, 3, CPU, decode_values)
    assert caught.value.field == field, caught.value.message


def test_k_equal_to_the_vocabulary_leaves_no_tail():
    logits = random_logits(2, rows=1, vocab=5)
    message = encode(logits, 5, [0])
    message.tails[0].max = float(logits.min()) - 1.0
    with pytest.raises(InvalidArgument) as caught:
        decode_sparse(message, 1, CPU, decode_values)
    assert caught.value.field == "sparse.tails[0].max"
    assert "K = vocab_size leaves no tail" in caught.value.message
