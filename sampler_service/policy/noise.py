"""Counter-based sampling noise: uniforms from a hash of (seed, position, token id).

No global RNG is involved, so a sequence draws the same noise whatever batch it rides in and
after a restart of the service. The hash is SplitMix64's finaliser (Steele et al. 2014) over a
key that mixes the three counters; all arithmetic is int64 with wrap-around, and right shifts
are made logical by masking, so CPU and CUDA agree bit for bit.
"""
from __future__ import annotations

import numpy as np
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
    if seeds.device.type == "cpu":
        return torch.from_numpy(_uniform_numpy(seeds.numpy(), positions.numpy(), token_ids.numpy()))
    return uniform_noise_torch(seeds, positions, token_ids)


def uniform_noise_torch(seeds: torch.Tensor, positions: torch.Tensor,
                        token_ids: torch.Tensor) -> torch.Tensor:
    """`uniform_noise` in torch int64 arithmetic, on any device (the reference of the NumPy
    form the CPU takes)."""
    row_key = _splitmix(_splitmix(seeds) ^ positions)
    bits = _splitmix(row_key.unsqueeze(1) ^ (token_ids * _GOLDEN))
    return (_shift_right(bits, 12).to(torch.float64) + 0.5) / _GRID


def _splitmix_numpy(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(_GOLDEN % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1 % 2**64)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2 % 2**64)
    return x ^ (x >> np.uint64(31))


def _uniform_numpy(seeds: np.ndarray, positions: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """`uniform_noise` on the CPU in NumPy's uint64 arithmetic (wrap-around and logical shifts
    are native there): the same bits as the torch form, without a dozen small torch calls
    (~60 µs for one row) on the per-step path."""
    with np.errstate(over="ignore"):
        seeds, positions, token_ids = (a.astype(np.uint64) for a in (seeds, positions, token_ids))
        row_key = _splitmix_numpy(_splitmix_numpy(seeds) ^ positions)
        bits = _splitmix_numpy(row_key[:, None] ^ (token_ids * np.uint64(_GOLDEN % 2**64)))
    return ((bits >> np.uint64(12)).astype(np.float64) + 0.5) / _GRID
