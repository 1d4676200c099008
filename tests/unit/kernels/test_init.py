"""sampler_service.kernels: where compiled code is cached, and the warm-up the server runs."""
from __future__ import annotations

import os

import pytest


def test_a_read_only_install_caches_under_the_temporary_directory(monkeypatch, tmp_path):
    numba = pytest.importorskip("numba")
    import sampler_service.kernels as kernels
    package = os.path.dirname(kernels.__file__)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(kernels.os, "access",
                        lambda path, mode: not path.startswith(package))  # sources read-only
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    assert kernels._cache_directory() is True
    assert numba.config.CACHE_DIR == str(tmp_path / "sampler-sidecar-numba")
    assert (tmp_path / "sampler-sidecar-numba").is_dir()


def test_nothing_writable_compiles_without_a_cache(monkeypatch, tmp_path):
    pytest.importorskip("numba")
    import sampler_service.kernels as kernels
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(kernels.os, "access", lambda path, mode: False)
    assert kernels._cache_directory() is False
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # an explicit choice it cannot write
    assert kernels._cache_directory() is False


def test_numba_cache_dir_is_kept_when_writable_and_no_temporary_directory_is_survived(
        monkeypatch, tmp_path):
    pytest.importorskip("numba")
    import sampler_service.kernels as kernels
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    assert kernels._cache_directory() is True and (tmp_path / "cache").is_dir()
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    package = os.path.dirname(kernels.__file__)
    monkeypatch.setattr(kernels.os, "access", lambda path, mode: not path.startswith(package))

    def no_temporary_directory():
        raise FileNotFoundError("No usable temporary directory found")
    monkeypatch.setattr(kernels.tempfile, "gettempdir", no_temporary_directory)
    assert kernels._cache_directory() is False  # compiles at each start instead of failing


def test_warm_runs_every_kernel():
    pytest.importorskip("numba")
    from sampler_service import kernels
    kernels.warm()
    from sampler_service.kernels import (cpu_compact, cpu_divide, cpu_draw, cpu_mass_cut,
                                         cpu_statistics, cpu_top_k)
    for kernel in (cpu_statistics._rows, cpu_statistics._statistics_rows, cpu_divide._rows,
                   cpu_divide._rows_in_place, cpu_compact._kept_rows, cpu_compact._fill,
                   cpu_top_k._rows, cpu_mass_cut._rows, cpu_mass_cut._beyond_rows, cpu_draw._rows):
        assert kernel.signatures, kernel  # compiled (or loaded) for float32 rows


@pytest.mark.whole_threshold
@pytest.mark.parametrize("rows, columns, parts", [(4, 1 << 16, 1), (64, 1024, 1),
                                                  (64, 4096, 2), (8, 1 << 15, 2)])
def test_small_batches_run_on_the_calling_thread(rows, columns, parts):
    np = pytest.importorskip("numpy")
    pytest.importorskip("numba")
    import threading

    from sampler_service.kernels import run_rows
    seen = []

    def kernel(start, stop, array):
        seen.append((start, stop, threading.current_thread() is threading.main_thread()))

    run_rows(kernel, rows, 2, np.zeros((rows, columns), dtype=np.float32))
    assert len(seen) == parts and sorted(s[:2] for s in seen)[0][0] == 0
    assert sum(stop - start for start, stop, _ in seen) == rows
    assert sum(on_caller for _, _, on_caller in seen) == 1
