"""Smart-watch shoulder-physiotherapy exercise recognition (7 exercises, 10 subjects).

The recordings ship with ``seglearn`` 1.2.5 (``<seglearn>/data/watch_dataset.npy``: a pickled dict
with ``X``, 140 arrays ``(T_i, 6)`` sampled at 50 Hz, columns ``ax ay az`` (accelerometer) and
``wx wy wz`` (gyroscope); ``y``, the exercise 0..6; ``subject``, 1..10, 14 recordings each). The file
is read by path; seglearn is never imported. Install it with ``pip install --no-deps seglearn==1.2.5``.

Each recording is cut into windows; a window inherits its recording's exercise and subject. Splits
are grouped by subject so no subject is in two splits. Modalities ``"acc"`` and ``"gyro"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _cache
from .synthetic import MultimodalSplits

__all__ = ["MODALITIES", "NUM_CLASSES", "watch", "watch_windows", "watch_fold_subjects", "watch_subjects"]

MODALITIES = {"acc": (0, 1, 2), "gyro": (3, 4, 5)}
NUM_CLASSES = 7
NUM_CHANNELS = 6
SPLITS = ("train", "val", "test")

_PACKAGE, _VERSION = "seglearn", "1.2.5"


def _data_path() -> Path:
    return _cache.require_file(
        _cache.package_dir(_PACKAGE, _VERSION) / "data" / "watch_dataset.npy", _PACKAGE, _VERSION
    )


def _read_npy(path: Path) -> dict:
    """Parse ``watch_dataset.npy``: ``{"X": [float64 (T_i, 6)], "y": int64, "subject": int64}``."""
    try:
        raw = np.load(path, allow_pickle=True).item()
        xs, ys, subjects = raw["X"], np.asarray(raw["y"]), np.asarray(raw["subject"])
    except Exception as err:  # noqa: BLE001 - any failure here means a damaged file
        raise RuntimeError(f"Cannot read {str(path)!r} as the seglearn watch data set: {err}") from err
    if not (len(xs) == len(ys) == len(subjects)) or len(xs) == 0:
        raise RuntimeError(
            f"Inconsistent watch data in {str(path)!r}: {len(xs)} recordings, {len(ys)} labels, "
            f"{len(subjects)} subject ids"
        )
    out_x = []
    for i, x in enumerate(xs):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != NUM_CHANNELS:
            raise RuntimeError(f"Recording {i} in {str(path)!r} has shape {x.shape}; expected (T, {NUM_CHANNELS})")
        out_x.append(torch.from_numpy(np.ascontiguousarray(x)).clone())
    if not np.all((ys == np.round(ys)) & (ys >= 0) & (ys < NUM_CLASSES)):
        raise RuntimeError(f"Labels in {str(path)!r} are not all integers in [0, {NUM_CLASSES})")
    return {
        "X": out_x,
        "y": torch.from_numpy(ys.astype(np.int64)),
        "subject": torch.from_numpy(subjects.astype(np.int64)),
    }


@_cache.memoize
def _load(path: str, size: int, mtime_ns: int) -> dict:
    # size / mtime_ns are part of the in-process key so a changed file is read again.
    return _cache.load_cached(Path(path), "watch", _read_npy, size=size, mtime_ns=mtime_ns)


def _recordings() -> dict:
    """The cached parsed recordings (shared: do not modify, do not return to users)."""
    path = _data_path()
    st = path.stat()
    return _load(str(path), st.st_size, st.st_mtime_ns)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: an int >= 1")
    return value


def watch_subjects() -> tuple[int, ...]:
    """The subject ids, sorted."""
    return tuple(sorted(set(_recordings()["subject"].tolist())))


def watch_fold_subjects(fold: int = 0, num_folds: int = 5) -> dict[str, tuple[int, ...]]:
    """Which subjects each split holds in ``fold``: ``{"train" | "val" | "test": subject ids}``.

    The sorted subject ids are cut into ``num_folds`` contiguous groups (sizes differing by at most
    one, larger groups first); test is group ``fold``, val is group ``(fold + 1) % num_folds``, train
    is the rest.
    """
    subjects = watch_subjects()
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or not 3 <= num_folds <= len(subjects):
        raise ValueError(f"Invalid num_folds: {num_folds!r}; allowed: an int in [3, {len(subjects)}]")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ValueError(f"Invalid fold: {fold!r}; allowed: an int in [0, {num_folds})")
    q, r = divmod(len(subjects), num_folds)
    groups, start = [], 0
    for g in range(num_folds):
        size = q + (1 if g < r else 0)
        groups.append(subjects[start : start + size])
        start += size
    test, val = groups[fold], groups[(fold + 1) % num_folds]
    train = tuple(s for g, grp in enumerate(groups) if g not in (fold, (fold + 1) % num_folds) for s in grp)
    return {"train": train, "val": val, "test": test}


def watch_windows(window: int = 200, stride: int = 100) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """All windows, unstandardised: ``({"acc" | "gyro": float64 (N, 3, window)}, labels, subjects)``.

    Windows start at ``0, stride, 2 * stride, ...`` within each recording and the incomplete tail is
    dropped (a recording shorter than ``window`` gives none). Order: by recording (file order), then
    start time. ``labels`` and ``subjects`` are int64 ``(N,)``. The tensors are fresh.
    """
    window = _check_positive_int("window", window)
    stride = _check_positive_int("stride", stride)
    rec = _recordings()
    chunks, labels, subjects = [], [], []
    for x, y, s in zip(rec["X"], rec["y"].tolist(), rec["subject"].tolist()):
        if x.shape[0] < window:
            continue
        w = x.unfold(0, window, stride)  # (n_windows, 6, window)
        chunks.append(w)
        labels.append(torch.full((w.shape[0],), y, dtype=torch.int64))
        subjects.append(torch.full((w.shape[0],), s, dtype=torch.int64))
    if not chunks:
        longest = max(x.shape[0] for x in rec["X"])
        raise ValueError(f"Invalid window: {window!r}; allowed: at most {longest} (the longest recording)")
    allw = torch.cat(chunks)  # a fresh copy, never a view of the cache
    feats = {m: allw[:, list(ch)].contiguous() for m, ch in MODALITIES.items()}
    return feats, torch.cat(labels), torch.cat(subjects)


def watch(fold: int = 0, *, num_folds: int = 5, window: int = 200, stride: int = 100) -> MultimodalSplits:
    """The watch exercise data set, subject-grouped fold ``fold`` of ``num_folds``.

    Args:
        fold: which subject group is the test split (``watch_fold_subjects``), in ``[0, num_folds)``.
        num_folds: how many contiguous groups the sorted subject ids are cut into, in ``[3, 10]``.
        window: window length in samples (50 Hz; 200 = 4 s).
        stride: step between window starts in samples.

    Modalities ``"acc"`` and ``"gyro"``: float32 ``(n, 3, window)``, each channel standardised with
    the mean and (unbiased) std over all train windows and time steps only. ``groups`` gives each
    window's subject id per split. Windows are ordered by recording, then time: shuffle when batching.
    """
    assignment = watch_fold_subjects(fold, num_folds)
    feats, labels, subjects = watch_windows(window, stride)
    masks = {s: torch.isin(subjects, torch.tensor(assignment[s], dtype=torch.int64)) for s in SPLITS}
    for s in SPLITS:
        if not bool(masks[s].any()):
            raise ValueError(
                f"Invalid window: {window!r}; the {s} split of fold {fold} has no recording of at least "
                f"{window} samples"
            )
    standardised = {}
    for m, x in feats.items():
        train = x[masks["train"]]
        mean = train.mean(dim=(0, 2), keepdim=True)
        std = train.std(dim=(0, 2), keepdim=True)
        std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
        standardised[m] = ((x - mean) / std).float()
    out = [({m: x[masks[s]] for m, x in standardised.items()}, labels[masks[s]]) for s in SPLITS]
    groups = {s: subjects[masks[s]] for s in SPLITS}
    return MultimodalSplits(
        train=out[0], val=out[1], test=out[2], num_classes=NUM_CLASSES, name="watch", groups=groups
    )
