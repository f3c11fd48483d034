r"""Cluster purity of learned features for Diagnosing & Re-learning (docs/algorithm.md §5).

The diagnosis scales every feature dimension to :math:`[-1, 1]`, runs k-means with
:math:`k` = the number of classes and scores the clustering by its purity:

* :func:`scale_to_unit`: per-column min-max scaling to :math:`[-1, 1]`;
* :func:`kmeans`: Lloyd's algorithm with k-means++ seeding and ``n_init`` restarts, all in
  float64 torch on the input's device (CPU or CUDA; no python loop over samples);
* :func:`purity`: every cluster votes its majority label, purity = accuracy of that labelling;
* :func:`cluster_purity`: the three steps above in one call.

Results are deterministic for a given ``seed`` and device, independent of torch's global RNG
state. Inputs are left untouched.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .metrics import _check_labels as _check_class_labels

__all__ = ["KMeansResult", "scale_to_unit", "kmeans", "purity", "cluster_purity"]

# Upper bound on the elements of one (rows, k) block of distances / one-hot memberships
# (2**25 float64 = 256 MiB), and on its rows.
_BLOCK_ELEMENTS = 1 << 25
_MAX_CHUNK_ROWS = 65536


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    ``labels``: ``(n,)`` int64 cluster of every sample, in ``[0, k)``; ``centers``: ``(k, d)``
    float64 centres; ``inertia``: :math:`\\sum_i \\lVert x_i - c_{\\text{labels}_i} \\rVert^2`
    (python float); ``n_iter``: Lloyd iterations of the kept run.
    """

    labels: Tensor
    centers: Tensor
    inertia: float
    n_iter: int


# ------------------------------------------------------------------------------------ validation


def _check_features(name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        what = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Invalid {name}: {what}; allowed: a floating (n, d) tensor")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"Invalid {name}: shape {tuple(x.shape)}; allowed: at least one sample and one feature")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"Invalid {name}: contains NaN or inf; allowed: finite values")
    return x


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> int:
    allowed = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (type {type(value).__name__}); allowed: {allowed}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"Invalid {name}: {value!r}; allowed: {allowed}")
    return value


def _check_labels(name: str, labels, length: Optional[int] = None) -> Tensor:
    labels = _check_class_labels(name, labels, length)
    lo = int(labels.min())
    if lo < 0:
        raise ValueError(f"Invalid {name}: value {lo}; allowed: non-negative integers")
    return labels


# ---------------------------------------------------------------------------------------- scaling


def scale_to_unit(x: Tensor) -> Tensor:
    r"""Min-max scale every column of a floating ``(n, d)`` tensor to :math:`[-1, 1]`.

    .. math:: s_{ij} = 2\,\frac{x_{ij} - \min_i x_{ij}}{\max_i x_{ij} - \min_i x_{ij}} - 1,

    computed in float64 on ``x``'s device and returned as float64. Each column's minimum maps
    to exactly :math:`-1` and its maximum to exactly :math:`1`; a constant column maps to 0.
    (The differences are taken on halved values, which is exact away from subnormals, so that
    columns spanning more than the float64 range do not overflow.)
    """
    x = _check_features("x", x).to(torch.float64)
    half = x * 0.5
    lo = half.min(dim=0).values
    span = half.max(dim=0).values - lo
    constant = span == 0
    scaled = (half - lo) / torch.where(constant, torch.ones_like(span), span) * 2.0 - 1.0
    return torch.where(constant, torch.zeros_like(scaled), scaled)


# ---------------------------------------------------------------------------------------- k-means


def _chunk_rows(k: int) -> int:
    return max(1, min(_MAX_CHUNK_ROWS, _BLOCK_ELEMENTS // max(k, 1)))


def _assign(x: Tensor, x_sq: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    r"""Nearest centre of every row (first one on ties) and the squared distance to it.

    :math:`\lVert x - c\rVert^2 = \lVert x\rVert^2 - 2\,x c^\top + \lVert c\rVert^2`, clamped at 0,
    in blocks of rows.
    """
    n, k = x.shape[0], centers.shape[0]
    c_sq = (centers * centers).sum(dim=1)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=torch.float64, device=x.device)
    step = _chunk_rows(k)
    for s in range(0, n, step):
        e = min(n, s + step)
        d2 = (x_sq[s:e, None] - 2.0 * (x[s:e] @ centers.T) + c_sq[None, :]).clamp_min_(0.0)
        idx = d2.argmin(dim=1)
        labels[s:e] = idx
        dist[s:e] = d2.gather(1, idx[:, None]).squeeze(1)
    return labels, dist


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster coordinate sums (a one-hot matmul, deterministic on CUDA unlike index_add_) and counts."""
    n, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    step = _chunk_rows(k)
    for s in range(0, n, step):
        e = min(n, s + step)
        onehot = torch.nn.functional.one_hot(labels[s:e], k).to(torch.float64)
        sums += onehot.T @ x[s:e]
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


def _inertia(x: Tensor, labels: Tensor, centers: Tensor) -> float:
    """:math:`\\sum_i \\lVert x_i - c_{l_i}\\rVert^2` from the differences themselves (no expansion)."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    step = _MAX_CHUNK_ROWS
    for s in range(0, n, step):
        e = min(n, s + step)
        diff = x[s:e] - centers[labels[s:e]]
        total += (diff * diff).sum()
    return float(total)


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    r"""k-means++ seeding (Arthur & Vassilvitskii, 2007): plain :math:`D^2` sampling.

    The first centre is a uniformly drawn sample; each next one is sample :math:`i` with
    probability :math:`D_i^2 / \sum_j D_j^2`, :math:`D_i` being its distance to the nearest
    centre chosen so far (uniform again when every :math:`D_i = 0`). The random numbers come
    from ``generator`` (on CPU) one scalar at a time; the sampling itself is an inverse-CDF
    search on ``x``'s device, so only scalars cross devices.
    """
    n = x.shape[0]
    dev = x.device
    centers = torch.empty(k, x.shape[1], dtype=torch.float64, device=dev)
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = x[first]
    diff = x - centers[0]
    d2 = (diff * diff).sum(dim=1)
    for j in range(1, k):
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        cdf = torch.cumsum(d2, dim=0)
        total = float(cdf[-1])
        if total > 0.0:
            target = torch.tensor([u * total], dtype=torch.float64, device=dev)
            i = int(torch.searchsorted(cdf, target, right=True)[0])
            if i >= n or float(d2[i]) == 0.0:  # rounding at the top end: last sample with D > 0
                i = int(torch.nonzero(d2 > 0)[-1, 0])
        else:
            i = min(int(u * n), n - 1)
        centers[j] = x[i]
        diff = x - centers[j]
        d2 = torch.minimum(d2, (diff * diff).sum(dim=1))
    return centers


def _lloyd(x: Tensor, x_sq: Tensor, centers: Tensor, max_iter: int, tol: float) -> KMeansResult:
    r"""Lloyd iterations from ``centers``, following scikit-learn's ``_kmeans_single_lloyd``.

    Each iteration assigns every sample to its nearest centre and moves every centre to the
    mean of its members. An empty cluster is re-seeded at the sample farthest from its own
    (pre-update) centre, the farthest ones going to the empty clusters in index order (ties:
    lowest sample index). Stops when the labels repeat with no re-seeding ("strict"
    convergence: the centres are then exactly the means of the returned labels), when the
    total squared centre shift :math:`\sum_j \lVert c_j' - c_j\rVert^2 \le` ``tol``, or after
    ``max_iter`` iterations; unless strict, a final assignment step makes the labels those of
    the nearest returned centres.
    """
    k = centers.shape[0]
    labels_old = None
    strict = False
    it = 0
    for it in range(1, max_iter + 1):
        labels, dist = _assign(x, x_sq, centers)
        sums, counts = _cluster_sums(x, labels, k)
        empty = counts == 0
        new_centers = sums / counts.clamp_min(1).to(torch.float64)[:, None]
        n_empty = int(empty.sum())
        if n_empty:
            order = torch.sort(dist, descending=True, stable=True).indices[:n_empty]
            empty_idx = torch.nonzero(empty)[:, 0]
            new_centers[empty_idx] = x[order]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if n_empty == 0 and labels_old is not None and torch.equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        labels, _ = _assign(x, x_sq, centers)
    return KMeansResult(labels, centers, _inertia(x, labels, centers), it)


def kmeans(
    x: Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    init: Optional[Tensor] = None,
) -> KMeansResult:
    r"""k-means (Lloyd's algorithm) of the rows of a floating ``(n, d)`` tensor into ``k`` clusters.

    Minimises the inertia :math:`\sum_i \min_j \lVert x_i - c_j\rVert^2`. Everything runs in
    float64 on ``x``'s device (chunked, ``(65536, k)`` blocks at most, so 100k x 64 fits easily).

    * Seeding: k-means++ (:math:`D^2` sampling), ``n_init`` runs, keeping the lowest inertia
      (the first run on ties). The runs draw, in turn, from ONE CPU ``torch.Generator`` seeded
      with ``seed``, so the first run of ``n_init=m`` is the run of ``n_init=1``: more restarts
      never increase the inertia for a fixed seed. Torch's global RNG is neither used nor touched.
    * Convergence: labels unchanged, or total squared centre shift
      :math:`\le` ``tol`` :math:`\cdot \frac{1}{d}\sum_f \operatorname{Var}(x_{\cdot f})`
      (population variance, as scikit-learn), or ``max_iter`` iterations.
    * Empty clusters are re-seeded at the samples farthest from their centres (see
      :func:`_lloyd`).
    * ``init``: a ``(k, d)`` tensor of initial centres; skips k-means++ and runs once
      (``n_init`` and ``seed`` are then unused, the run being deterministic).

    Returns a :class:`KMeansResult` (``labels`` int64 ``(n,)``, ``centers`` float64 ``(k, d)``,
    ``inertia`` and ``n_iter`` of the kept run).
    """
    x = _check_features("x", x)
    n, d = x.shape
    k = _check_int("k", k, 1, n)
    n_init = _check_int("n_init", n_init, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"Invalid tol: {tol!r} (type {type(tol).__name__}); allowed: a finite number >= 0")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"Invalid tol: {tol!r}; allowed: a finite number >= 0")
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    x = x.detach().to(torch.float64)
    if init is not None:
        if not isinstance(init, Tensor) or init.dim() != 2 or not init.dtype.is_floating_point:
            what = f"shape {tuple(init.shape)} dtype {init.dtype}" if isinstance(init, Tensor) else type(init).__name__
            raise ValueError(f"Invalid init: {what}; allowed: a floating ({k}, {d}) tensor of initial centres")
        if tuple(init.shape) != (k, d):
            raise ValueError(f"Invalid init: shape {tuple(init.shape)}; allowed: ({k}, {d}), k centres of x's width")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("Invalid init: contains NaN or inf; allowed: finite values")
    threshold = float(tol * x.var(dim=0, unbiased=False).mean())
    x_sq = (x * x).sum(dim=1)
    if init is not None:
        return _lloyd(x, x_sq, init.detach().to(device=x.device, dtype=torch.float64).clone(), max_iter, threshold)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    best = None
    for _ in range(n_init):
        run = _lloyd(x, x_sq, _kmeans_plus_plus(x, k, generator), max_iter, threshold)
        if best is None or run.inertia < best.inertia:
            best = run
    return best


# ----------------------------------------------------------------------------------------- purity


def purity(cluster_labels: Tensor, labels: Tensor, num_clusters: Optional[int] = None) -> float:
    r"""Purity of a clustering: every cluster votes its majority label.

    .. math:: \text{purity} = \frac{1}{n} \sum_{c} \max_{y} \bigl|\{i : \text{cluster}_i = c,\ y_i = y\}\bigr|,

    i.e. the accuracy of labelling each sample with its cluster's majority label. Both inputs
    are ``(n,)`` non-negative integer tensors; ``num_clusters``, if given, bounds the cluster
    indices (``[0, num_clusters)``). Returns a python float in :math:`(0, 1]`.
    """
    cluster_labels = _check_labels("cluster_labels", cluster_labels)
    labels = _check_labels("labels", labels, cluster_labels.shape[0]).to(cluster_labels.device)
    n_clusters = int(cluster_labels.max()) + 1
    if num_clusters is not None:
        num_clusters = _check_int("num_clusters", num_clusters, 1)
        if n_clusters > num_clusters:
            raise ValueError(
                f"Invalid cluster_labels: cluster {n_clusters - 1}; allowed: integers in [0, {num_clusters - 1}]"
            )
        n_clusters = num_clusters
    n_labels = int(labels.max()) + 1
    table = torch.bincount(cluster_labels.long() * n_labels + labels.long(), minlength=n_clusters * n_labels)
    majority = table.view(n_clusters, n_labels).max(dim=1).values.sum()
    return int(majority) / cluster_labels.shape[0]


def cluster_purity(features: Tensor, labels: Tensor, k: int, *, n_init: int = 10, seed: int = 0) -> float:
    """docs/algorithm.md §5 diagnosis: :func:`scale_to_unit`, then :func:`kmeans` with ``k`` clusters, then :func:`purity`."""
    features = _check_features("features", features)
    _check_labels("labels", labels, features.shape[0])
    result = kmeans(scale_to_unit(features), k, n_init=n_init, seed=seed)
    return purity(result.labels, labels, num_clusters=k)
