"""The synthetic modality-competition benchmark of docs/algorithm.md §8.

Modality ``"a"`` is fast to fit but only partly informative (noisy class means); modality ``"b"``
is fully informative but slow to fit (each label bit is the parity of the signs of a group of
coordinates, hidden by a random rotation). Trained jointly, the model memorises ``a`` and ``b``
starves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["SETTINGS", "MultimodalSplits", "modality_competition"]

# setting -> (dim of modality a, sign-group size k of modality b)
SETTINGS = {"xor": (200, 2), "parity3": (20, 3)}
_NOISE_DIMS = 16


@dataclass(frozen=True)
class MultimodalSplits:
    """Per-modality features and labels for each split; features standardised on the train split.

    ``train`` / ``val`` / ``test`` are ``(features, labels)``: ``features`` maps a modality name to a
    float32 tensor whose first dimension is the sample, ``labels`` is int64 in ``[0, num_classes)``.
    ``name`` identifies the data set (a ``load_dataset`` spec such as ``"synthetic:xor"``).
    ``groups`` maps ``"train"`` / ``"val"`` / ``"test"`` to the int64 group (subject) id of each sample
    of that split, or is None when the data has no groups.
    """

    train: tuple[dict[str, Tensor], Tensor]
    val: tuple[dict[str, Tensor], Tensor]
    test: tuple[dict[str, Tensor], Tensor]
    num_classes: int
    name: str = ""
    groups: Optional[dict[str, Tensor]] = None

    @property
    def dims(self) -> dict[str, int]:
        return {m: x.shape[1] for m, x in self.train[0].items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-modality shape of one sample (the feature tensor's shape without the sample dim)."""
        return {m: tuple(x.shape[1:]) for m, x in self.train[0].items()}


def modality_competition(
    setting: str = "xor",
    n: int = 5000,
    num_classes: int = 4,
    *,
    label_noise: float = 0.3,
    seed: int = 0,
) -> MultimodalSplits:
    """Draw the docs/algorithm.md §8 data set (``setting`` ``"xor"`` or ``"parity3"``), split 60/20/20 in order.

    ``label_noise`` is the probability that modality ``a`` shows a uniformly random label's mean
    instead of the true one (0.3 in docs/algorithm.md §8): the knob for how informative the fast modality is.
    """
    if setting not in SETTINGS:
        raise ValueError(f"Invalid setting: {setting!r}; allowed: one of {sorted(SETTINGS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 5:
        raise ValueError(f"Invalid n: {n!r}; allowed: an int >= 5")
    if not isinstance(num_classes, int) or num_classes < 2 or num_classes & (num_classes - 1):
        raise ValueError(f"Invalid num_classes: {num_classes!r}; allowed: a power of two >= 2")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"Invalid label_noise: {label_noise!r}; allowed: a number in [0, 1]")
    dim_a, k = SETTINGS[setting]
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (n,), generator=gen)

    means = torch.randn(num_classes, dim_a, generator=gen, dtype=torch.float64)
    means = 3.0 * means / means.norm(dim=1, keepdim=True)
    shown = torch.where(torch.rand(n, generator=gen) < label_noise, torch.randint(num_classes, (n,), generator=gen), y)
    x_a = means[shown] + torch.randn(n, dim_a, generator=gen, dtype=torch.float64)

    bits = int(math.log2(num_classes))
    groups = []
    for b in range(bits):
        bit = (y >> b) & 1
        signs = torch.randint(2, (n, k - 1), generator=gen).double() * 2 - 1
        last = signs.prod(dim=1) * torch.where(bit == 1, -1.0, 1.0).double()
        groups.append(torch.cat([signs, last[:, None]], dim=1))
    signs = torch.cat(groups, dim=1)
    magnitude = 0.3 + torch.randn(signs.shape, generator=gen, dtype=torch.float64).abs()
    x_b = torch.cat([signs * magnitude, torch.randn(n, _NOISE_DIMS, generator=gen, dtype=torch.float64)], dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(x_b.shape[1], x_b.shape[1], generator=gen, dtype=torch.float64))
    x_b = x_b @ rotation

    n_train, n_val = int(0.6 * n), int(0.2 * n)
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    out = []
    stats = {}
    for m, x in (("a", x_a), ("b", x_b)):
        mean = x[:n_train].mean(0)
        std = x[:n_train].std(0).clamp_min(1e-12)
        stats[m] = ((x - mean) / std).float()
    for lo, hi in cuts:
        out.append(({m: stats[m][lo:hi] for m in ("a", "b")}, y[lo:hi]))
    return MultimodalSplits(
        train=out[0], val=out[1], test=out[2], num_classes=num_classes, name=f"synthetic:{setting}"
    )
