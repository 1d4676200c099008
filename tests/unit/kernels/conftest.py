"""The kernels' tests run on small arrays: they take the parallel path too."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def small_arrays_run_in_parts(request, monkeypatch):
    """Below `PARALLEL_MIN_ELEMENTS` a batch runs on the calling thread; these tests check that
    a row's result does not depend on the parts, so every array counts as large here (a test
    marked `whole_threshold` keeps the real threshold)."""
    if request.node.get_closest_marker("whole_threshold") is None:
        kernels = pytest.importorskip("sampler_service.kernels")
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 0)
