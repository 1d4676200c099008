"""sampler_service.kernels.cpu_draw (the `sample` selector's inverse-CDF draw) against an exact
float64 inversion and against `draw_inverse_cdf_reference` (torch float32 cumsum +
searchsorted): the column is the first i with Σ_{j≤i} w_j > U·Σw, w = exp(l − max l)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sampler_service.kernels import PARALLEL_MIN_ROWS
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.noise import uniform_noise
from sampler_service.policy.processors import RowBatch
from sampler_service.policy.selectors import sample as sample_module
from sampler_service.policy.selectors.sample import (ROW_UNIFORM_TOKEN, Sample, draw_inverse_cdf,
                                                     draw_inverse_cdf_reference)

CPU = torch.device("cpu")
INF = math.inf
#: Relative distance of U·Σw from a cumulative boundary within which the column may differ.
BOUNDARY_MARGIN = 1e-6
#: The largest uniform `uniform_noise` gives, and the smallest.
TOP_UNIFORM = (2.0 ** 52 - 0.5) / 2.0 ** 52
BOTTOM_UNIFORM = 0.5 / 2.0 ** 52


def fake_rows(positions, seeds) -> RowBatch:
    """A RowBatch over stand-ins: the draw reads only each row's position and seed."""
    return RowBatch([SimpleNamespace(position=p, seed=s) for p, s in zip(positions, seeds)], CPU)


def row_uniforms(batch: RowBatch) -> np.ndarray:
    """[R] float64: each row's uniform of the step, as `draw_inverse_cdf` draws it."""
    tokens = torch.full((batch.rows, 1), ROW_UNIFORM_TOKEN, dtype=torch.int64)
    return uniform_noise(batch.seeds, batch.positions, tokens).squeeze(1).numpy()


def random_rows(seed: int, rows: int, vocab: int, scale: float, offset: float,
                masked: float) -> np.ndarray:
    """[rows, vocab] C-contiguous float32 normal logits · scale + offset, a fraction `masked`
    of them −inf (one finite entry per row at least)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * scale + offset).astype(np.float32)
    logits[rng.random((rows, vocab)) < masked] = -np.inf
    logits[np.arange(rows), rng.integers(0, vocab, rows)] = np.float32(offset)
    return np.ascontiguousarray(logits)


def exact_draw(row: np.ndarray, uniform: float) -> tuple[int, float, bool]:
    """(column, log-probability, whether U·Σw lies within BOUNDARY_MARGIN of a cumulative
    boundary) of the exact inversion in float64."""
    z = row.astype(np.float64) - float(row.max())
    cumulative = np.cumsum(np.exp(z))
    total = cumulative[-1]
    target = uniform * total
    column = int(np.argmax(cumulative > target)) if cumulative[-1] > target else \
        int(np.flatnonzero(np.exp(z) > 0)[-1])
    near = bool(np.any(np.abs(cumulative - target) <= BOUNDARY_MARGIN * total))
    return column, float(z[column] - math.log(total)), near


def reference_draw(values: np.ndarray, uniforms: np.ndarray, monkeypatch
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`draw_inverse_cdf_reference` on `values` with the given uniforms in place of the
    counter-based ones."""
    with monkeypatch.context() as patch:
        patch.setattr(sample_module, "uniform_noise",
                      lambda seeds, positions, tokens: torch.from_numpy(uniforms).view(-1, 1))
        columns, log_probs = draw_inverse_cdf_reference(torch.from_numpy(values),
                                                        fake_rows([0] * len(values),
                                                                  [0] * len(values)))
    return columns.numpy(), log_probs.numpy()


def test_draw_matches_the_exact_inversion_and_the_torch_reference(monkeypatch):
    pytest.importorskip("numba")
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sampler_service.kernels.cpu_draw import draw_columns
    tally = {"draws": 0, "near": 0}

    @settings(max_examples=40, deadline=None, derandomize=True)  # bounded skip tally
    @given(seed=st.integers(0, 2 ** 31),
           rows=st.one_of(st.integers(1, 12), st.integers(PARALLEL_MIN_ROWS, 12)),
           vocab=st.one_of(st.integers(1, 3000), st.integers(500, 3000)),
           scale=st.sampled_from([1e-6, 1e-3, 0.3, 1.0, 4.0, 30.0, 300.0]),
           offset=st.sampled_from([0.0, -50.0, 20.0, 1000.0, -3000.0]),
           masked=st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0]), draws=st.integers(1, 24),
           threads=st.sampled_from([1, 2, 4]))
    def check(seed, rows, vocab, scale, offset, masked, draws, threads):
        logits = random_rows(seed, rows, vocab, scale, offset, masked)
        # every row `draws` times, with uniforms spread over (0, 1) and its two ends
        values = np.ascontiguousarray(np.repeat(logits, draws, axis=0))
        rng = np.random.default_rng(seed + 1)
        uniforms = rng.random(values.shape[0])
        extreme = rng.random(values.shape[0]) < 0.1
        uniforms[extreme] = rng.choice([TOP_UNIFORM, BOTTOM_UNIFORM], int(extreme.sum()))
        before = values.copy()
        columns, log_probs = draw_columns(values, values.max(axis=1), uniforms, threads)
        assert np.array_equal(values, before)
        assert columns.dtype == np.int64 and log_probs.dtype == np.float64
        ref_columns, ref_log_probs = reference_draw(values, uniforms, monkeypatch)
        for r in range(values.shape[0]):
            column, log_prob, near = exact_draw(values[r], uniforms[r])
            assert 0 <= columns[r] < vocab and np.isfinite(values[r, columns[r]])
            assert 0 <= ref_columns[r] < vocab and np.isfinite(values[r, ref_columns[r]])
            if not extreme[r]:  # U·Σw within rounding of Σw is near a boundary by design
                tally["draws"] += 1
                tally["near"] += near
            if near:
                continue
            assert columns[r] == column, (r, columns[r], column)
            assert ref_columns[r] == column, (r, ref_columns[r], column)
            assert abs(log_probs[r] - log_prob) <= 1e-6 * max(1.0, abs(log_prob))
            assert abs(ref_log_probs[r] - log_probs[r]) <= 1e-6 * max(1.0, abs(log_prob))

    check()
    assert tally["draws"] >= 400
    assert tally["near"] <= 0.01 * tally["draws"], tally


def sparse_row(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of a row's finite entries in token-id order: the row truncated."""
    ids = torch.nonzero(torch.isfinite(row)).flatten()
    return row[ids], ids


@pytest.mark.parametrize("masked", [0.0, 0.5, 0.99])
def test_a_dense_row_and_its_truncation_draw_the_same_token(masked):
    """The kernel sums in column order in float64: −inf columns add exact zeros, so the dense
    row and its finite entries alone draw the same token with the same log-probability, for
    every (seed, position)."""
    pytest.importorskip("numba")
    draws, vocab = 600, 3000
    logits = torch.from_numpy(random_rows(int(masked * 100), 3, vocab, 2.0, 5.0, masked))
    logits[2, logits[2].isfinite()] *= 30  # peaked: most finite tokens far below the best
    batch = fake_rows(list(range(draws)), [(i * 7919) % 1000 for i in range(draws)])
    drawn = []
    for row in logits:
        values, ids = sparse_row(row)
        dense_columns, dense_log_probs = draw_inverse_cdf(row.expand(draws, -1).contiguous(), batch)
        columns, log_probs = draw_inverse_cdf(values.expand(draws, -1).contiguous(), batch)
        assert torch.equal(ids[columns], dense_columns)
        assert torch.equal(log_probs, dense_log_probs)
        assert bool(torch.isfinite(row[dense_columns]).all())
        drawn.append(len(dense_columns.unique()))
        # the reference (float32 cumsum) too: masked columns add exact zeros
        reference = draw_inverse_cdf_reference(row.expand(draws, -1).contiguous(), batch)
        truncated = draw_inverse_cdf_reference(values.expand(draws, -1).contiguous(), batch)
        assert torch.equal(ids[truncated[0]], reference[0])
        # through the selector: a sparse batch in any order, with −inf entries left in it
        width = values.numel() + 3
        order = torch.randperm(width, generator=torch.Generator().manual_seed(width))
        masked_ids = torch.nonzero(~torch.isfinite(row)).flatten()[:3]
        if masked_ids.numel() == 3:
            sparse_ids = torch.cat([ids, masked_ids])[order].expand(draws, -1).contiguous()
            sparse_values = torch.cat([values, torch.full((3,), -INF)])[order]
            candidates = Candidates(sparse_values.expand(draws, -1).contiguous(), sparse_ids,
                                    vocab=vocab)
            tokens = Sample().select(candidates, {}, batch)
            assert torch.equal(tokens, Sample().select(Candidates(row.expand(draws, -1).clone()),
                                                       {}, batch))
            assert torch.equal(tokens, dense_columns)
    assert drawn[0] > 10 and drawn[1] > 1  # the draws differ (the peaked row may not)


def test_grid_uniforms_reproduce_the_softmax():
    """N uniforms (k + ½)/N: each column is drawn by the uniforms in its CDF interval, so its
    frequency is its probability to within 1/N."""
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_draw import draw_columns
    n = 20000
    row = np.array([0.5, 2.0, -1.0, -np.inf, 1.5, 0.0], dtype=np.float32)
    values = np.ascontiguousarray(np.broadcast_to(row, (n, row.shape[0])))
    uniforms = (np.arange(n) + 0.5) / n
    columns, log_probs = draw_columns(values, values.max(axis=1), uniforms, 4)
    frequencies = np.bincount(columns, minlength=row.shape[0]) / n
    probs = torch.softmax(torch.from_numpy(row).double(), dim=0).numpy()
    assert np.abs(frequencies - probs).max() <= 1e-3
    assert np.abs(frequencies - probs).max() <= 1.0 / n + 1e-9
    assert frequencies[3] == 0.0
    assert np.all(np.diff(columns) >= 0)  # monotone in U
    assert np.allclose(log_probs, np.log(probs[columns]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("uniform", [TOP_UNIFORM, 1.0 - 1e-12, 1.0 - 1e-9, 1.0],
                         ids=["top-of-grid", "1-1e-12", "1-1e-9", "one"])
def test_a_uniform_near_one_draws_the_last_weighted_column(uniform, monkeypatch):
    """Never a masked column, never −1: the last column whose weight is positive (finite tokens
    87 nats below the best weigh exactly 0 in the kernel's exp)."""
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_draw import draw_columns
    rows = [
        [0.0, 1.0, -INF, 2.0, -INF, -INF],  # trailing −inf
        [-INF, -INF, 3.0, -INF, -INF, -INF],  # one finite token
        [1.0, 0.5, 0.25, -INF, 1.0 - 90.0, 1.0 - 200.0],  # trailing weightless finite tokens
        [-INF, -INF, -INF, -INF, -INF, 7.0],  # the last column alone
        [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
    ]
    expected = [3, 2, 2, 5, 5]
    for threads, copies in ((1, 1), (4, 3)):  # one thread, and the parallel path
        values = np.ascontiguousarray(np.tile(np.array(rows, dtype=np.float32), (copies, 1)))
        uniforms = np.full(values.shape[0], uniform)
        columns, log_probs = draw_columns(values, values.max(axis=1), uniforms, threads)
        assert columns.tolist() == expected * copies
        assert np.all(np.isfinite(log_probs)) and np.all(log_probs <= 0)
        reference, _ = reference_draw(values, uniforms, monkeypatch)
        assert reference.tolist() == expected * copies
    # the smallest uniform draws the first weighted column
    columns, _ = draw_columns(values, values.max(axis=1), np.full(values.shape[0], BOTTOM_UNIFORM),
                              2)
    assert columns.tolist() == [0, 2, 0, 5, 0] * 3


def test_a_rows_draw_does_not_depend_on_its_batch_or_the_threads():
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_draw import draw_columns
    rows = PARALLEL_MIN_ROWS + 4
    values = random_rows(9, rows, 3000, 1.0, 0.0, 0.3)
    values[3, 5:] = -np.inf
    values[3, 0] = 0.0
    best = values.max(axis=1)
    uniforms = np.linspace(0.01, 0.99, rows)
    columns, log_probs = draw_columns(values, best, uniforms, 4)
    one = draw_columns(values, best, uniforms, 1)
    assert np.array_equal(one[0], columns) and np.array_equal(one[1], log_probs)
    for r in range(rows):
        alone = draw_columns(values[r:r + 1], best[r:r + 1], uniforms[r:r + 1], 4)
        assert alone[0][0] == columns[r] and alone[1][0] == log_probs[r], r
    assert len(set(columns.tolist())) > rows // 2
    # through draw_inverse_cdf: a row alone draws as it does in the batch
    batch = fake_rows(list(range(rows)), [11] * rows)
    together = draw_inverse_cdf(torch.from_numpy(values), batch)
    for r in (0, 3, rows - 1):
        alone = draw_inverse_cdf(torch.from_numpy(values[r:r + 1]), fake_rows([r], [11]))
        assert alone[0][0] == together[0][r] and alone[1][0] == together[1][r]
    expected = draw_columns(values, best, row_uniforms(batch), 1)
    assert torch.equal(together[0], torch.from_numpy(expected[0]))
