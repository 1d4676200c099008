"""sampler_service.kernels.cpu_mass_cut (top-p's and typical-p's mass cut) against an exact
float64 walk, and `TopP` / `TypicalP` on their fast path (`_fast_mass_cut`) against their torch
path (prefix + `mass_cut_column`, what runs when `_fast_mass_cut` returns None).

The exact walk: with w = exp(l − best) and key |l − best − center| in float64, tokens sorted
by key (ties by column) are taken while the mass before them is below p·Σw (the first always
stays); the kept set is every token whose key is ≤ the last taken one's (ties kept). A row is
ambiguous, and its kept set may differ, when the mass before a boundary token lies within
1e-6 (relative) of p·Σw, or when another key lies within float32 rounding of the boundary key.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sampler_service.kernels import PARALLEL_MIN_ROWS
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import truncation
from sampler_service.policy.processors.truncation import TopP, TypicalP

#: Relative distance of p·Σw from a boundary mass within which the kept set may differ.
MASS_MARGIN = 1e-6
#: Width of the kernel's histogram bins (nats): its first bin holds keys below this.
FIRST_BIN = 1 / 32


def random_rows(seed: int, rows: int, vocab: int, scale: float, offset: float, masked: float,
                ties: int) -> np.ndarray:
    """[rows, vocab] C-contiguous float32: normal logits · scale + offset, a fraction `masked`
    of them −inf (one finite entry per row at least), `ties` more copies of each row's best."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, vocab)) * scale + offset).astype(np.float32)
    logits[rng.random((rows, vocab)) < masked] = -np.inf
    index = np.arange(rows)
    logits[index, rng.integers(0, vocab, rows)] = (rng.standard_normal(rows) * scale
                                                   + offset).astype(np.float32)
    best = logits.max(axis=1)
    for _ in range(ties):
        logits[index, rng.integers(0, vocab, rows)] = best
    return np.ascontiguousarray(logits)


def zipf_rows(seed: int, rows: int, vocab: int, temperature: float) -> torch.Tensor:
    """[rows, vocab] float32 logits shaped like an LLM's (benchmarks' `zipf_logits`):
    p ∝ rank^-1.1 with the ranks randomly assigned to token ids, a little noise, divided by
    the temperature."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, vocab, generator=generator), dim=1).double() + 1.0
    noise = 0.1 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    return ((-1.1 * torch.log(ranks) + noise) / temperature).float()


def kernel_center(logits: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Typical's center Σw·z/Σw per row, float32, as `_fast_mass_cut` computes it."""
    from sampler_service.kernels.cpu_statistics import row_moments
    moments = row_moments(logits, best, 1)
    return (moments[:, 1] / moments[:, 0]).astype(np.float32)


def exact_cut(row: np.ndarray, best: float, center: float, p: float,
              margin: float = MASS_MARGIN, center_error: float = 0.0
              ) -> tuple[np.ndarray, bool, bool]:
    """The exact float64 walk on one row: (kept [V] bool, whether a boundary mass lies within
    `margin` of p·Σw, whether another key lies within rounding of the last kept key).
    `center_error` widens the latter by the error of a center the caller computed elsewhere."""
    z = row.astype(np.float64) - float(best)
    weights = np.exp(z)
    key = np.abs(z - float(center))
    order = np.lexsort((np.arange(z.shape[0]), key))
    ordered = weights[order]
    cumulative = np.cumsum(ordered)
    before = cumulative - ordered
    target = p * cumulative[-1]
    taken = max(1, int(np.count_nonzero(before < target)))
    last = key[order[taken - 1]]
    near = any(abs(before[i] - target) <= margin * target
               for i in (taken - 1, taken) if i < z.shape[0])
    finite = np.isfinite(z)
    size = np.maximum(np.abs(np.where(finite, z, 0.0)), abs(z[order[taken - 1]])) + abs(center)
    rounding = 2.0 ** -22 * size + 2 * center_error
    tie = bool(np.any(finite & (key != last) & (np.abs(key - last) <= rounding)))
    return key <= last, near, tie


def kernel_kept(logits: np.ndarray, best: np.ndarray, center: np.ndarray, columns: np.ndarray,
                keys: np.ndarray, typical: bool, threads: int) -> np.ndarray:
    """[R, V] the kernel's kept sets, as the processors build them: top-p keeps the logits ≥
    the one at the returned column, typical the keys not beyond the returned key."""
    from sampler_service.kernels.cpu_mass_cut import keys_beyond
    if typical:
        return ~keys_beyond(logits, best, center, keys, threads)
    threshold = logits[np.arange(logits.shape[0]), columns]
    return logits >= threshold[:, None]


def test_mass_cuts_match_the_exact_float64_walk():
    pytest.importorskip("numba")
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sampler_service.kernels.cpu_mass_cut import keys_beyond, mass_cuts
    tally = {"rows": 0, "near": 0, "tie": 0}

    @settings(max_examples=60, deadline=None, derandomize=True)  # bounded skip tally
    @given(seed=st.integers(0, 2 ** 31),
           rows=st.one_of(st.integers(1, 12), st.integers(PARALLEL_MIN_ROWS, 12)),
           vocab=st.one_of(st.integers(1, 3000), st.integers(500, 3000)),
           scale=st.sampled_from([1e-6, 1e-3, 0.3, 1.0, 4.0, 30.0, 300.0]),
           offset=st.sampled_from([0.0, -50.0, 20.0, 1000.0, -3000.0]),
           masked=st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0]), ties=st.integers(0, 3),
           typical=st.booleans(), threads=st.sampled_from([1, 2, 4]))
    def check(seed, rows, vocab, scale, offset, masked, ties, typical, threads):
        logits = random_rows(seed, rows, vocab, scale, offset, masked, ties)
        best = logits.max(axis=1)
        center = kernel_center(logits, best) if typical else np.zeros(rows, dtype=np.float32)
        # p uniform, tiny, exact halves (boundaries on tied masses) or just below 1; never 1
        # itself (TopP's off value).
        rng = np.random.default_rng(seed + 1)
        p = np.where(rng.random(rows) < 0.5, rng.uniform(1e-9, 0.999, rows),
                     rng.choice([1e-9, 0.5, 0.9, 0.999, 0.9999999], rows))
        before = logits.copy()
        columns, keys = mass_cuts(logits, best, center, p, threads)
        assert np.array_equal(logits, before)
        assert columns.shape == keys.shape == (rows,)
        assert columns.dtype == np.int64 and keys.dtype == np.float32
        kept = kernel_kept(logits, best, center, columns, keys, typical, threads)
        for r in range(rows):
            column = columns[r]
            assert 0 <= column < vocab and np.isfinite(logits[r, column])
            # the returned key is the column's own, and the column is kept (the first token
            # always stays)
            assert keys[r] == np.abs((logits[r, column] - best[r]) - center[r])
            assert kept[r, column]
            expected, near, tie = exact_cut(logits[r], best[r], center[r], p[r])
            tally["rows"] += 1
            tally["near"] += near
            tally["tie"] += tie
            if not (near or tie):
                assert np.array_equal(kept[r], expected), (r, int(kept[r].sum()),
                                                           int(expected.sum()))
        # +inf cuts nowhere
        assert not keys_beyond(logits, best, center, np.full(rows, np.inf, dtype=np.float32),
                               threads).any()

    check()
    assert tally["rows"] >= 120
    # p = 0.9999999 rows are mostly within rounding of the boundary by construction
    assert tally["near"] + tally["tie"] <= 0.2 * tally["rows"], tally


@pytest.mark.parametrize("typical", [False, True])
@pytest.mark.parametrize("rows", [3, PARALLEL_MIN_ROWS + 2])
def test_fraction_zero_keeps_the_first_token_and_its_ties(typical, rows):
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_mass_cut import mass_cuts
    logits = random_rows(17 + rows, rows, 2500, 1.0, 0.0, 0.2, 2)
    logits[0, :] = 1.5  # every token equally likely (and equally typical): all stay
    if typical:
        logits = np.ascontiguousarray(logits - logits.max(axis=1, keepdims=True))
    best = logits.max(axis=1)
    center = kernel_center(logits, best) if typical else np.zeros(rows, dtype=np.float32)
    key = np.abs((logits - best[:, None]) - center[:, None])
    first = key.min(axis=1)
    assert (first < FIRST_BIN).all()  # (an empty first bin: test_fraction_zero_with_...)
    for fraction in (0.0, 1e-12):
        columns, keys = mass_cuts(logits, best, center, np.full(rows, fraction), 2)
        # the lowest column among the most typical (top-p: best) tokens, and its key
        assert np.array_equal(columns, np.argmin(key, axis=1))
        assert np.array_equal(keys, first)
        kept = kernel_kept(logits, best, center, columns, keys, typical, 2)
        assert np.array_equal(kept, key == first[:, None])
    assert kept[0].all()
    assert 1 <= int(kept[1:].sum(axis=1).min())


def test_a_rows_cut_does_not_depend_on_its_batch_or_the_threads():
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_mass_cut import keys_beyond, mass_cuts
    rows = PARALLEL_MIN_ROWS + 4
    logits = random_rows(3, rows, 3000, 3.0, 1.0, 0.2, 2)
    best = logits.max(axis=1)
    p = np.linspace(0.05, 0.95, rows)
    for center in (np.zeros(rows, dtype=np.float32), kernel_center(logits, best)):
        columns, keys = mass_cuts(logits, best, center, p, 4)
        beyond = keys_beyond(logits, best, center, keys, 4)
        one = mass_cuts(logits, best, center, p, 1)
        assert np.array_equal(one[0], columns) and np.array_equal(one[1], keys)
        for r in (0, 5, rows - 1):
            alone = slice(r, r + 1)
            column, key = mass_cuts(logits[alone], best[alone], center[alone], p[alone], 4)
            assert column[0] == columns[r] and key[0] == keys[r]
            assert np.array_equal(keys_beyond(logits[alone], best[alone], center[alone], key, 4)[0],
                                  beyond[r])
        assert len(set(columns.tolist())) > 1  # the rows' cuts differ


# ---------------------------------------------------------------------------------------------
# TopP and TypicalP: fast path against torch path


def run_processor(cls, logits: torch.Tensor, args: dict[str, torch.Tensor], monkeypatch,
                  fast: bool) -> tuple[torch.Tensor, int]:
    """(kept [R, V] bool, how many times the kernel ran) of `cls` on a dense batch of `logits`,
    on its fast path or, with `_fast_mass_cut` patched to None, on its torch path."""
    from sampler_service.kernels import cpu_mass_cut
    calls = []
    real = cpu_mass_cut.mass_cuts

    def spy(*arguments):
        calls.append(arguments[0].shape[0])
        return real(*arguments)

    with monkeypatch.context() as patch:
        patch.setattr(cpu_mass_cut, "mass_cuts", spy)
        if not fast:
            patch.setattr(truncation, "_fast_mass_cut", lambda *a, **k: None)
        candidates = Candidates(logits.clone())
        cls().apply(candidates, args, None)
    return torch.isfinite(candidates.to_dense()), len(calls)


def exact_processor_cut(row: torch.Tensor, p: float, typical: bool, margin: float
                        ) -> tuple[np.ndarray, bool]:
    """(kept [V], ambiguous) of the exact walk with typical's center Σw·z/Σw in float64."""
    values = row.double().numpy()
    z = values - values.max()
    weights = np.exp(z)
    center = float((weights * z).sum() / weights.sum()) if typical else 0.0
    # the kernel's float32 center is within ~1e-6 (relative) of the exact one
    kept, near, tie = exact_cut(row.numpy(), float(row.max()), center, p, margin,
                                center_error=2e-6 * abs(center))
    return kept, near or tie


def planted_p(row: torch.Tensor, typical: bool, fraction: float, offset: float) -> float:
    """A p whose p·Σw lies `offset` (relative) from the exact mass before the token at
    `fraction` of the row's walk: rounding in the sums decides such rows."""
    values = row.double().numpy()
    z = values - values.max()
    weights = np.exp(z)
    center = (weights * z).sum() / weights.sum() if typical else 0.0
    key = np.abs(z - center)
    cumulative = np.cumsum(weights[np.lexsort((np.arange(z.shape[0]), key))])
    return float(cumulative[int(fraction * (z.shape[0] - 1))] / cumulative[-1] * (1 + offset))


@pytest.mark.parametrize("cls", [TopP, TypicalP])
@pytest.mark.parametrize("planted", [False, True])
def test_fast_path_keeps_the_torch_paths_set_and_is_the_closer_to_float64(cls, planted,
                                                                          monkeypatch):
    """Zipf-shaped rows at temperatures 0.3, 0.8 and 1.5, p uniform in (0.01, 0.99), or
    (`planted`) p·Σw planted 2e-6 (relative) beside an exact boundary mass, where the torch
    path's float32 sums may fall on the wrong side and the kernel's float64 sums may not.
    Outside rounding (1e-6 for the kernel, 1e-5 for float32 cumulative sums) both paths keep
    the exact set; the fast path matches it at least as often as the torch path."""
    pytest.importorskip("numba")
    typical = cls is TypicalP
    rows = 12
    tally = {"rows": 0, "fast": 0, "torch": 0, "ambiguous": 0}
    for case, (temperature, vocab) in enumerate([(0.3, 1500), (0.8, 1500), (1.5, 1500),
                                                 (0.3, 6000), (0.8, 6000), (1.5, 6000)]):
        logits = zipf_rows(100 * case + planted, rows, vocab, temperature)
        generator = torch.Generator().manual_seed(case)
        p = torch.rand(rows, generator=generator) * 0.98 + 0.01
        if planted:
            p = torch.tensor([planted_p(logits[r], typical, float(p[r]), (-1) ** r * 2e-6)
                              for r in range(rows)])
        args = {"p": p, "min_keep": torch.ones(rows, dtype=torch.int64)}
        fast, fast_calls = run_processor(cls, logits, args, monkeypatch, fast=True)
        slow, slow_calls = run_processor(cls, logits, args, monkeypatch, fast=False)
        assert (fast_calls, slow_calls) == (1, 0)
        for r in range(rows):
            expected, ambiguous = exact_processor_cut(logits[r], float(p[r]), typical,
                                                      MASS_MARGIN)
            _, wide = exact_processor_cut(logits[r], float(p[r]), typical, 1e-5)
            fast_exact = bool(np.array_equal(fast[r].numpy(), expected))
            tally["rows"] += 1
            tally["fast"] += fast_exact
            tally["torch"] += bool(np.array_equal(slow[r].numpy(), expected))
            tally["ambiguous"] += ambiguous
            if not ambiguous:
                assert fast_exact, (case, r, int(fast[r].sum()), int(expected.sum()))
            if not wide:
                assert torch.equal(fast[r], slow[r]), (case, r)
    assert tally["fast"] >= tally["torch"], tally
    if not planted:
        assert tally["ambiguous"] <= 0.05 * tally["rows"], tally
        assert tally["fast"] >= 0.95 * tally["rows"], tally


def test_typical_min_keep_above_one_takes_the_torch_path(monkeypatch):
    pytest.importorskip("numba")
    logits = zipf_rows(5, 4, 2000, 0.8)
    p = torch.tensor([1e-6, 0.5, 0.9, 1e-6])
    for min_keep, calls in (([1, 1, 1, 1], 1), ([1, 3, 1, 5], 0), ([2, 2, 2, 2], 0)):
        args = {"p": p, "min_keep": torch.tensor(min_keep)}
        kept, fast_calls = run_processor(TypicalP, logits, args, monkeypatch, fast=True)
        reference, _ = run_processor(TypicalP, logits, args, monkeypatch, fast=False)
        assert fast_calls == calls
        assert torch.equal(kept, reference)
        assert (kept.sum(dim=1) >= torch.tensor(min_keep)).all()
        assert int(kept[3].sum()) == min_keep[3]  # p ≈ 0: the min_keep most typical alone
    # top-p keeps its kernel whatever min_keep: the threshold is lowered afterwards
    args = {"p": p, "min_keep": torch.tensor([1, 3, 1, 5])}
    kept, fast_calls = run_processor(TopP, logits, args, monkeypatch, fast=True)
    reference, _ = run_processor(TopP, logits, args, monkeypatch, fast=False)
    assert fast_calls == 1 and torch.equal(kept, reference)
    assert kept.sum(dim=1).tolist()[::3] == [1, 5]


@pytest.mark.parametrize("cls", [TopP, TypicalP])
def test_a_rows_kept_set_is_the_same_alone_and_in_a_batch(cls):
    pytest.importorskip("numba")
    rows = 12
    logits = torch.cat([zipf_rows(7 + i, 4, 3000, temperature)
                        for i, temperature in enumerate((0.3, 0.8, 1.5))])
    p = torch.linspace(0.1, 0.95, rows)
    off = [9, 10]
    p[off] = 1.0  # off rows are left as they are
    # The kernel runs off rows at fraction 0, which needs a token within 1/32 nat of typical's
    # center (test_fraction_zero_with_an_empty_first_bin_...): true of these flat rows (T 1.5).
    z = logits[off].double() - logits[off].double().amax(dim=1, keepdim=True)
    w = torch.exp(z)
    center = (w * z).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)
    assert bool(((z - center).abs().amin(dim=1) < FIRST_BIN / 2).all())
    batch = Candidates(logits.clone())
    cls().apply(batch, {"p": p}, None)
    together = batch.to_dense()
    for r in range(rows):
        alone = Candidates(logits[r:r + 1].clone())
        cls().apply(alone, {"p": p[r:r + 1]}, None)
        assert torch.equal(alone.to_dense()[0], together[r]), r
    assert torch.equal(together[off], logits[off])
    kept = torch.isfinite(together).sum(dim=1)
    assert bool((kept[:8] < 3000).all()) and len(set(kept.tolist())) > 6


# ---------------------------------------------------------------------------------------------
# Defects found and fixed: each test failed before its fix. The first two read past an empty
# array in compiled code then (undefined behaviour, a crash at times), so they run in a child
# process.


def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_fraction_zero_with_an_empty_first_bin_keeps_the_most_typical_token():
    pytest.importorskip("numba")
    result = run_child("""
        import numpy as np, torch
        from sampler_service.kernels.cpu_mass_cut import mass_cuts
        from sampler_service.policy.candidates import Candidates
        from sampler_service.policy.processors.truncation import TypicalP
        logits = np.array([[0.0, -5.0]], dtype=np.float32)  # keys 0.0335 and 4.97: bin 0 empty
        best = logits.max(axis=1)
        center = np.array([-5 * np.exp(-5) / (1 + np.exp(-5))], dtype=np.float32)
        for _ in range(100):
            columns, keys = mass_cuts(logits, best, center, np.zeros(1), 1)
            assert columns[0] == 0 and keys[0] == abs(logits[0, 0] - center[0]), (columns, keys)
        rows = torch.tensor([[0.0, -1.0], [0.0, -5.0]])
        for _ in range(500):  # the second row is off (p = 1): the kernel runs it at fraction 0
            candidates = Candidates(rows.clone())
            TypicalP().apply(candidates, {"p": torch.tensor([0.5, 1.0])}, None)
            assert torch.equal(candidates.to_dense()[1], rows[1])
        print("ok")
        """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode,
                                                                      result.stderr[-2000:])


def test_p_just_below_one_returns_a_column_of_the_row():
    pytest.importorskip("numba")
    result = run_child("""
        import numpy as np
        from sampler_service.kernels.cpu_mass_cut import mass_cuts
        rng = np.random.default_rng(1)
        bad = 0
        for _ in range(300):
            vocab = int(rng.integers(2, 3000))
            logits = (rng.standard_normal((1, vocab)) * rng.choice([1e-3, 1.0, 4.0])
                      ).astype(np.float32)
            best = logits.max(axis=1)
            columns, keys = mass_cuts(logits, best, np.zeros(1, np.float32),
                                      np.array([0.9999999]), 1)
            bad += not (0 <= columns[0] < vocab and keys[0] == best[0] - logits[0, columns[0]])
        print("bad", bad)
        """)
    assert result.returncode == 0 and result.stdout.strip() == "bad 0", (
        result.returncode, result.stdout, result.stderr[-2000:])


def test_top_p_torch_path_just_below_one(monkeypatch):
    monkeypatch.setattr(truncation, "_fast_mass_cut", lambda *a, **k: None)
    p = torch.tensor([0.9999999])
    for seed in range(4):  # seed 1 raises
        logits = torch.from_numpy(random_rows(seed, 1, 1420, 1.0, 0.0, 0.0, 0))
        candidates = Candidates(logits.clone())
        TopP().apply(candidates, {"p": p}, None)
        expected, _, _ = exact_cut(logits[0].numpy(), float(logits.max()), 0.0, float(p))
        assert abs(int(torch.isfinite(candidates.to_dense()).sum()) - int(expected.sum())) <= 5


def test_typical_keys_are_not_rounded_at_the_scale_of_the_best_logit(monkeypatch):
    """A flat row near 1000 (keys ~1e-3 apart by 1e-6, float32 spacing 6e-5 at 1000): the
    torch path keeps the exact typical set (1019 tokens), the fast path 1052."""
    pytest.importorskip("numba")
    from sampler_service.kernels.cpu_mass_cut import mass_cuts
    logits = random_rows(5, 1, 2000, 1e-3, 1000.0, 0.0, 0)
    p = torch.tensor([0.5])
    expected, ambiguous = exact_processor_cut(torch.from_numpy(logits[0]), 0.5, True, MASS_MARGIN)
    assert not ambiguous
    reference, _ = run_processor(TypicalP, torch.from_numpy(logits), {"p": p}, monkeypatch,
                                 fast=False)
    assert np.array_equal(reference[0].numpy(), expected)
    kept, calls = run_processor(TypicalP, torch.from_numpy(logits), {"p": p}, monkeypatch,
                                fast=True)
    assert calls == 1
    assert np.array_equal(kept[0].numpy(), expected), (int(kept.sum()), int(expected.sum()))
    best = logits.max(axis=1)
    center = kernel_center(logits, best)
    columns, keys = mass_cuts(logits, best, center, np.array([0.5]), 1)
    assert keys[0] == np.abs((logits[0, columns[0]] - best[0]) - center[0])  # left to right
