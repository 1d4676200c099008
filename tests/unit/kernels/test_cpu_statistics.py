"""sampler_service.kernels.cpu_statistics (the fused statistics and moments kernels) against
float64 torch, and `raw_statistics` (the fused path) against `raw_statistics_reference` (torch
float32)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampler_service.kernels import PARALLEL_MIN_ROWS
from sampler_service.policy.statistics import raw_statistics, raw_statistics_reference

INF = math.inf


def make_rows(seed: int, rows: int, vocab: int, scale: float, offset: float, masked: float,
              ties: int) -> torch.Tensor:
    """[rows, vocab] float32: normal logits · scale + offset, a fraction `masked` of them −inf
    (never a whole row), `ties` more copies of each row's maximum at random columns."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale + offset
    logits = logits.float()
    logits[torch.rand(rows, vocab, generator=generator) < masked] = -INF
    keep = torch.randint(0, vocab, (rows,), generator=generator)
    row_index = torch.arange(rows)
    logits[row_index, keep] = torch.randn(rows, generator=generator) * scale + offset
    best = logits.amax(dim=1)
    for _ in range(ties):
        logits[row_index, torch.randint(0, vocab, (rows,), generator=generator)] = best
    return logits


def float64_statistics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-normaliser, entropy, varentropy) [R] in float64, straight from log_softmax."""
    values = logits.double()
    logp = torch.log_softmax(values, dim=1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)
    centred = torch.where(p > 0, logp + entropy.unsqueeze(1), torch.zeros_like(p))
    return torch.logsumexp(values, dim=1), entropy, (p * centred * centred).sum(dim=1)


def kernel_statistics(logits: torch.Tensor, threads: int):
    """(log-normaliser, entropy, varentropy, second moment Σw·z²/Σw) [R] float64 from
    `row_moments`, combined as sampler_service.policy.statistics does."""
    from sampler_service.kernels.cpu_statistics import row_moments
    rows = logits.contiguous().numpy()
    best = rows.max(axis=1)
    moments = row_moments(rows, best, threads)
    assert moments.shape == (rows.shape[0], 3) and moments.dtype == np.float64
    total, first, second = moments.T
    assert (total >= 1.0).all()  # the best token alone weighs e^0 = 1
    mean = first / total
    log_total = np.log(total)
    return (log_total + best.astype(np.float64), log_total - mean,
            np.maximum(second / total - mean * mean, 0.0), second / total)


def test_row_moments_and_raw_statistics_match_float64():
    pytest.importorskip("numba")
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(seed=st.integers(0, 2 ** 31),
           rows=st.one_of(st.integers(1, 12), st.integers(PARALLEL_MIN_ROWS, 12)),
           vocab=st.one_of(st.integers(1, 3000), st.integers(500, 3000)),
           scale=st.sampled_from([1e-3, 0.3, 1.0, 4.0, 30.0, 300.0]),
           offset=st.sampled_from([0.0, -50.0, 20.0, 1000.0, -3000.0]),
           masked=st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0]), ties=st.integers(0, 4),
           threads=st.sampled_from([1, 2, 4]))
    def check(seed, rows, vocab, scale, offset, masked, ties, threads):
        logits = make_rows(seed, rows, vocab, scale, offset, masked, ties)
        before = logits.clone()
        normalizer, entropy, varentropy = (t.numpy() for t in float64_statistics(logits))
        k_normalizer, k_entropy, k_varentropy, k_second = kernel_statistics(logits, threads)
        assert np.all(np.abs(k_normalizer - normalizer) <= 1e-6 * np.maximum(1, np.abs(normalizer)))
        assert np.all(np.abs(k_entropy - entropy) <= 1e-6)
        # V = E z² − (E z)²: its rounding error scales with the second moment.
        assert np.all(np.abs(k_varentropy - varentropy) <= 1e-6 * np.maximum(1, k_second))

        fused = raw_statistics(logits)
        reference = raw_statistics_reference(logits)
        assert torch.equal(logits, before)
        # best_id: the lowest index of the maximum (ties were planted at random columns).
        first_best = torch.tensor([int(torch.nonzero(row == row.max())[0]) for row in logits])
        assert torch.equal(fused.best_id, first_best)
        assert torch.equal(reference.best_id, first_best)
        for name in ("log_normalizer", "entropy", "varentropy"):
            a, b = getattr(fused, name), getattr(reference, name)
            assert a.dtype == torch.float32 and a.shape == (rows,)
            assert torch.all((a - b).abs() <= 4e-6 * b.abs().clamp(min=1)), name
        assert fused.top_values.shape == (rows, 0) and fused.top_ids.shape == (rows, 0)

    check()


def test_a_rows_moments_do_not_depend_on_its_batch_or_the_threads():
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_statistics import row_moments
    logits = make_rows(3, PARALLEL_MIN_ROWS + 5, 2000, 3.0, 1.0, 0.2, 2).numpy()
    best = logits.max(axis=1)
    one_thread = row_moments(logits, best, 1)
    assert np.array_equal(one_thread, row_moments(logits, best, 4))
    for r in (0, 7, PARALLEL_MIN_ROWS + 4):  # alone, below PARALLEL_MIN_ROWS: bit for bit
        assert np.array_equal(row_moments(logits[r:r + 1], best[r:r + 1], 4)[0], one_thread[r])
    assert not np.array_equal(one_thread, row_moments(logits, best + 1, 1))  # best enters every z


def shaped_rows(seed: int, rows: int, vocab: int, shape: str, scale: float,
                offset: float) -> torch.Tensor:
    """[rows, vocab] float32 rows that move `row_statistics`' running maximum in every way:
    "ascending" (a new maximum in every block), "late" (the maximum after many blocks, far
    above the rest), "zeros" (maximum 0 held as −0 and +0 in different blocks), "one" (a
    single finite value), "levels" (few distinct values: ties everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale + offset
    if shape == "ascending":
        logits = torch.sort(noise, dim=1).values
    elif shape == "late":
        logits = noise - 40.0 * scale
        logits[:, vocab * 3 // 4:] += 40.0 * scale
    elif shape == "zeros":
        logits = -noise.abs() - 1.0
        logits[:, vocab // 5] = -0.0
        logits[:, vocab - 1] = 0.0
    elif shape == "one":
        logits = torch.full((rows, vocab), -INF, dtype=torch.float64)
        logits[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=generator)] = offset
    else:
        logits = torch.randint(0, 3, (rows, vocab), generator=generator).double() * scale + offset
    return logits.float()


def test_row_statistics_match_float64_and_the_first_argmax():
    pytest.importorskip("numba")
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from sampler_service.kernels.cpu_statistics import row_statistics

    @settings(max_examples=80, deadline=None)
    @given(seed=st.integers(0, 2 ** 31), rows=st.sampled_from([1, 3, PARALLEL_MIN_ROWS + 1]),
           vocab=st.one_of(st.integers(1, 40), st.integers(500, 2600)),
           shape=st.sampled_from(["ascending", "late", "zeros", "one", "levels", "random"]),
           scale=st.sampled_from([1e-3, 1.0, 4.0, 30.0]),
           offset=st.sampled_from([0.0, -50.0, 1000.0, -3000.0]),
           masked=st.sampled_from([0.0, 0.3, 0.9]), threads=st.sampled_from([1, 2, 4]))
    def check(seed, rows, vocab, shape, scale, offset, masked, threads):
        if shape == "random":
            logits = make_rows(seed, rows, vocab, scale, offset, masked, 2)
        else:
            logits = shaped_rows(seed, rows, vocab, shape, scale, offset)
            best = logits.amax(dim=1, keepdim=True)
            drop = torch.rand(rows, vocab, generator=torch.Generator().manual_seed(seed)) < masked
            logits[drop & (logits < best)] = -INF  # never a row's maximum
        best_id, normalizer, entropy, varentropy, problem = row_statistics(logits.numpy(),
                                                                           threads)
        assert best_id.dtype == np.int64 and normalizer.dtype == np.float32
        assert not problem.any()
        assert np.array_equal(best_id, torch.argmax(logits, dim=1).numpy())  # ties: the first
        exact = [t.numpy() for t in float64_statistics(logits)]
        # V = E z² − (E z)² rounds at the scale of E z² (z = l − max, E z = log s − H)
        mean = exact[0] - logits.double().amax(dim=1).numpy() - exact[1]
        second = exact[2] + mean * mean
        assert np.all(np.abs(normalizer - exact[0]) <= 1e-6 * np.maximum(1, np.abs(exact[0])))
        assert np.all(np.abs(entropy - exact[1]) <= 1e-6 * np.maximum(1, exact[1]))
        assert np.all(np.abs(varentropy - exact[2]) <= 1e-6 * np.maximum(1, second))
        reference = raw_statistics_reference(logits)
        for name, value in (("log_normalizer", normalizer), ("entropy", entropy),
                            ("varentropy", varentropy)):
            b = getattr(reference, name).numpy()
            assert np.all(np.abs(value - b) <= 4e-6 * np.maximum(1, np.abs(b))), name

    check()


def test_row_statistics_of_a_row_do_not_depend_on_its_batch_or_the_threads():
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_statistics import row_statistics
    logits = make_rows(4, PARALLEL_MIN_ROWS + 5, 3000, 3.0, 1.0, 0.2, 2).numpy()
    one_thread = row_statistics(logits, 1)
    for a, b in zip(one_thread, row_statistics(logits, 4)):
        assert np.array_equal(a, b)
    for r in (0, 7, PARALLEL_MIN_ROWS + 4):
        for a, b in zip(row_statistics(logits[r:r + 1], 4), one_thread):  # problem included
            assert np.array_equal(a[0], b[r])


def test_row_statistics_of_a_row_without_a_finite_value_are_nan():
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_statistics import NO_FINITE, row_statistics
    logits = np.full((2, 1100), -np.inf, dtype=np.float32)
    logits[1, 1050] = 2.0
    best_id, normalizer, entropy, varentropy, problem = row_statistics(logits, 1)
    assert best_id.tolist() == [0, 1050] and problem.tolist() == [NO_FINITE, 0]
    assert np.isnan(normalizer[0]) and np.isnan(entropy[0]) and np.isnan(varentropy[0])
    assert (normalizer[1], entropy[1], varentropy[1]) == (2.0, 0.0, 0.0)


def test_row_statistics_flag_every_nan_and_plus_inf_wherever_it_lies():
    """A NaN of either sign (any payload) or a +inf in any block is NAN_OR_INF, whatever the
    row's maximum; -inf entries are fine; exactly the same rows as validation's reference
    (the row's max is NaN or +inf)."""
    pytest.importorskip("numba")
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from sampler_service.kernels.cpu_statistics import NAN_OR_INF, NO_FINITE, row_statistics
    bads = [np.float32(np.nan), -np.float32(np.nan), np.float32(np.inf),
            np.array([0x7F800001], np.uint32).view(np.float32)[0],   # a signalling NaN
            np.array([0xFFFFFFFF], np.uint32).view(np.float32)[0]]   # a negative NaN

    @settings(max_examples=60, deadline=None)
    @given(vocab=st.integers(1, 1600), at=st.integers(0, 10 ** 6), bad=st.integers(0, 4),
           base=st.sampled_from(["normal", "minus_inf", "huge"]), seed=st.integers(0, 1000))
    def check(vocab, at, bad, base, seed):
        rng = np.random.default_rng(seed)
        row = {"normal": rng.standard_normal(vocab).astype(np.float32),
               "minus_inf": np.full(vocab, -np.inf, np.float32),
               "huge": np.full(vocab, np.finfo(np.float32).max, np.float32)}[base]
        clean = row.copy()
        row[at % vocab] = bads[bad]
        problem = row_statistics(np.stack([clean, row]), 1)[4]
        assert problem.tolist() == [NO_FINITE if base == "minus_inf" else 0, NAN_OR_INF]
        torch_max = torch.from_numpy(row).amax()
        assert not torch.isfinite(torch_max)  # the reference refuses it too

    check()


@pytest.mark.parametrize("vocab", [1, 7, 513, 3000])
def test_point_mass_has_zero_entropy_and_varentropy(vocab):
    pytest.importorskip("numba")
    logits = torch.full((PARALLEL_MIN_ROWS + 1, vocab), -INF)
    columns = torch.arange(PARALLEL_MIN_ROWS + 1) * 37 % vocab
    logits[torch.arange(PARALLEL_MIN_ROWS + 1), columns] = torch.linspace(-500, 500,
                                                                          PARALLEL_MIN_ROWS + 1)
    if vocab > 1:  # tokens far below the best (z < −87) weigh exactly nothing either
        logits[:, (columns[0] + 1) % vocab] = logits.amax(dim=1) - 200.0
    for stats in (raw_statistics(logits), raw_statistics(logits[:1])):
        assert torch.all(stats.entropy == 0.0)
        assert torch.all(stats.varentropy == 0.0)
        rows = stats.best_id.shape[0]
        assert torch.equal(stats.best_id, columns[:rows])
        assert torch.equal(stats.log_normalizer, logits[:rows].amax(dim=1))


@pytest.mark.parametrize("top_n", [1, 5, 40])
def test_top_n_values_are_torch_topk(top_n):
    pytest.importorskip("numba")
    logits = make_rows(11, 9, 1500, 2.0, 0.0, 0.3, 3)
    logits[4, :] = -INF
    logits[4, :3] = torch.tensor([1.0, 2.0, 0.5])  # fewer finite tokens than top_n
    stats = raw_statistics(logits, top_n=top_n)
    expected = torch.topk(logits, top_n, dim=1)
    assert stats.top_values.shape == (9, top_n) and stats.top_ids.shape == (9, top_n)
    assert torch.equal(stats.top_values, expected.values)
    assert torch.equal(logits.gather(1, stats.top_ids), stats.top_values)
    assert torch.equal(raw_statistics_reference(logits, top_n).top_values, expected.values)
    # top_n past the vocabulary: the whole row, best first
    small = logits[:, :3].clone()
    small[:, 0] = 0.0
    whole = raw_statistics(small, top_n=top_n)
    best_first = torch.sort(small, dim=1, descending=True).values
    assert torch.equal(whole.top_values, best_first[:, :top_n])


def test_select_picks_rows_of_every_field():
    pytest.importorskip("numba")
    logits = make_rows(5, 6, 300, 2.0, 0.0, 0.1, 1)
    stats = raw_statistics(logits, top_n=3)
    rows = torch.tensor([4, 1])
    picked = stats.select(rows)
    alone = raw_statistics(logits[rows], top_n=3)
    for name in ("log_normalizer", "entropy", "varentropy", "best_id", "top_values", "top_ids"):
        assert torch.equal(getattr(picked, name), getattr(stats, name)[rows]), name
        assert torch.equal(getattr(picked, name), getattr(alone, name)), name
    bare = type(stats)(stats.log_normalizer, stats.entropy, stats.varentropy).select(rows)
    assert bare.best_id is None and bare.top_values is None
    assert torch.equal(bare.entropy, stats.entropy[rows])


def test_row_std_matches_the_torch_reference_and_float64():
    pytest.importorskip("numba")
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    from sampler_service.policy.processors.truncation import finite_std, finite_std_reference

    @hypothesis.settings(max_examples=40, deadline=None)
    @hypothesis.given(seed=st.integers(0, 2**31), rows=st.sampled_from([1, 3, PARALLEL_MIN_ROWS + 2]),
                      vocab=st.integers(1, 2500), masked=st.sampled_from([0.0, 0.3, 0.99, 1.0]),
                      scale=st.sampled_from([1e-3, 1.0, 30.0]), offset=st.sampled_from([0.0, 500.0]))
    def check(seed, rows, vocab, masked, scale, offset):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(rows, vocab, generator=generator) * scale + offset
        logits[torch.rand(rows, vocab, generator=generator) < masked] = -INF
        fast, reference = finite_std(logits), finite_std_reference(logits)
        values = logits.double()
        finite = torch.isfinite(values)
        count = finite.sum(dim=1).clamp(min=1)
        mean = torch.where(finite, values, 0.0).sum(dim=1) / count
        exact = torch.sqrt((torch.where(finite, values - mean.unsqueeze(1), 0.0) ** 2).sum(dim=1)
                           / count)
        tolerance = 1e-6 * (exact + values.masked_fill(~finite, 0).abs().amax(dim=1) * 1e-2 + 1e-3)
        assert fast.dtype == torch.float32 and bool(torch.all(fast >= 0))
        assert bool(torch.all((fast.double() - exact).abs() <= tolerance)), (fast, exact)
        assert bool(torch.all((fast.double() - exact).abs()
                              <= (reference.double() - exact).abs() + tolerance))
        assert bool(torch.all(fast[~finite.any(dim=1)] == 0))

    check()


def test_problem_codes_are_the_policy_layers():
    pytest.importorskip("numba")
    from sampler_service.kernels import cpu_statistics
    from sampler_service.policy import statistics
    assert ((cpu_statistics.FINE, cpu_statistics.NAN_OR_INF, cpu_statistics.NO_FINITE)
            == (statistics.FINE, statistics.NAN_OR_INF, statistics.NO_FINITE))
