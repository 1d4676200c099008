"""sampler_service.kernels.cpu_compact (threshold compaction into sparse rows), directly and
through `Candidates.mask_below`, against masking in place."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampler_service.kernels import PARALLEL_MIN_ROWS
from sampler_service.policy import candidates as candidates_module
from sampler_service.policy.candidates import Candidates

INF = math.inf
#: The width these tests compact into, whatever the module's tuned default.
WIDTH = 1024


def random_rows(seed: int, rows: int, vocab: int, masked: float = 0.0,
                levels: int = 0) -> torch.Tensor:
    """[rows, vocab] float32 normal logits (few distinct values when `levels`: many ties), a
    fraction `masked` of them −inf."""
    generator = torch.Generator().manual_seed(seed)
    if levels:
        logits = torch.randint(0, levels, (rows, vocab), generator=generator).float()
    else:
        logits = torch.randn(rows, vocab, generator=generator) * 2
    logits[torch.rand(rows, vocab, generator=generator) < masked] = -INF
    return logits


def masked_in_place(logits: torch.Tensor, threshold: torch.Tensor, monkeypatch) -> Candidates:
    with monkeypatch.context() as patch:
        patch.setattr(candidates_module, "COMPACT_WIDTH", 0)
        reference = Candidates(logits.clone())
        reference.mask_below(threshold)
    assert reference.dense
    return reference


def check_sparse_rows(candidates: Candidates, vocab: int) -> None:
    ids = candidates.ids
    assert ids.dtype == torch.int64 and ids.shape == candidates.values.shape
    assert bool(((ids >= 0) & (ids < vocab)).all())
    for row in ids:
        assert len(torch.unique(row)) == row.numel()


def test_compaction_equals_masking_in_place(monkeypatch):
    pytest.importorskip("numba")
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None)
    @given(seed=st.integers(0, 2 ** 31),
           rows=st.one_of(st.integers(1, 12), st.integers(PARALLEL_MIN_ROWS, 12)),
           narrow=st.booleans(), vocab_draw=st.integers(0, 10 ** 6),
           keep=st.integers(0, 40), masked=st.sampled_from([0.0, 0.3, 0.9]),
           levels=st.sampled_from([0, 3, 50]), wide_row=st.booleans())
    def check(seed, rows, narrow, vocab_draw, keep, masked, levels, wide_row):
        # Either a width of 1024 with V = 1100..3000, or a width of 16 with V = 17..200.
        width = 16 if narrow else WIDTH
        vocab = (17 + vocab_draw % 184) if narrow else (1100 + vocab_draw % 1901)
        logits = random_rows(seed, rows, vocab, masked, levels)
        # Each row's threshold: its (keep % width + 1)-th best value (ties may keep more).
        rank = min(keep % width + 1, vocab)
        threshold = torch.topk(logits, rank, dim=1).values[:, -1].contiguous()
        threshold[threshold == -INF] = 0.0  # a −inf threshold keeps the whole row
        if wide_row:  # one row keeps everything: too wide, the batch stays dense
            threshold[seed % rows] = -INF
        before = logits.clone()
        reference = masked_in_place(logits, threshold, monkeypatch)
        with monkeypatch.context() as patch:
            patch.setattr(candidates_module, "COMPACT_WIDTH", width)
            compacted = Candidates(logits, shared=True)
            compacted.mask_below(threshold)
        assert torch.equal(logits, before)  # shared: the raw rows are never written
        kept = (logits >= threshold.unsqueeze(1)).sum(dim=1)
        if int(kept.max()) > width:
            assert compacted.dense
        else:
            assert not compacted.dense
            assert compacted.values.shape[1] == max(int(kept.max()), 1)
            check_sparse_rows(compacted, vocab)
        assert torch.equal(compacted.to_dense(), reference.to_dense())
        # later stages see the same candidates
        assert torch.equal(compacted.argmax(), reference.argmax())
        assert torch.equal(compacted.max_values(), reference.max_values())

    check()


def test_threshold_above_every_value_compacts_to_one_filler_column(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", WIDTH)
    logits = random_rows(1, 3, 1500)
    candidates = Candidates(logits.clone())
    candidates.mask_below(torch.full((3,), 100.0))
    assert not candidates.dense and candidates.values.shape == (3, 1)
    assert torch.equal(candidates.ids, torch.zeros(3, 1, dtype=torch.int64))
    assert bool((candidates.values == -INF).all())
    assert bool((candidates.to_dense() == -INF).all())


def test_not_compacted_where_it_does_not_apply(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", WIDTH)
    logits = random_rows(2, 4, 1500)
    threshold = logits.amax(dim=1) - 1.0
    for values, cut in ((logits.double(), threshold.double()),  # not float32
                        (logits, threshold.double()),
                        (logits[:, :1000], threshold)):  # V ≤ COMPACT_WIDTH
        candidates = Candidates(values.clone())
        candidates.mask_below(cut)
        assert candidates.dense
        assert torch.equal(candidates.values, values.masked_fill(values < cut.unsqueeze(1), -INF))
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", 0)
    candidates = Candidates(logits.clone())
    candidates.mask_below(threshold)
    assert candidates.dense
    # a subset of rows is masked in place, never compacted
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", WIDTH)
    candidates = Candidates(logits.clone())
    candidates.mask_below(threshold[:2], rows=torch.tensor([1, 3]))
    assert candidates.dense


@pytest.mark.parametrize("rows", [3, PARALLEL_MIN_ROWS + 2])
@pytest.mark.parametrize("threads", [1, 4])
def test_compact_at_least_layout(rows, threads):
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_compact import compact_at_least
    width, vocab = 8, 60
    logits = random_rows(7 + rows, rows, vocab, masked=0.2, levels=12).numpy()
    kept_target = [(0, width + 2, width, 1, 3)[r % 5] for r in range(rows)]  # ties may add
    threshold = np.empty(rows, dtype=np.float32)
    for r in range(rows):
        ordered = np.sort(logits[r])[::-1]
        threshold[r] = np.inf if kept_target[r] == 0 else ordered[kept_target[r] - 1]
    for narrow in (False, True):  # with a row past the width, then without one
        if narrow:  # ties may take a row past the width too
            wide_rows = np.array([(logits[r] >= threshold[r]).sum() > width for r in range(rows)])
            threshold = np.where(wide_rows, np.inf, threshold).astype(np.float32)
        values, ids, kept = compact_at_least(logits, threshold, width, threads)
        assert kept.shape == (rows,) and values.dtype == np.float32 and ids.dtype == np.int64
        counts = [(logits[r] >= threshold[r]).sum() for r in range(rows)]
        wide = any(c > width for c in counts)
        assert wide != narrow
        # the widest row's count when none is past the width (outputs trimmed to it)
        assert values.shape == ids.shape == (rows, width if wide else max(max(counts), 1))
        for r in range(rows):
            above = np.nonzero(logits[r] >= threshold[r])[0]
            below = np.nonzero(~(logits[r] >= threshold[r]))[0]
            if len(above) > width:  # the caller falls back
                assert kept[r] == width + 1
                continue
            count = len(above)
            assert kept[r] == count
            assert np.array_equal(ids[r, :count], above)  # in id order
            assert np.array_equal(values[r, :count], logits[r, above])
            if not wide:
                fill = values.shape[1] - count
                assert np.array_equal(ids[r, count:], below[:fill])  # the first ids below
                assert np.all(values[r, count:] == -np.inf)
        assert (kept == 0).any()


def test_compact_at_least_keeps_minus_inf_at_a_minus_inf_threshold():
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_compact import compact_at_least
    logits = np.array([[-np.inf, 1.0, -np.inf, 0.5, 2.0]], dtype=np.float32)
    values, ids, kept = compact_at_least(np.repeat(logits, 2, axis=0),
                                         np.array([1.0, 2.0], dtype=np.float32), 3, 1)
    assert kept.tolist() == [2, 1]  # trimmed to the widest row: the other gets one filler
    assert ids.tolist() == [[1, 4], [4, 0]] and values.tolist() == [[1.0, 2.0], [2.0, -np.inf]]
    values, ids, kept = compact_at_least(logits, np.array([-np.inf], dtype=np.float32), 5, 1)
    assert kept.tolist() == [5] and ids[0].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(values[0], logits[0])
