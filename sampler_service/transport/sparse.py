"""Decodes `StepRequest.sparse` (`sampler.v1.SparseRows`) into `SparseLogits` on the device.

Each listed row comes as its K best token ids and logits plus statistics of its tail (the other
V − K logits). Everything the rules of `sampler_service.policy.sparse` rely on is checked here,
each failure an INVALID_ARGUMENT naming the field under `sparse.`:

- `rows`: at least one, ascending without repeats, each < the request's row count;
- `vocab_size` > 0; `logits` (any dtype and data source `decode_values` accepts) of shape
  [len(rows), K] with 1 ≤ K ≤ vocab_size; `token_ids` exactly len(rows)·K little-endian int32;
- ids: inside [0, vocab_size), distinct within a row;
- logits: no NaN or +inf, and a finite best in every row (−inf entries are allowed);
- `tails`: one per row; no NaN; `max` ≤ every sent logit of the row (as decoded) and < +inf;
  K = V leaves no tail, so its `max` must be −inf;
- a tail whose `max` is −inf (none, or all −inf) has `log_sum_exp` −inf and moments 0;
- otherwise, with n = V − K tail tokens and a rounding allowance of
  `TAIL_TOLERANCE`·(1 + |value|): max ≤ log_sum_exp ≤ max + ln n; the tail's mean lies in
  [log_sum_exp − ln n, max] (its entropy log_sum_exp − mean is in [0, ln n]); mean_square ≥
  mean² (a variance ≥ 0) and is finite.

Entries are returned best first (the order `SparseLogits` promises), ids as int64.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from sampler_proto.sampler.v1 import sampler_pb2 as pb
from sampler_service.errors import InvalidArgument
from sampler_service.policy.sparse import SparseLogits

#: Relative rounding allowance of the tail statistics' consistency checks (a worker may sum
#: them in float32).
TAIL_TOLERANCE = 1e-4

DecodeValues = Callable[[pb.Tensor, str], torch.Tensor]


def _first(bad: np.ndarray) -> int | None:
    """Index of the first true entry of a 1-D bool array, or None."""
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def _check_rows(listed: list[int], rows: int) -> None:
    if not listed:
        raise InvalidArgument("lists no row: leave `sparse` unset to send every row dense",
                              "sparse.rows")
    for j, row in enumerate(listed):
        if row >= rows:
            raise InvalidArgument(f"row {row} is out of range: the request has {rows} rows",
                                  f"sparse.rows[{j}]")
        if j and row <= listed[j - 1]:
            raise InvalidArgument(f"rows must be ascending without repeats: {row} follows "
                                  f"{listed[j - 1]}", f"sparse.rows[{j}]")


def _check_ids(raw: bytes, count: int, width: int, vocab: int) -> np.ndarray:
    """The [count, width] int64 ids of `raw` (little-endian int32), checked."""
    if len(raw) != count * width * 4:
        raise InvalidArgument(f"token_ids holds {len(raw)} bytes but {count} rows of K = {width} "
                              f"int32 ids need {count * width * 4}", "sparse.token_ids")
    ids = np.frombuffer(raw, dtype="<i4").astype(np.int64).reshape(count, width)
    outside = _first(((ids < 0) | (ids >= vocab)).any(axis=1))
    if outside is not None:
        bad = ids[outside][(ids[outside] < 0) | (ids[outside] >= vocab)][0]
        raise InvalidArgument(f"row {outside} sends id {bad}, outside [0, vocab_size = {vocab})",
                              "sparse.token_ids")
    ordered = np.sort(ids, axis=1)
    repeated = _first((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
    if repeated is not None:
        twice = ordered[repeated][1:][ordered[repeated][1:] == ordered[repeated][:-1]][0]
        raise InvalidArgument(f"row {repeated} sends id {twice} more than once",
                              "sparse.token_ids")
    return ids


def _check_values(values: np.ndarray) -> None:
    for what, bad in (("a NaN", np.isnan(values)), ("a +inf", np.isposinf(values))):
        row = _first(bad.any(axis=1))
        if row is not None:
            raise InvalidArgument(f"row {row} has {what} logit", "sparse.logits")
    row = _first(np.isneginf(values.max(axis=1)))
    if row is not None:
        raise InvalidArgument(f"row {row} has no finite logit", "sparse.logits")


def _check_tails(tails: Sequence[pb.TailStats], smallest: np.ndarray, width: int, vocab: int
                 ) -> tuple[np.ndarray, ...]:
    """(max float32, log_sum_exp, mean, mean_square float64) [rows] of `tails`, checked against
    each row's smallest sent logit."""
    if len(tails) != len(smallest):
        raise InvalidArgument(f"{len(tails)} tails for {len(smallest)} rows: send one per row",
                              "sparse.tails")
    top = np.array([t.max for t in tails], dtype=np.float32)
    lse, mean, square = (np.array([getattr(t, name) for t in tails], dtype=np.float64)
                         for name in ("log_sum_exp", "mean", "mean_square"))
    log_size = math.log(vocab - width) if vocab > width else -math.inf
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf rows are reported below
        return top, *_checked(top.astype(np.float64), lse, mean, square, smallest,
                              vocab == width, vocab - width, log_size)


def _checked(wide: np.ndarray, lse: np.ndarray, mean: np.ndarray, square: np.ndarray,
             smallest: np.ndarray, whole: bool, size: int, log_size: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_check_tails`' rules on the tails' statistics (float64 [rows] each)."""
    slack = TAIL_TOLERANCE * (1 + np.abs(np.nan_to_num(lse, posinf=0.0, neginf=0.0)))
    empty = np.isneginf(wide)
    checks = (
        ("max", np.isnan(wide), "is NaN"),
        ("log_sum_exp", np.isnan(lse), "is NaN"),
        ("mean", np.isnan(mean), "is NaN"),
        ("mean_square", np.isnan(square), "is NaN"),
        ("max", np.isposinf(wide), "is +inf"),
        ("max", wide > smallest, "is above the row's smallest sent logit (the K entries must be "
                                 "the row's best)"),
        ("max", ~empty & whole, "must be -inf: K = vocab_size leaves no tail"),
        ("log_sum_exp", empty & ~np.isneginf(lse), "must be -inf with max -inf"),
        ("mean", empty & (mean != 0), "must be 0 with max -inf"),
        ("mean_square", empty & (square != 0), "must be 0 with max -inf"),
        ("log_sum_exp", ~empty & ((lse < wide - slack) | (lse > wide + log_size + slack)),
         f"must lie in [max, max + ln(vocab_size - K)] (ln {size} = {log_size:.4g})"),
        ("mean", ~empty & ((mean > wide + slack) | (mean < lse - log_size - slack)),
         "must lie in [log_sum_exp - ln(vocab_size - K), max]"),
        ("mean_square", ~empty & (~np.isfinite(square) | (square < mean * mean - slack
                                                          * (1 + mean * mean))),
         "must be finite and at least mean² (a variance is >= 0)"),
    )
    for name, bad, rule in checks:
        row = _first(bad)
        if row is not None:
            value = {"max": wide, "log_sum_exp": lse, "mean": mean, "mean_square": square}[name]
            raise InvalidArgument(f"tail {name} {value[row]:.6g} {rule}",
                                  f"sparse.tails[{row}].{name}")
    return lse, mean, square


def decode_sparse(sparse: pb.SparseRows, rows: int, device: torch.device,
                  decode_values: DecodeValues) -> tuple[list[int], SparseLogits]:
    """(the request row of each sparse row, the rows as `SparseLogits` on `device`).

    `rows` is the request's row count; `decode_values(tensor, field)` decodes a
    `sampler.v1.Tensor` (any transport) to a float32 tensor, raising InvalidArgument naming
    `field` (or a field under it). Every check is listed in the module docstring."""
    listed = list(sparse.rows)
    _check_rows(listed, rows)
    vocab = int(sparse.vocab_size)
    if vocab <= 0:
        raise InvalidArgument(f"vocab_size {vocab} must be > 0", "sparse.vocab_size")
    values = decode_values(sparse.logits, "sparse.logits")
    if values.dim() != 2 or values.shape[0] != len(listed):
        raise InvalidArgument(f"logits shape {list(values.shape)} must be [len(rows), K] with "
                              f"len(rows) = {len(listed)}", "sparse.logits.shape")
    width = values.shape[1]
    if width > vocab:
        raise InvalidArgument(f"K = {width} entries per row exceed vocab_size = {vocab}",
                              "sparse.logits.shape")
    ids = _check_ids(sparse.token_ids, len(listed), width, vocab)
    host = values.float().cpu().numpy()
    _check_values(host)
    top, lse, mean, square = _check_tails(sparse.tails, host.min(axis=1).astype(np.float64),
                                          width, vocab)
    values = values.to(device=device, dtype=torch.float32)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    ids_t = torch.from_numpy(ids).to(device).gather(1, order)
    return listed, SparseLogits(
        ids=ids_t, values=values, tail_max=torch.from_numpy(top).to(device),
        tail_lse=torch.from_numpy(lse).to(device), tail_mean=torch.from_numpy(mean).to(device),
        tail_mean_square=torch.from_numpy(square).to(device), vocab=vocab)
