"""Candidates' fast paths against their references."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampler_service.policy import candidates as candidates_module
from sampler_service.policy.candidates import Candidates, first_argmax, sort_ascending
from tests.unit.helpers import random_logits


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 300), levels=st.integers(1, 5),
       seed=st.integers(0, 2 ** 31))
def test_first_argmax_is_torch_argmax_with_ties(rows, vocab, levels, seed):
    """Few distinct values make many ties: both pick the first maximum; -inf rows included."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (rows, vocab), generator=generator).float()
    values[torch.rand(rows, vocab, generator=generator) < 0.3] = float("-inf")
    assert torch.equal(first_argmax(values), torch.argmax(values, dim=1))
    assert torch.equal(first_argmax(values[:, ::2]), torch.argmax(values[:, ::2], dim=1))


# -- shared candidates: copied at their first write --------------------------------------------
INF = math.inf
ROWS = torch.tensor([0, 2])


def _write_ops():
    """(name, operation on Candidates, what it does to dense rows [4, V] in place)."""
    def masked(values, threshold):
        return values.masked_fill(values < threshold.unsqueeze(1), -INF)

    def keep_only(values):
        out = values.clone()
        out[ROWS] = -INF
        out[0, 5], out[2, 7] = values[0, 5], values[2, 7]
        return out

    def force(values):
        out = values.clone()
        out[ROWS] = -INF
        out[0, 3] = out[2, 9] = 0.0
        return out

    def update(values):
        out = values.clone()
        out[0, 1], out[2, 4] = -1.0, 2.0
        return out

    def mask(values):
        return values.masked_fill(values > 1.0, -INF)

    def subset(values):
        out = values.clone()
        out[ROWS] = masked(values[ROWS], values[ROWS].amax(dim=1) - 1.0)
        return out

    return [
        ("mask_below", lambda c: c.mask_below(c.values.amax(dim=1) - 2.0),
         lambda v: masked(v, v.amax(dim=1) - 2.0)),
        ("mask_below_rows", lambda c: c.mask_below(c.values[ROWS].amax(dim=1) - 1.0, ROWS),
         subset),
        ("divide", lambda c: c.divide(torch.tensor([0.5, 1.0, 2.0, 3.0])),
         lambda v: v / torch.tensor([0.5, 1.0, 2.0, 3.0]).unsqueeze(1)),
        ("update", lambda c: c.update(ROWS, torch.tensor([1, 4]), torch.tensor([-1.0, 2.0])),
         update),
        ("keep_only", lambda c: c.keep_only(ROWS, ROWS, torch.tensor([5, 7])), keep_only),
        ("force", lambda c: c.force(ROWS, torch.tensor([3, 9])), force),
        ("mask", lambda c: c.mask(c.values > 1.0), mask),
    ]


@pytest.mark.parametrize("vocab", [300, 1500])  # 1500 > the width: mask_below may compact
@pytest.mark.parametrize("name,operation,expected", _write_ops(), ids=[o[0] for o in _write_ops()])
def test_shared_candidates_copy_at_first_write(monkeypatch, vocab, name, operation, expected):
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", 1024)
    original = random_logits(1, rows=4, vocab=vocab)
    before = original.clone()
    candidates = Candidates(original, shared=True)
    assert candidates.values is original
    # reading never copies
    candidates.best_first(5)
    candidates.max_values()
    candidates.argmax()
    candidates.at(torch.tensor([0, 1, 2, 3]))
    candidates.locate(ROWS, torch.tensor([1, 2]))
    assert candidates.values is original
    operation(candidates)
    assert torch.equal(original, before), name  # the raw rows are untouched
    assert candidates.values is not original
    assert torch.equal(candidates.to_dense(), expected(before)), name
    # the copy is the candidates' own from now on: a second write copies nothing more
    own = candidates.writable()
    assert own is candidates.values and candidates.writable() is own


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("vocab", [300, 1500])
@pytest.mark.parametrize("first", _write_ops(), ids=[o[0] for o in _write_ops()])
@pytest.mark.parametrize("then", _write_ops(), ids=[o[0] for o in _write_ops()])
def test_known_maxima_follow_every_write(monkeypatch, shared, vocab, first, then):
    """Maxima given to Candidates (the raw rows' from their statistics) are what max_values
    answers until a write: after any two writes it answers the values' own maxima."""
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", 1024)
    values = random_logits(2, rows=4, vocab=vocab)
    candidates = Candidates(values if shared else values.clone(), shared=shared,
                            maxima=values.amax(dim=1))
    assert torch.equal(candidates.max_values(), values.amax(dim=1))
    for _, operation, _ in (first, then):
        operation(candidates)
        assert torch.equal(candidates.max_values(), candidates.values.amax(dim=1))


def test_known_maxima_are_dropped_by_a_write_through_writable_and_by_new_values():
    values = random_logits(3, rows=4, vocab=500)
    candidates = Candidates(values.clone(), maxima=values.amax(dim=1))
    candidates.writable().numpy()[:, :] = 0.0  # a plug-in writing through NumPy
    assert torch.equal(candidates.max_values(), torch.zeros(4))
    candidates = Candidates(values.clone(), maxima=values.amax(dim=1))
    candidates.values = values - 5.0  # a stage setting new values
    assert torch.equal(candidates.max_values(), values.amax(dim=1) - 5.0)


def test_writable_copies_once_and_unshared_never():
    original = random_logits(2, rows=2, vocab=50)
    shared = Candidates(original, shared=True)
    copy = shared.writable()
    assert copy is not original and torch.equal(copy, original)
    assert shared.writable() is copy
    owned = Candidates(original)
    assert owned.writable() is original  # not shared: written in place
    owned.divide(torch.tensor([2.0, 2.0]))
    assert owned.values is original


def test_shared_candidates_restrict_and_sort_leave_the_original():
    original = random_logits(3, rows=4, vocab=300)
    before = original.clone()
    candidates = Candidates(original, shared=True)
    best = candidates.best_first(11)  # as top-k 10 takes it: one more than it keeps
    candidates.restrict(best[0][:, 9], best)
    assert not candidates.dense and candidates.values.shape == (4, 11)
    candidates.update(ROWS, torch.tensor([0, 0]), torch.tensor([-5.0, -6.0]))  # re-sorted lazily
    candidates.best_first(10)
    candidates.divide(torch.full((4,), 2.0))
    assert torch.equal(original, before)


# -- restrict: masked values never make a top-k grow -------------------------------------------
@pytest.mark.parametrize("compact_width,vocab", [(1024, 1000), (0, 3000), (1024, 3000)])
def test_top_k_after_few_finite_tokens_does_not_grow(monkeypatch, compact_width, vocab):
    """min-p leaving fewer than k finite tokens, then top-k 50 (best_first(51), a −inf k-th
    value, as `TopK.apply` takes it): the row keeps its finite tokens and the width stays ≤ 51,
    not the vocabulary. (V > COMPACT_WIDTH: min-p's mask already compacted the batch.)"""
    if 0 < compact_width < vocab:
        pytest.importorskip("numba")
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", compact_width)
    logits = random_logits(4, rows=3, vocab=vocab)
    logits[1, 40:] = -INF  # fewer finite tokens than k in one row, whatever min-p keeps
    candidates = Candidates(logits.clone())
    candidates.mask_below(logits.amax(dim=1) - 3.0)  # min-p: few tokens survive
    assert candidates.dense == (compact_width == 0 or vocab <= compact_width)
    finite = torch.isfinite(candidates.to_dense()).sum(dim=1)
    assert int(finite.max()) < 50
    expected = candidates.to_dense().clone()
    best = candidates.best_first(51)
    width = best[0].shape[1]
    kth = best[0][:, min(49, width - 1)]
    if candidates.dense:
        assert width == 51 and bool((kth == -INF).all())
        candidates.restrict(kth, best)
    assert not candidates.dense
    assert candidates.values.shape[1] <= 51, candidates.values.shape
    assert torch.equal(candidates.to_dense(), expected)


def test_restrict_still_keeps_finite_ties(monkeypatch):
    """Finite ties at the k-th value spill over (logits rounded from bf16 tie often): all of
    them stay, by one masking pass rather than a wider top-k over the rows."""
    values = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0, -INF]])
    candidates = Candidates(values.clone())
    best = candidates.best_first(3)
    monkeypatch.setattr(torch, "topk", lambda *a, **k: pytest.fail("a wider top-k"))
    candidates.restrict(best[0][:, 1], best)  # top-2 with a three-way tie at 3.0
    assert torch.equal(candidates.to_dense(), values.masked_fill(values < 3.0, -INF))


# -- keep_bits: a token bitmask (xgrammar's layout) ---------------------------------------------
def _bits_reference(values: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Token t of a listed row stays iff bit t % 32 of word t // 32 is set, read one by one."""
    out = values.clone()
    words = bitmask.to(torch.int64) & 0xFFFFFFFF
    for row in rows:
        for token in range(values.shape[1]):
            if not (int(words[row, token // 32]) >> (token % 32)) & 1:
                out[row, token] = -INF
    return out


def _random_bitmask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(-2 ** 31, 2 ** 31, (rows, (vocab + 31) // 32), generator=generator,
                          dtype=torch.int64)
    return words.to(torch.int32)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 130), seed=st.integers(0, 2 ** 31),
       subset=st.booleans())
def test_keep_bits_equals_reading_each_bit(rows, vocab, seed, subset):
    values = random_logits(seed, rows, vocab)
    bitmask = _random_bitmask(rows, vocab, seed)
    chosen = list(range(0, rows, 2)) if subset else list(range(rows))
    candidates = Candidates(values)
    candidates.keep_bits(chosen, bitmask)
    assert torch.equal(candidates.values, _bits_reference(values, chosen, bitmask))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keep_bits_on_cuda_equals_the_cpu(dtype, xgrammar):
    """On CUDA the mask goes through xgrammar's kernel, on the values' device."""
    values = random_logits(3, 8, 49152).to(dtype)
    bitmask = _random_bitmask(8, 49152, 3)
    rows = [0, 3, 4, 7]
    on_cpu, on_cuda = Candidates(values.clone()), Candidates(values.cuda())
    on_cpu.keep_bits(rows, bitmask)
    on_cuda.keep_bits(rows, bitmask)
    assert torch.equal(on_cuda.values.cpu(), on_cpu.values)


# -- divide: a quotient past float32's range saturates -------------------------------------------
@pytest.mark.parametrize("select", ["sample", "greedy"])
def test_a_logit_near_float32_max_under_t_below_1_takes_the_row(select):
    """x / T would be +inf; saturated, the token still takes all the probability, every row."""
    from sampler_service.engine import Engine
    from sampler_service.policy.registry import PolicyRegistry
    from sampler_service.service import SamplerCore, SequenceRequest, StepRow
    from sampler_service.state import SequenceStore
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    spec = {"chain": [{"temperature": {"temperature": 0.5}}], "select": select}
    core.create_sequences([SequenceRequest(f"s{i}", policy_spec=spec, params={"seed": i})
                           for i in range(64)])
    logits = random_logits(0, 64, 1000)
    top = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    logits[torch.arange(64), top] = torch.finfo(torch.float32).max
    answers = core.step([StepRow(f"s{i}") for i in range(64)], logits)
    assert [a.record.token_id for a in answers] == top.tolist()
    assert all(a.record.logprob == 0.0 for a in answers)


def test_divide_saturates_and_keeps_masked_tokens():
    values = torch.tensor([[3e38, -3e38, 1.0, -INF]])
    candidates = Candidates(values)
    candidates.divide(torch.tensor([0.5]))
    big = torch.finfo(torch.float32).max
    assert candidates.values.tolist() == [[big, -INF, 2.0, -INF]]


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 300), seed=st.integers(0, 2 ** 31),
       writes=st.integers(1, 3), then=st.sampled_from(["divide", "mask", "read"]),
       kernel=st.booleans())
def test_writes_waiting_on_shared_values_equal_writing_first(rows, vocab, seed, writes, then,
                                                             kernel):
    """`update`s of shared dense values wait for the next pass; the result equals the eager
    copy-then-write, bit for bit, and the shared values stay untouched. Divisors include ones
    that saturate (a logit near float32's max under T < 1). With and without the kernels."""
    with pytest.MonkeyPatch.context() as patch:
        if not kernel:
            patch.setattr(candidates_module, "NUMBA", False)
        _check_waiting_writes(rows, vocab, seed, writes, then)


def _check_waiting_writes(rows: int, vocab: int, seed: int, writes: int, then: str) -> None:
    generator = torch.Generator().manual_seed(seed)
    original = torch.randn(rows, vocab, generator=generator) * 5
    original[torch.rand(rows, vocab, generator=generator) < 0.1] = -math.inf
    original[0, 0] = 3.0e38
    before = original.clone()
    waiting, eager = Candidates(original, shared=True), Candidates(original.clone())
    for _ in range(writes):
        count = int(torch.randint(1, 2 * vocab + 1, (1,), generator=generator))
        at_rows = torch.randint(0, rows, (count,), generator=generator)
        at_columns = torch.randint(0, vocab, (count,), generator=generator)
        new = torch.randn(count, generator=generator) * 10
        for candidates in (waiting, eager):
            candidates.update(at_rows, at_columns, new)
    divisor = torch.rand(rows, generator=generator) * 2 + 1e-3
    for candidates in (waiting, eager):
        if then == "divide":
            candidates.divide(divisor)
        elif then == "mask":
            candidates.mask(candidates.values > 1.0)
    assert torch.equal(original, before)
    assert torch.equal(waiting.values, eager.values)
    assert torch.equal(waiting.max_values(), eager.values.amax(dim=1))


@settings(max_examples=200, deadline=None)
@given(shape=st.sampled_from([(7,), (3, 1), (4, 50), (2, 3, 9), (64, 1024)]),
       seed=st.integers(0, 2 ** 31), high=st.sampled_from([10 ** 3, 2 ** 40, 2 ** 62]),
       negative=st.booleans())
def test_sort_ascending_is_torch_sort_of_distinct_keys(shape, seed, high, negative):
    """Packed keys, and the argsort taken for keys too large or negative, equal torch.sort."""
    generator = torch.Generator().manual_seed(seed)
    count = shape[-1]
    span = max(count * 3, 1000)
    rows = [torch.randperm(span, generator=generator)[:count] * max(1, high // span)
            for _ in range(math.prod(shape[:-1]))]
    keys = torch.stack(rows).reshape(shape).to(torch.int64)
    if negative:
        keys = keys - high // 2
    values, order = sort_ascending(keys)
    expected = torch.sort(keys, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(order, expected.indices)
