"""`Candidates`: a batch of rows' logits as they pass through a chain, dense or truncated.

A chain starts dense: `values` is [R, V] and column j is token j. Once a truncation bounds
every row of the batch (top-k, top-p, or any threshold that keeps few tokens:
`mask_below`'s compaction), the batch turns sparse: `values` [R, K] holds each row's surviving
logits and `ids` [R, K] their token ids (best first after a top-k, in token-id order after a
compaction; sorted when a stage needs it); every token not listed is −inf. Later stages then cost O(R·K) instead of O(R·V) — the "top-k first" path — and
need no full-vocabulary sort or mask. Processors use the methods here and never care which
form they got; the results are the same either way.

A batch may start on values it does not own (`shared=True`: the raw logits, which the engine
still needs): the first write copies them, so a chain that writes nothing (greedy over an
empty chain) costs no copy. Token-addressed writes to such dense values (`update`: penalties,
biases) wait instead: a `divide` (temperature) writes its quotients to new values anyway and
applies them there, dividing each written value the same way (so a penalty before a
temperature, vLLM's order, costs no copy of the batch: ~1.6 ms of 64 x 128256); any other
read or write first makes the copy with them.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch


def _numba_installed() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


#: numba is installed (the `server` extra): the CPU kernels and their thread pool can run.
NUMBA = _numba_installed()
#: The largest float32: where an arithmetic stage saturates instead of reaching +inf.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _on_numpy_rows(values: torch.Tensor) -> bool:
    return (NUMBA and values.device.type == "cpu" and values.dtype == torch.float32
            and values.dim() == 2 and values.shape[1] > 0)


def _argmax_rows(start: int, stop: int, rows: np.ndarray, out: np.ndarray) -> None:
    out[start:stop] = np.argmax(rows[start:stop], axis=1)


def _max_rows(start: int, stop: int, rows: np.ndarray, out: np.ndarray) -> None:
    out[start:stop] = np.max(rows[start:stop], axis=1)


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """[R] int64 column of each row's first maximum of `values` [R, C] (no NaN). On float32
    CPU rows NumPy's vectorised argmax, parts of the batch at once (it releases the GIL; 10x
    torch's: 0.65 ms against 10 ms for 64 x 128256 on two threads), elsewhere torch's; both
    return the first maximum."""
    if _on_numpy_rows(values):
        from sampler_service.kernels import run_rows
        out = np.empty(values.shape[0], dtype=np.int64)
        run_rows(_argmax_rows, values.shape[0], torch.get_num_threads(),
                 values.contiguous().numpy(), out)
        return torch.from_numpy(out)
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return torch.from_numpy(np.argmax(values.numpy(), axis=1))
    return torch.argmax(values, dim=1)


def sort_ascending(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted, order) of int64 `keys`, distinct along their last dimension (token ids), as
    `torch.sort`. On the CPU, non-negative keys small enough carry their position in their low
    bits and are sorted as plain values (NumPy's vectorised sort; distinct keys make the order
    the one any sort gives): 0.34-0.44 ms on 64 x 1024 ids (per row, or flattened), against
    0.73-0.82 for NumPy's argsort and 1.05 for torch's; else NumPy's argsort; torch's
    elsewhere."""
    if keys.device.type != "cpu":
        return torch.sort(keys, dim=-1)
    values = keys.numpy()
    count = values.shape[-1]
    bits = max(1, (count - 1).bit_length())
    if values.size and values.min() >= 0 and int(values.max()) < 1 << (62 - bits):
        packed = (values << bits) | np.arange(count)
        packed.sort(axis=-1)
        return torch.from_numpy(packed >> bits), torch.from_numpy(packed & ((1 << bits) - 1))
    order = np.argsort(values, axis=-1)
    return torch.from_numpy(np.take_along_axis(values, order, axis=-1)), torch.from_numpy(order)


def row_maxima(values: torch.Tensor) -> torch.Tensor:
    """[R] each row's max of `values` [R, C] (NaN if the row holds one, +inf with a +inf, −inf
    if all are): validation's and the chain's maxima. On float32 CPU rows NumPy's vectorised
    max, parts of the batch at once; elsewhere `torch.amax` (slower on the CPU once torch's
    idle OpenMP threads sleep, as the service has them)."""
    if not _on_numpy_rows(values):
        return values.amax(dim=1)
    from sampler_service.kernels import run_rows
    out = np.empty(values.shape[0], dtype=np.float32)
    run_rows(_max_rows, values.shape[0], torch.get_num_threads(), values.contiguous().numpy(), out)
    return torch.from_numpy(out)


#: The widest best-first prefix of a dense float32 CPU batch taken by the numba kernel
#: (`sampler_service.kernels.cpu_top_k`: one pass, O(width) per insertion); wider ones by
#: `torch.topk`.
KERNEL_TOP_K = 256
#: The most tokens per row that `Candidates.mask_below` compacts a dense batch into (0: never).
COMPACT_WIDTH = 4096


class Candidates:
    """Logits of R rows over a vocabulary of `vocab` tokens (see the module docstring)."""

    def __init__(self, values: torch.Tensor, ids: torch.Tensor | None = None,
                 vocab: int | None = None, shared: bool = False,
                 maxima: torch.Tensor | None = None):
        self._values = values
        #: `update`s of shared dense values not made yet: (rows, columns, new values), in order.
        self._waiting: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.ids = ids
        self.vocab = values.shape[1] if vocab is None else vocab
        self._sorted = ids is not None
        self._shared = shared
        #: (values, [R] each row's max) when the maxima are known (the caller's, e.g. the raw
        #: rows' from their statistics, or kept through `divide`), so that `max_values` needs
        #: no pass. Values are written only by the methods here (a plug-in through `writable`):
        #: each drops or updates them; a stage that sets `values` to another tensor makes them
        #: stale by that alone.
        self._maxima = None if maxima is None else (values, maxima)

    @property
    def values(self) -> torch.Tensor:
        """[R, C] the logits (a copy of shared ones, with the waiting writes made, when
        `update`s wait)."""
        if self._waiting:
            self._copy_with_waiting_writes()
        return self._values

    @values.setter
    def values(self, values: torch.Tensor) -> None:
        self._values, self._waiting = values, []

    def _copy_with_waiting_writes(self) -> None:
        values = self._values.clone()
        for rows, columns, new in self._waiting:
            values[rows, columns] = new
        self._values, self._waiting, self._shared = values, [], False

    def _known_maxima(self) -> torch.Tensor | None:
        known = self._maxima
        return None if known is None or known[0] is not self._values else known[1]

    def writable(self) -> torch.Tensor:
        """`values`, copied first if they belong to someone else: what a stage that writes
        into them itself (a plug-in) must hold, where built-in stages call the methods here."""
        if self._shared:  # (writes wait only on shared values)
            self._copy_with_waiting_writes()
        self._maxima = None
        return self._values

    @property
    def dense(self) -> bool:
        return self.ids is None

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    def token_ids(self) -> torch.Tensor:
        """[R, K] token id of every column."""
        if self.ids is not None:
            return self.ids
        return torch.arange(self.vocab, device=self.values.device).expand_as(self.values)

    # -- token-addressed updates (penalties, constraints) ---------------------------------------
    def locate(self, rows: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(present, columns) of (row, token) pairs: `present` [P] bool says which pairs exist
        (a sparse batch lacks tokens that are −inf already), `columns` locates those."""
        if self.ids is None:
            return torch.ones_like(rows, dtype=torch.bool), tokens
        match = self.ids.index_select(0, rows) == tokens.unsqueeze(1)
        present = match.any(dim=1)
        return present, match[present].to(torch.int8).argmax(dim=1)

    def update(self, rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> None:
        """Writes values at (rows, columns) from `locate`; a sparse batch is re-sorted lazily.
        On shared dense values the write waits (the module docstring)."""
        if self._shared and self.ids is None:
            self._waiting.append((rows, columns, values))
            self._maxima = None
            return
        self.writable()[rows, columns] = values
        if self.ids is not None:
            self._sorted = False

    def keep_only(self, active: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """In the `active` rows, every token but the listed (row, token) pairs becomes −inf."""
        present, columns = self.locate(rows, tokens)
        rows = rows[present]
        kept = self.values[rows, columns]
        self.writable().index_fill_(0, active, -math.inf)  # a row all −inf is still best first
        self.update(rows, columns, kept)

    def keep_bits(self, rows: list[int], bitmask: torch.Tensor) -> None:
        """In each of `rows`, token t stays iff bit t % 32 of word t // 32 of `bitmask[row]` is
        set (xgrammar's token bitmask: int32 [R, ceil(vocab / 32)] on the CPU); every other
        token becomes −inf. Dense rows through xgrammar's kernel (in place, on the values'
        device); sparse rows read the bits of the ids they list."""
        if not rows:
            return
        if self.ids is None and self.values.device.type == "cpu" and sys.byteorder == "little":
            # the bits as bytes, unpacked (≈1 ms for 64 x 49152, against 7 ms for xgrammar's
            # CPU kernel), then one masking pass that also does the copy of values not owned
            words = bitmask.numpy() if len(rows) == bitmask.shape[0] else bitmask[rows].numpy()
            bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1,
                                 bitorder="little")[:, :self.vocab]
            remove = torch.from_numpy(bits == 0)
            if len(rows) == self.rows:
                self.mask(remove)
                return
            index = torch.tensor(rows, dtype=torch.int64)
            part = self.values.index_select(0, index).masked_fill_(remove, -math.inf)
            self.writable().index_copy_(0, index, part)
            return
        bitmask = bitmask.to(self.values.device)
        if self.ids is None:
            values = self.writable()
            if values.dtype in (torch.float32, torch.float16, torch.bfloat16):
                from xgrammar import apply_token_bitmask_inplace
                apply_token_bitmask_inplace(values, bitmask, vocab_size=self.vocab, indices=rows)
                return
            ids = torch.arange(self.vocab, device=values.device).expand(len(rows), -1)
        else:
            ids = self.ids[rows]
        index = torch.tensor(rows, dtype=torch.int64, device=self.values.device)
        words = bitmask.index_select(0, index).to(torch.int64).gather(1, ids >> 5)
        remove = ((words >> (ids & 31)) & 1) == 0
        part = self.values.index_select(0, index).masked_fill(remove, -math.inf)
        self.writable().index_copy_(0, index, part)

    def force(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Row rows[i] keeps only tokens[i], with logit 0, even where a stage had masked it; a
        sparse row that lacks the token takes it in its first column."""
        self.writable().index_fill_(0, rows, -math.inf)
        present, columns = self.locate(rows, tokens)
        missing = ~present
        if bool(missing.any()):
            lacking = rows[missing]
            self.ids[lacking, 0] = tokens[missing]
            rows = torch.cat([rows[present], lacking])
            columns = torch.cat([columns, torch.zeros_like(lacking)])
        self.update(rows, columns, torch.zeros(columns.shape, dtype=self.values.dtype,
                                               device=self.values.device))

    # -- truncation -----------------------------------------------------------------------------
    def mask_below(self, threshold: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """values < threshold[r] become −inf, for `rows` (all rows when None). Keeps the order
        of the values it keeps; a dense batch may turn sparse (`_compact`)."""
        if rows is None:
            if not self._compact(threshold):
                self.mask(self.values < threshold.unsqueeze(1))
            return
        part = self.values.index_select(0, rows)
        self.writable().index_copy_(0, rows, part.masked_fill(part < threshold.unsqueeze(1),
                                                               -math.inf))

    def _compact(self, threshold: torch.Tensor) -> bool:
        """Turns a dense float32 CPU batch sparse, keeping values ≥ threshold[r] (in token-id
        order), when that keeps at most `COMPACT_WIDTH` tokens in every row: one pass
        (`sampler_service.kernels.cpu_compact`) instead of a mask pass, and every later stage
        costs O(R·K). Equal to masking in place: `to_dense()` gives the same [R, V]. False
        (nothing done) where it does not apply."""
        if (self.ids is not None or COMPACT_WIDTH <= 0 or self.vocab <= COMPACT_WIDTH
                or self.values.device.type != "cpu" or self.values.dtype != torch.float32
                or threshold.dtype != torch.float32):
            return False
        try:
            from sampler_service.kernels.cpu_compact import compact_at_least
        except ImportError:  # numba absent: the `server` extra is not installed
            return False
        values, ids, kept = compact_at_least(self.values.contiguous().numpy(),
                                             threshold.contiguous().numpy(), COMPACT_WIDTH,
                                             torch.get_num_threads())
        if int(kept.max()) > COMPACT_WIDTH:
            return False
        self.values = torch.from_numpy(values)
        self.ids = torch.from_numpy(ids)
        self._sorted, self._shared = False, False
        return True

    def mask(self, remove: torch.Tensor) -> None:
        """Entries where `remove` [R, C] is True become −inf. Keeps the order. Values not yet
        owned are not copied first: the result is written to new ones in the same pass."""
        self._maxima = None
        if self._shared and not self._waiting:
            self.values, self._shared = self._values.masked_fill(remove, -math.inf), False
        else:
            self.values.masked_fill_(remove, -math.inf)  # (a copy of its own with waiting writes)

    def divide(self, divisor: torch.Tensor) -> None:
        """Row r's values divided by divisor[r] > 0 (temperature). Keeps the order. Values not
        yet owned are not copied first: the quotients are written to new ones in one pass.

        A quotient past float32's range saturates at its largest value instead of becoming
        +inf (a logit near the top of the range divided by T < 1): the token still takes all
        the probability, as the exact quotient would, and no later stage or kernel sees +inf
        (one more pass: ~0.65 ms for 64 x 128256 on 2 cores). On float32 CPU rows with a
        float32 divisor, both in one pass (`sampler_service.kernels.cpu_divide`, the same
        quotients), and known row maxima stay known: x ↦ min(x / d, f32max) is
        non-decreasing in float32 (division rounds monotonically), so the new maxima are the
        old ones divided the same way.

        Writes waiting on shared values (`update`) are made on the quotients, each value
        divided as the pass divides (IEEE float32 division, then the same saturation): the
        values are those of writing first and dividing after."""
        if _on_numpy_rows(self._values) and divisor.dtype == torch.float32:
            from sampler_service.kernels.cpu_divide import divide_rows
            known = self._known_maxima()
            values = self._values.contiguous()  # a copy when not contiguous: ours to write
            out = torch.empty_like(values) if self._shared and values is self._values else None
            divide_rows(values.numpy(), divisor.contiguous().numpy(),
                        None if out is None else out.numpy(), torch.get_num_threads())
            quotients = values if out is None else out
            for rows, columns, new in self._waiting:
                quotients[rows, columns] = (new.to(quotients.dtype) / divisor[rows]).clamp_(
                    max=_FLOAT32_MAX)
            self.values, self._shared = quotients, False
            self._maxima = None if known is None else (
                self._values, (known / divisor).clamp_(max=_FLOAT32_MAX))
            return
        self._maxima = None
        if self._shared and not self._waiting:
            self.values, self._shared = self._values / divisor.unsqueeze(1), False
        else:
            self.values.div_(divisor.unsqueeze(1))  # (a copy of its own with waiting writes)
        self._values.clamp_(max=_FLOAT32_MAX)

    def best_first(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) of each row's `width` best tokens, sorted best first (equal values in
        no promised order)."""
        if self.ids is not None:
            self._sort()
            return self.values[:, :width], self.ids[:, :width]
        if width >= self.vocab:
            return torch.sort(self.values, dim=1, descending=True)
        if (width <= KERNEL_TOP_K and self.values.device.type == "cpu"
                and self.values.dtype == torch.float32):
            try:
                from sampler_service.kernels.cpu_top_k import top_k_entries
            except ImportError:  # numba absent: the `server` extra is not installed
                return torch.topk(self.values, width, dim=1)
            values, ids = top_k_entries(self.values.contiguous().numpy(), width,
                                        torch.get_num_threads())
            return torch.from_numpy(values), torch.from_numpy(ids)
        return torch.topk(self.values, width, dim=1)

    def restrict(self, threshold: torch.Tensor, best: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keeps values ≥ threshold[r] in every row, given `best` = `best_first(W)` for a W that
        holds them all unless ties at the W-th value spill over (logits rounded from bf16 or
        fp16 tie often): then the dense rows are masked instead (`mask_below`, one compacting
        pass that keeps every tie). Masked (−inf) values never spill: a row with fewer finite
        values than W keeps them."""
        values, ids = best
        width = values.shape[1]
        last = values[:, -1]
        if (self.ids is None and width < self.vocab
                and bool(((last >= threshold) & (last > -math.inf)).any())):
            self.mask_below(threshold)
            return
        if self.ids is None:
            self.values, self.ids, self._sorted, self._shared = values, ids, True, False
        self.mask_below(threshold)

    def max_values(self) -> torch.Tensor:
        """[R] best logit of each row."""
        if self.ids is not None and self._sorted:
            return self.values[:, 0]
        known = self._known_maxima()
        return row_maxima(self.values) if known is None else known

    def _sort(self) -> None:
        if not self._sorted:
            self.values, order = torch.sort(self.values, dim=1, descending=True)
            self.ids = self.ids.gather(1, order)
            self._sorted, self._shared = True, False

    # -- selection helpers ----------------------------------------------------------------------
    def argmax(self) -> torch.Tensor:
        """[R] token id of each row's best logit; ties go to the lowest token id."""
        if self.ids is None:
            return first_argmax(self.values)
        best = self.values == self.values.amax(dim=1, keepdim=True)
        return self.ids.masked_fill(~best, self.vocab).amin(dim=1)

    def one_hot(self, tokens: torch.Tensor) -> "Candidates":
        """Log-probabilities of a point mass on one token per row (0 there, −inf elsewhere),
        as one listed entry per row (no dense pass)."""
        point = Candidates(torch.zeros((self.rows, 1), dtype=self.values.dtype,
                                       device=self.values.device),
                           tokens.unsqueeze(1).to(self.values.device), self.vocab)
        point._sorted = True
        return point

    def log_softmax(self) -> "Candidates":
        """The same candidates with values replaced by log-probabilities."""
        out = Candidates(torch.log_softmax(self.values, dim=1), self.ids, self.vocab)
        out._sorted = self._sorted
        return out

    def at(self, tokens: torch.Tensor) -> torch.Tensor:
        """[R] value at one token per row (−inf where a sparse row lacks it)."""
        if self.ids is None:
            return self.values.gather(1, tokens.unsqueeze(1)).squeeze(1)
        match = self.ids == tokens.unsqueeze(1)
        picked = torch.where(match, self.values, torch.full_like(self.values, -math.inf))
        return picked.amax(dim=1)

    def to_dense(self) -> torch.Tensor:
        """[R, V] logits with −inf for every token not listed."""
        if self.ids is None:
            return self.values
        dense = torch.full((self.rows, self.vocab), -math.inf, device=self.values.device)
        return dense.scatter_(1, self.ids, self.values)
