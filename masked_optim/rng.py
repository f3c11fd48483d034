"""Counter-based random numbers: the pure-PyTorch Philox4x32-10 reference (docs/algorithm.md §4).

Unit ``j`` of a tensor takes output word ``j % 4`` of the Philox4x32-10 block at counter
``j // 4`` (counter words ``(j // 4) mod 2**32, (j // 4) >> 32, 0, 0``), under a 64-bit key
``derive_key(seed, step, tensor_index)`` split into ``(key & 0xFFFFFFFF, key >> 32)``. This is
exactly what Triton's ``tl.rand4x(key, j // 4)`` computes, so every backend draws bit-identical
uniforms, every data-parallel rank draws the same masks, and a resumed run draws the same masks
as an uninterrupted one.

The reference works on ``int64`` tensors holding unsigned 32-bit values: a 32 x 32-bit product is
split into two 32 x 16-bit halves so that nothing ever overflows ``int64``.
"""

from __future__ import annotations

import torch

__all__ = [
    "PHILOX_ROUNDS",
    "UNIFORM_SCALE",
    "derive_key",
    "philox4x32",
    "philox_uniform",
    "uint32_to_uniform",
]

PHILOX_ROUNDS = 10
_M0 = 0xD2511F53  # round multipliers (Salmon et al. 2011; Triton's PHILOX_ROUND_A / _B)
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9  # Weyl key increments (Triton's PHILOX_KEY_A / _B)
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Triton's uint_to_uniform_float scale for 32-bit words: the largest float32 such that
# (2**31 - 1) * scale < 1.0 after rounding, so uniforms lie in [0, 1).
UNIFORM_SCALE = 4.6566127342e-10


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_key(seed: int, step: int, index: int) -> int:
    """Philox key for tensor number ``index`` at optimizer step ``step`` under ``seed``.

    A chain of SplitMix64 finalisers, truncated to 63 bits so that the key fits a signed 64-bit
    kernel argument (Triton specialises Python ints >= 2**63 as uint64). Pure integer arithmetic
    on the host: no device work and no synchronisation.
    """
    for name, value in (("seed", seed), ("step", step), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"derive_key: {name} must be a non-negative int, got {value!r}")
    key = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ step) ^ index)
    return key & 0x7FFFFFFFFFFFFFFF


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``a * x`` for a constant ``a < 2**32`` and ``0 <= x < 2**32``."""
    t_lo = (x & 0xFFFF) * a  # < 2**48
    t_hi = (x >> 16) * a  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: int,
    k1: int,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on ``int64`` tensors holding unsigned 32-bit counter words.

    Returns the four output words, as ``int64`` tensors with values in ``[0, 2**32)``.
    """
    for r in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's word-to-float map: ``(x if x < 2**31 else ~x as int32) * 4.6566127342e-10``.

    ``~x`` of the int32 reinterpretation of ``x >= 2**31`` is ``2**32 - 1 - x``. The int-to-float
    conversion rounds to nearest even and the product is taken in float32, as on the GPU.
    """
    folded = torch.where(x < 0x80000000, x, _MASK32 - x)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def philox_uniform(key: int, n: int, device: torch.device | str | None = None, offset: int = 0) -> torch.Tensor:
    """The ``n`` float32 uniforms in ``[0, 1)`` of units ``offset .. offset+n-1`` under ``key`` (docs/algorithm.md §4).

    ``offset`` is the global index of the first unit, for a shard of a larger tensor: the uniforms
    are those of the same units of the whole tensor, so a sharded update draws the unsharded masks.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"philox_uniform: n must be a non-negative int, got {n!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"philox_uniform: offset must be a non-negative int, got {offset!r}")
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MASK64:
        raise ValueError(f"philox_uniform: key must be an int in [0, 2**64), got {key!r}")
    first, skip = divmod(offset, 4)
    blocks = (skip + n + 3) // 4
    counter = torch.arange(first, first + blocks, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(counter)
    words = philox4x32(counter & _MASK32, counter >> 32, zeros, zeros, key & _MASK32, key >> 32)
    return uint32_to_uniform(torch.stack(words, dim=1).reshape(-1)[skip : skip + n])
