"""The logits of one step request's rows: some dense, some sparse (K best entries + tail).

A request's row r is either a dense row of `dense` [D, V] or a sparse row of `sparse` (see
`sampler_service.policy.sparse.SparseLogits`); `dense_rows` and `sparse_rows` give the request
row of each, ascending. The service asks for the rows of one sequence or of many with `take`,
which keeps a single-kind request's tensor as it is (no copy) when it asks for every row.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from sampler_service.policy.sparse import SparseLogits
    from sampler_service.policy.statistics import RawStatistics


@dataclass(frozen=True)
class StepLogits:
    """Dense rows [D, V] and sparse rows of one request, each with its request row index."""

    dense: torch.Tensor | None
    dense_rows: tuple[int, ...]
    sparse: "SparseLogits | None" = None
    sparse_rows: tuple[int, ...] = ()
    #: The caller checked the dense values already (no NaN or +inf, a finite logit per row).
    checked: bool = False
    #: The dense rows' raw statistics when the check computed them (`raw_statistics` without
    #: top entries), for the engine to reuse; None: not computed.
    statistics: "RawStatistics | None" = None

    def statistics_of(self, rows: Sequence[int]) -> "RawStatistics | None":
        """The raw statistics of dense request rows `rows`, when known."""
        if self.statistics is None:
            return None
        if list(rows) == list(self.dense_rows):
            return self.statistics
        index = self._dense_index
        return self.statistics.select(torch.tensor([index[r] for r in rows]))

    @classmethod
    def of_dense(cls, logits: torch.Tensor) -> "StepLogits":
        """Every row dense: `logits` [rows, V]."""
        return cls(logits, tuple(range(logits.shape[0])))

    @property
    def rows(self) -> int:
        return len(self.dense_rows) + len(self.sparse_rows)

    @property
    def vocab(self) -> int:
        return self.dense.shape[1] if self.dense is not None else self.sparse.vocab

    @property
    def device(self) -> torch.device:
        return self.dense.device if self.dense is not None else self.sparse.values.device

    def is_sparse(self, row: int) -> bool:
        return row in self._sparse_index

    @functools.cached_property
    def _sparse_index(self) -> dict[int, int]:
        return {row: i for i, row in enumerate(self.sparse_rows)}

    @functools.cached_property
    def _dense_index(self) -> dict[int, int]:
        return {row: i for i, row in enumerate(self.dense_rows)}

    def dense_of(self, rows: Sequence[int]) -> torch.Tensor:
        """[len(rows), V] dense logits of request rows `rows` (all must be dense)."""
        if self.dense is not None and list(rows) == list(self.dense_rows):
            return self.dense
        index = self._dense_index
        return self.dense.index_select(0, torch.tensor([index[r] for r in rows],
                                                       device=self.dense.device))

    def sparse_of(self, rows: Sequence[int]) -> "SparseLogits":
        """The sparse rows of request rows `rows` (all must be sparse)."""
        if list(rows) == list(self.sparse_rows):
            return self.sparse
        index = self._sparse_index
        return self.sparse.select(torch.tensor([index[r] for r in rows],
                                               device=self.sparse.values.device))
