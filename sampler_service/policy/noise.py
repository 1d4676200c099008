"""Counter-based sampling noise: uniforms from a hash of (seed, position, token id).

No global RNG is involved, so a sequence draws the same noise whatever batch it rides in and
after a restart of the service. The hash is SplitMix64's finaliser (Steele et al. 2014) over a
key that mixes the three counters; all arithmetic is int64 with wrap-around, and right shifts
are made logical by masking, so CPU and CUDA agree bit for bit.
"""
from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MIX1 = -4658895280553007687    # 0xBF58476D1CE4E5B9 as int64
_MIX2 = -7723592293110705685    # 0x94D049BB133111EB as int64
#: Uniforms use the top 52 bits: (x + 0.5) / 2**52 is exact in float64 and always < 1.
_GRID = float(2 ** 52)


def seed_to_int64(seed: int) -> int:
    """Reinterprets a uint64 seed as the int64 with the same bits."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor,
                  token_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64, shape of `token_ids`.

    Parameters
    ----------
    seeds : int64 [R]        the sequences' seeds (see `seed_to_int64`)
    positions : int64 [R]    index of the token being chosen in each output
    token_ids : int64 [R, K] candidate ids of each row
    """
    row_key = _splitmix(_splitmix(seeds) ^ positions)
    bits = _splitmix(row_key.unsqueeze(1) ^ (token_ids * _GOLDEN))
    return (_shift_right(bits, 12).to(torch.float64) + 0.5) / _GRID
