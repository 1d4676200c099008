"""Token histories kept as counts, so a penalty costs O(distinct tokens), not O(length)."""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch


class TokenHistory:
    """Distinct prompt ∪ output ids (repetition penalty) and output counts (frequency/presence).

    The id tensors are built lazily and cached until the next `append`, so a step that needs
    them pays one small tensor construction per sequence at most.
    """

    def __init__(self, prompt_ids: Iterable[int], output_ids: Iterable[int] = ()):
        self._seen: dict[int, None] = dict.fromkeys(prompt_ids)  # insertion-ordered set
        self._max_id = max(self._seen, default=-1)
        self._output_counts: Counter[int] = Counter()
        self._seen_tensor: torch.Tensor | None = None
        self._counts_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        for token in output_ids:
            self.append(token)

    def copy(self) -> "TokenHistory":
        """An independent copy, O(distinct tokens) (a beam or fork branch continues from it)."""
        other = TokenHistory(())
        other._seen, other._max_id = dict(self._seen), self._max_id
        other._output_counts = Counter(self._output_counts)
        other._seen_tensor, other._counts_tensors = self._seen_tensor, self._counts_tensors
        return other

    def append(self, token_id: int) -> None:
        """Records one generated token."""
        if token_id not in self._seen:
            self._seen[token_id] = None
            self._max_id = max(self._max_id, token_id)
            self._seen_tensor = None
        self._output_counts[token_id] += 1
        self._counts_tensors = None

    @property
    def max_token_id(self) -> int:
        """Largest id seen so far (-1 when empty), kept as ids arrive: every step checks it
        against the vocabulary size."""
        return self._max_id

    def seen_ids(self) -> torch.Tensor:
        """Distinct ids of prompt ∪ output, int64, in first-seen order."""
        if self._seen_tensor is None:
            self._seen_tensor = torch.tensor(list(self._seen), dtype=torch.int64)
        return self._seen_tensor

    def output_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct output ids int64, their counts float32)."""
        if self._counts_tensors is None:
            ids = list(self._output_counts)
            self._counts_tensors = (
                torch.tensor(ids, dtype=torch.int64),
                torch.tensor([self._output_counts[i] for i in ids], dtype=torch.float32),
            )
        return self._counts_tensors
