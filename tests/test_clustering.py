"""Clustering diagnosis of docs/algorithm.md §5: scaling, k-means and purity against hand-computed values
and a numpy reference Lloyd."""


import numpy as np
import pytest
import torch

from masked_optim.experiments.clustering import KMeansResult, cluster_purity, kmeans, purity, scale_to_unit


def _blobs(n_per=40, k=4, d=3, spread=0.3, sep=10.0, seed=0):
    """Well-separated Gaussian blobs: centres ``sep`` apart on a simplex-like grid, std ``spread``."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * sep + torch.arange(k, dtype=torch.float64)[:, None] * sep
    y = torch.arange(k).repeat_interleave(n_per)
    x = means[y] + spread * torch.randn(k * n_per, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], y[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a == pi(b) for some bijection pi between the used labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------------------------------- purity


def test_purity_hand_computed():
    clusters = torch.tensor([0, 0, 1, 1, 1, 2])
    labels = torch.tensor([0, 1, 1, 1, 0, 2])
    # cluster 0: {0, 1} -> 1; cluster 1: {1, 1, 0} -> 2; cluster 2: {2} -> 1.
    assert purity(clusters, labels) == pytest.approx(4 / 6, abs=1e-15)
    assert type(purity(clusters, labels)) is float
    # Unused cluster indices change nothing.
    assert purity(clusters, labels, num_clusters=7) == pytest.approx(4 / 6, abs=1e-15)


def test_purity_one_cluster_and_perfect():
    labels = torch.tensor([2, 0, 2, 1, 2, 0, 2])
    assert purity(torch.zeros(7, dtype=torch.long), labels) == pytest.approx(4 / 7, abs=1e-15)
    # Perfect up to a relabelling, and one cluster per sample.
    assert purity(torch.tensor([5, 3, 5, 0, 5, 3, 5]), labels) == 1.0
    assert purity(torch.arange(7), labels) == 1.0
    # Purity is not symmetric: a single label is "pure" for any clustering.
    assert purity(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 0, 0])) == 1.0
    assert purity(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 1, 0])) == 0.5


def test_purity_errors():
    with pytest.raises(ValueError, match=r"Invalid labels: 2 samples; allowed: 3"):
        purity(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"Invalid cluster_labels: empty"):
        purity(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"Invalid labels: value -1; allowed: non-negative"):
        purity(torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"Invalid cluster_labels: shape \(2,\) dtype torch.float32"):
        purity(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"Invalid cluster_labels: cluster 3; allowed: integers in \[0, 2\]"):
        purity(torch.tensor([0, 3]), torch.tensor([0, 1]), num_clusters=3)
    with pytest.raises(ValueError, match=r"Invalid num_clusters: 0; allowed: an int >= 1"):
        purity(torch.tensor([0, 0]), torch.tensor([0, 1]), num_clusters=0)


# ---------------------------------------------------------------------------------------- scaling


def test_scale_to_unit():
    x = torch.tensor([[1.0, 5.0, 3.0], [3.0, 5.0, -0.3], [2.0, 5.0, 0.7], [7.0, 5.0, 0.1]])
    s = scale_to_unit(x)
    assert s.dtype == torch.float64 and s.shape == x.shape
    assert torch.equal(s.min(dim=0).values[[0, 2]], torch.tensor([-1.0, -1.0], dtype=torch.float64))
    assert torch.equal(s.max(dim=0).values[[0, 2]], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(s[:, 1], torch.zeros(4, dtype=torch.float64))  # constant column
    expected0 = torch.tensor([-1.0, -1 + 2 * 2 / 6, -1 + 2 * 1 / 6, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s[:, 0], expected0, rtol=0, atol=1e-15)
    assert torch.equal(x, torch.tensor([[1.0, 5.0, 3.0], [3.0, 5.0, -0.3], [2.0, 5.0, 0.7], [7.0, 5.0, 0.1]]))


def test_scale_to_unit_random_and_extreme():
    x = torch.randn(500, 7, dtype=torch.float32) * torch.logspace(-20, 20, 7)
    s = scale_to_unit(x)
    assert (s.min(dim=0).values == -1).all() and (s.max(dim=0).values == 1).all()
    assert (s >= -1).all() and (s <= 1).all()
    # A column spanning more than float64's range does not overflow.
    big = torch.tensor([[-1.5e308], [0.0], [1.5e308]], dtype=torch.float64)
    torch.testing.assert_close(scale_to_unit(big)[:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(scale_to_unit(torch.tensor([[4.0, -2.0]])), torch.zeros(1, 2, dtype=torch.float64))


def test_scale_to_unit_errors():
    with pytest.raises(ValueError, match=r"Invalid x: shape \(3,\) dtype torch.float32"):
        scale_to_unit(torch.zeros(3))
    with pytest.raises(ValueError, match=r"Invalid x: shape \(0, 2\)"):
        scale_to_unit(torch.zeros(0, 2))
    with pytest.raises(ValueError, match=r"Invalid x: contains NaN or inf"):
        scale_to_unit(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match=r"Invalid x: shape \(2, 1\) dtype torch.int64"):
        scale_to_unit(torch.tensor([[1], [2]]))


# ---------------------------------------------------------------------------------------- k-means


def test_kmeans_recovers_blobs():
    x, y = _blobs()
    res = kmeans(x, 4, seed=3)
    assert isinstance(res, KMeansResult)
    assert res.labels.dtype == torch.int64 and res.labels.shape == (160,)
    assert res.centers.dtype == torch.float64 and res.centers.shape == (4, 3)
    assert isinstance(res.inertia, float) and isinstance(res.n_iter, int) and res.n_iter >= 1
    assert purity(res.labels, y) == 1.0
    assert _same_partition(res.labels, y)
    assert cluster_purity(x, y, 4) == 1.0
    assert cluster_purity(x.float(), y, 4, n_init=2, seed=5) == 1.0


def test_kmeans_inertia_and_centers_consistent():
    x, _ = _blobs(n_per=30, k=5, d=4, spread=2.0, sep=4.0)  # overlapping: a non-trivial run
    res = kmeans(x, 5, n_init=3, seed=1)
    diff = x - res.centers[res.labels]
    assert res.inertia == pytest.approx(float((diff**2).sum()), rel=1e-9)
    for j in range(5):
        members = x[res.labels == j]
        assert members.shape[0] > 0
        torch.testing.assert_close(res.centers[j], members.mean(dim=0), rtol=0, atol=1e-12)
    # Every sample sits at its nearest centre.
    d2 = torch.cdist(x, res.centers) ** 2
    assert (d2.gather(1, res.labels[:, None]).squeeze(1) <= d2.min(dim=1).values + 1e-9).all()


def test_kmeans_deterministic_and_global_rng_free():
    x, _ = _blobs(n_per=30, k=5, d=4, spread=2.0, sep=4.0)
    torch.manual_seed(123)
    a = kmeans(x, 5, n_init=3, seed=7)
    torch.manual_seed(999)
    torch.rand(17)
    b = kmeans(x, 5, n_init=3, seed=7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centers, b.centers)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    # kmeans neither reads nor advances the global generator.
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    kmeans(x, 5, n_init=2, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_kmeans_seed_matters_and_restarts_never_increase_inertia():
    x, _ = _blobs(n_per=25, k=6, d=2, spread=3.0, sep=3.0)
    runs1 = [kmeans(x, 6, n_init=1, seed=s) for s in range(6)]
    assert len({r.inertia for r in runs1}) > 1  # the seed changes the k-means++ draw
    for s, one in enumerate(runs1):
        many = kmeans(x, 6, n_init=10, seed=s)
        assert many.inertia <= one.inertia
    # The first of the n_init runs is the n_init=1 run: n_init=2 = min(run 1, its second run).
    two = kmeans(x, 6, n_init=2, seed=0)
    assert two.inertia <= runs1[0].inertia


def test_kmeans_empty_clusters_and_k_equal_n():
    # k = n with duplicates: only 3 distinct points for 6 clusters, so some stay empty.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [5.0, 5.0]])
    res = kmeans(x, 6, n_init=3, seed=0)
    assert res.labels.shape == (6,) and ((res.labels >= 0) & (res.labels < 6)).all()
    assert res.inertia == 0.0
    assert _same_partition(res.labels, torch.tensor([0, 0, 1, 1, 2, 2]))
    # k = n, distinct points: every point its own cluster.
    x = torch.randn(9, 3, dtype=torch.float64)
    res = kmeans(x, 9, n_init=2, seed=0)
    assert sorted(res.labels.tolist()) == list(range(9)) and res.inertia == 0.0
    # An initialisation that leaves a cluster empty: centre 2 is far from everything, so it is
    # re-seeded at the sample farthest from its centre, and the final labelling uses all 3.
    # Iteration 1: cluster 2 is empty; the sample farthest from its centre is 110.2 (5.2 from
    # 105), which becomes centre 2. Then: {100, 100.1, 100.2}, {110, 110.1}, {110.2}.
    x = torch.tensor([[100.0], [100.1], [100.2], [110.0], [110.1], [110.2]], dtype=torch.float64)
    res = kmeans(x, 3, init=torch.tensor([[100.1], [105.0], [1000.0]], dtype=torch.float64))
    assert res.labels.tolist() == [0, 0, 0, 1, 1, 2]
    expected = torch.tensor([[100.1], [110.05], [110.2]], dtype=torch.float64)
    torch.testing.assert_close(res.centers, expected, rtol=0, atol=1e-12)
    # k = 1: the mean.
    res = kmeans(x, 1)
    assert torch.equal(res.labels, torch.zeros(6, dtype=torch.int64))
    torch.testing.assert_close(res.centers[0], x.mean(dim=0), rtol=0, atol=1e-15)


def _reference_lloyd(x: np.ndarray, centers: np.ndarray, max_iter: int = 100, tol: float = 1e-6):
    """Plain numpy Lloyd (direct squared distances, first centre on ties, no empty clusters
    expected), stopping like scikit-learn: labels repeat, or centre shift <= tol * mean variance,
    or max_iter; unless the labels repeated, a final assignment to the last centres."""
    threshold = tol * x.var(axis=0).mean()
    labels_old = None
    for it in range(1, max_iter + 1):
        d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        labels = d2.argmin(axis=1)
        new = np.stack([x[labels == j].mean(axis=0) for j in range(centers.shape[0])])
        shift = ((new - centers) ** 2).sum()
        centers = new
        if labels_old is not None and np.array_equal(labels, labels_old):
            return labels, centers, it
        if shift <= threshold:
            break
        labels_old = labels
    d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return d2.argmin(axis=1), centers, it


@pytest.mark.parametrize(
    "k,d,seed,max_iter,tol",
    [(3, 2, 0, 100, 1e-6), (5, 4, 1, 100, 1e-6), (8, 6, 2, 100, 0.0), (5, 3, 3, 2, 1e-6), (6, 2, 4, 100, 1e-3)],
)
def test_kmeans_matches_numpy_reference(k, d, seed, max_iter, tol):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, d)) + rng.normal(scale=3.0, size=(1, d)) * rng.integers(0, 3, size=(300, 1))
    init = x[rng.choice(300, size=k, replace=False)]
    ref_labels, ref_centers, ref_iter = _reference_lloyd(x, init.copy(), max_iter=max_iter, tol=tol)
    res = kmeans(torch.from_numpy(x), k, init=torch.from_numpy(init), n_init=5, seed=99, max_iter=max_iter, tol=tol)
    assert np.array_equal(res.labels.numpy(), ref_labels)
    np.testing.assert_allclose(res.centers.numpy(), ref_centers, rtol=0, atol=1e-12)
    assert res.n_iter == ref_iter
    diff = x - ref_centers[ref_labels]
    assert res.inertia == pytest.approx(float((diff**2).sum()), rel=1e-12)


def test_kmeans_stops_early_with_labels_of_nearest_centres():
    x, _ = _blobs(n_per=30, k=5, d=4, spread=2.0, sep=4.0)
    init = x[:5].clone()
    full = kmeans(x, 5, init=init)
    assert full.n_iter > 2
    # A huge tol stops after one iteration; max_iter=2 after two. Either way the returned labels
    # are those of the nearest returned centre (a final assignment step), not the stale ones.
    for res, n_iter in ((kmeans(x, 5, init=init, tol=1e9), 1), (kmeans(x, 5, init=init, max_iter=2), 2)):
        assert res.n_iter == n_iter
        d2 = ((x[:, None, :] - res.centers[None]) ** 2).sum(dim=2)
        assert torch.equal(res.labels, d2.argmin(dim=1))
        diff = x - res.centers[res.labels]
        assert res.inertia == pytest.approx(float((diff**2).sum()), rel=1e-12)


def test_kmeans_restarts_share_the_first_draw(monkeypatch):
    """Run 1 of n_init=10 starts from the same k-means++ centres as the n_init=1 run."""
    import masked_optim.experiments.clustering as clustering

    starts = []
    real = clustering._lloyd

    def recording(x, x_sq, centers, max_iter, tol):
        starts.append(centers.clone())
        return real(x, x_sq, centers, max_iter, tol)

    monkeypatch.setattr(clustering, "_lloyd", recording)
    x, _ = _blobs(n_per=25, k=6, d=2, spread=3.0, sep=3.0)
    for seed in (0, 4):
        starts.clear()
        kmeans(x, 6, n_init=1, seed=seed)
        kmeans(x, 6, n_init=10, seed=seed)
        assert len(starts) == 11
        assert torch.equal(starts[0], starts[1])
        assert not torch.equal(starts[1], starts[2])  # the restarts draw anew
        # Every start is a k-means++ draw: k distinct samples of x.
        for c in starts:
            assert all(bool((x == row).all(dim=1).any()) for row in c)
            assert torch.unique(c, dim=0).shape[0] == 6


def test_kmeans_large_chunked():
    # More rows than one chunk (65536): exercises the blocked distance / sum code paths.
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]], dtype=torch.float64)
    y = torch.randint(3, (70000,), generator=g)
    x = means[y] + torch.randn(70000, 2, generator=g, dtype=torch.float64)
    res = kmeans(x, 3, n_init=1, max_iter=20, seed=0)
    assert _same_partition(res.labels, y)


def test_kmeans_matches_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    x, _ = _blobs(n_per=50, k=5, d=3, spread=0.5, sep=8.0)
    ours = kmeans(x, 5, n_init=10, seed=0)
    theirs = cluster.KMeans(n_clusters=5, n_init=10, random_state=0).fit(x.numpy())
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-6)


def test_kmeans_errors():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"Invalid k: 6; allowed: an int in \[1, 5\]"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match=r"Invalid k: 0; allowed"):
        kmeans(x, 0)
    with pytest.raises(TypeError, match=r"Invalid k: 2.0 \(type float\)"):
        kmeans(x, 2.0)
    with pytest.raises(ValueError, match=r"Invalid n_init: 0; allowed: an int >= 1"):
        kmeans(x, 2, n_init=0)
    with pytest.raises(ValueError, match=r"Invalid max_iter: 0; allowed: an int >= 1"):
        kmeans(x, 2, max_iter=0)
    with pytest.raises(ValueError, match=r"Invalid tol: -1.0; allowed: a finite number >= 0"):
        kmeans(x, 2, tol=-1.0)
    with pytest.raises(ValueError, match=r"Invalid seed: -3"):
        kmeans(x, 2, seed=-3)
    with pytest.raises(ValueError, match=r"Invalid x: contains NaN or inf"):
        kmeans(torch.tensor([[0.0], [float("inf")]]), 1)
    with pytest.raises(ValueError, match=r"Invalid x: shape \(5,\) dtype torch.float32"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match=r"Invalid init: shape \(3, 2\); allowed: \(2, 2\)"):
        kmeans(x, 2, init=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"Invalid labels: 4 samples; allowed: 5"):
        cluster_purity(x, torch.tensor([0, 1, 0, 1]), 2)
