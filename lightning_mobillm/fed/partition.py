"""Partitions of a labelled data set across N federated devices: IID, Dirichlet(alpha) over labels, by size.

:func:`make_partition` takes the data set's integer labels (or just its length, for the schemes that need no
labels) and returns a :class:`Partition`: one sorted list of sample indices per device, every sample on
exactly one device, with the parameters that made it. :meth:`Partition.summary` is the JSON-able record
that goes into a run's ``summary.json`` (sizes and per-class counts per device).

Schemes:

* ``"iid"``: a seeded shuffle cut into ``num_devices`` contiguous pieces of near-equal size (the first
  ``n % num_devices`` devices get one sample more).
* ``"dirichlet"``: per class, the class's samples are shared among the devices in proportions drawn from
  Dirichlet(alpha, ..., alpha) (Yurochkin et al. 2019, as flwr-datasets does). Small alpha: each device sees few
  classes; large alpha: close to IID. A draw in which some device gets fewer than ``min_partition_size``
  samples is redrawn, at most ``max_attempts`` times; ``min_partition_size=0`` allows empty devices
  (needed for alpha 0.1 on BBC News' 1602 training samples, ``../shared/FED.md``).
* ``"by_size"``: device sizes given (``sizes``) or drawn (``size_distribution``: weights from a lognormal
  with ``size_sigma`` or a power law with ``size_exponent``, scaled to the data set, each device at least
  ``min_partition_size``); samples are then dealt IID in a seeded order. Skews quantity, not labels.

Implementations: ``"builtin"`` (numpy, the default) or ``"flwr_datasets"`` (flwr-datasets' ``IidPartitioner``,
``DirichletPartitioner`` and ``SizePartitioner`` on an in-memory ``datasets.Dataset``; an optional package,
imported only here, since it pins ``datasets<5``); ``"auto"`` takes flwr-datasets when it is importable. The
two give the same partition for ``"iid"`` and ``"by_size"`` (flwr-datasets cuts contiguous pieces of the
order ``datasets.Dataset.shuffle(seed=seed)`` makes, which is the built-in's order) and different ones for
``"dirichlet"`` (the built-in shuffles each class before splitting it and rounds shares by largest
remainder; flwr-datasets splits each class in index order and truncates), so a partition records which
implementation made it, and with which version. The default is ``"builtin"`` so that the same arguments
give the same partition whether or not flwr-datasets happens to be installed.

Deterministic: every draw comes from ``numpy.random.Generator(PCG64(seed))`` (the by-size weights from a
child stream of ``SeedSequence(seed)``), so the same arguments and numpy version give the same partition on
every machine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["IMPLEMENTATIONS", "SCHEMES", "SIZE_DISTRIBUTIONS", "Partition", "make_partition", "scheme_knobs"]

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "by_size")
IMPLEMENTATIONS: tuple[str, ...] = ("builtin", "flwr_datasets", "auto")
SIZE_DISTRIBUTIONS: tuple[str, ...] = ("lognormal", "power_law")
FLWR_INSTALL_HINT = "pip install flwr-datasets (not a dependency of lightning_mobillm: it pins datasets<5)"


@dataclass(frozen=True)
class Partition:
    """Which samples each device holds, and how that was decided.

    Attributes:
        indices: per device, the sorted indices of its samples in the data set; disjoint, and together
            ``range(num_samples)``.
        scheme: one of :data:`SCHEMES`.
        seed: the seed of every draw.
        implementation: ``"builtin"`` or ``"flwr_datasets"`` (``"auto"`` resolved).
        implementation_version: ``"numpy <version>"`` or ``"flwr-datasets <version>"``: a numpy release may
            change its random streams, and flwr-datasets its algorithms.
        num_samples: the data set's size.
        num_classes: the number of classes (None when only the size was given).
        class_counts: per device, its number of samples of each class (None when only the size was given).
        alpha: Dirichlet concentration (``"dirichlet"`` only).
        min_partition_size: the smallest device size allowed (``"dirichlet"`` and ``"by_size"``).
        size_distribution: ``"explicit"``, ``"lognormal"`` or ``"power_law"`` (``"by_size"`` only).
        size_parameter: the lognormal's sigma or the power law's exponent (``"by_size"`` when drawn).
        attempts: Dirichlet draws made until one met ``min_partition_size`` (built-in ``"dirichlet"`` only).
    """

    indices: tuple[tuple[int, ...], ...]
    scheme: str
    seed: int
    implementation: str
    implementation_version: str
    num_samples: int
    num_classes: int | None = None
    class_counts: tuple[tuple[int, ...], ...] | None = None
    alpha: float | None = None
    min_partition_size: int | None = None
    size_distribution: str | None = None
    size_parameter: float | None = None
    attempts: int | None = None

    def __post_init__(self) -> None:
        seen = np.zeros(self.num_samples, dtype=np.int64)
        for device, idx in enumerate(self.indices):
            array = np.asarray(idx, dtype=np.int64)
            if (np.diff(array) <= 0).any():
                raise ValueError(f"Partition.indices[{device}] is not strictly increasing")
            if array.size and (array[0] < 0 or array[-1] >= self.num_samples):
                raise ValueError(f"Partition.indices[{device}] is outside range({self.num_samples})")
            seen[array] += 1
        if not (seen == 1).all():
            raise ValueError("Partition.indices must hold every sample exactly once "
                             f"({int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated)")
        if self.class_counts is not None:
            if [sum(row) for row in self.class_counts] != list(self.sizes):
                raise ValueError("Partition.class_counts do not add up to the device sizes")

    @property
    def num_devices(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of samples on each device."""
        return tuple(len(idx) for idx in self.indices)

    def summary(self, include_indices: bool = False) -> dict[str, Any]:
        """A plain JSON-able record for ``summary.json``: the parameters, per-device sizes and, with labels,
        per-device class counts and the number of classes each device holds (``mean_classes_per_device`` is
        over the non-empty devices). The indices themselves only when asked: the parameters and the
        implementation's version reproduce them."""
        out: dict[str, Any] = {
            "scheme": self.scheme,
            "implementation": self.implementation,
            "implementation_version": self.implementation_version,
            "seed": self.seed,
            "num_devices": self.num_devices,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "alpha": self.alpha,
            "min_partition_size": self.min_partition_size,
            "size_distribution": self.size_distribution,
            "size_parameter": self.size_parameter,
            "attempts": self.attempts,
            "sizes": list(self.sizes),
            "empty_devices": sum(1 for size in self.sizes if size == 0),
            "class_counts": None,
            "classes_per_device": None,
            "mean_classes_per_device": None,
        }
        if self.class_counts is not None:
            held = [sum(1 for c in row if c > 0) for row in self.class_counts]
            nonempty = [h for h, size in zip(held, self.sizes) if size > 0]
            out["class_counts"] = [list(row) for row in self.class_counts]
            out["classes_per_device"] = held
            out["mean_classes_per_device"] = sum(nonempty) / len(nonempty) if nonempty else 0.0
        if include_indices:
            out["indices"] = [list(idx) for idx in self.indices]
        return out


def scheme_knobs(scheme: str, *, alpha: float | None, min_partition_size: int) -> dict[str, Any]:
    """The keyword arguments of :func:`make_partition` that ``scheme`` takes from a device's settings: ``alpha``
    for ``"dirichlet"``, ``min_partition_size`` for every scheme but ``"iid"``."""
    knobs: dict[str, Any] = {}
    if scheme == "dirichlet":
        knobs["alpha"] = alpha
    if scheme != "iid":
        knobs["min_partition_size"] = min_partition_size
    return knobs


def make_partition(
    labels: Sequence[int] | np.ndarray | int,
    num_devices: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float | None = None,
    min_partition_size: int = 1,
    max_attempts: int = 100,
    sizes: Sequence[int] | None = None,
    size_distribution: str = "lognormal",
    size_sigma: float = 1.0,
    size_exponent: float = 1.5,
    num_classes: int | None = None,
    implementation: str = "builtin",
) -> Partition:
    """Partition a data set across ``num_devices`` devices.

    Args:
        labels: the data set's integer class labels (``>= 0``), or its number of samples (``"iid"`` and
            ``"by_size"`` need no labels; without them the result has no per-class counts).
        num_devices: the number of devices, ``>= 1``.
        scheme: ``"iid"``, ``"dirichlet"`` or ``"by_size"`` (see the module's docstring).
        seed: seed of every draw (an int ``>= 0``).
        alpha: the Dirichlet concentration, ``> 0`` (``"dirichlet"`` only, and needed there).
        min_partition_size: the fewest samples a device may get (``"dirichlet"``, ``"by_size"``); 0 allows
            empty devices.
        max_attempts: Dirichlet draws tried before giving up on ``min_partition_size`` (built-in only;
            flwr-datasets makes at most 11).
        sizes: explicit device sizes for ``"by_size"``: ``num_devices`` ints that add up to the data set.
        size_distribution: how ``"by_size"`` draws sizes when ``sizes`` is not given: ``"lognormal"``
            (weights ``exp(N(0, size_sigma^2))``) or ``"power_law"`` (Pareto weights, ``P(w > x) = x **
            -size_exponent`` for ``x >= 1``: smaller exponents give a heavier tail of large devices).
        size_sigma: the lognormal's sigma, ``> 0``.
        size_exponent: the power law's exponent, ``> 0``.
        num_classes: the number of classes when some have no sample here (default: largest label + 1).
        implementation: ``"builtin"``, ``"flwr_datasets"`` or ``"auto"`` (flwr-datasets when importable).

    Returns:
        The :class:`Partition`.

    Raises:
        ValueError: a parameter out of range (the message names it), or no Dirichlet draw within
            ``max_attempts`` met ``min_partition_size``.
        ImportError: ``implementation="flwr_datasets"`` without flwr-datasets installed.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed schemes: {', '.join(SCHEMES)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    _check_int("num_devices", num_devices, 1)
    _check_int("seed", seed, 0)
    _check_int("min_partition_size", min_partition_size, 0)
    _check_int("max_attempts", max_attempts, 1)
    seed, min_partition_size = int(seed), int(min_partition_size)  # numpy ints in, plain ints in the record
    label_array, n = _read_labels(labels)
    if num_classes is not None:
        _check_int("num_classes", num_classes, 1)
        num_classes = int(num_classes)
        if label_array is not None and label_array.size and int(label_array.max()) >= num_classes:
            raise ValueError(f"num_classes={num_classes} but labels go up to {int(label_array.max())}")
    elif label_array is not None:
        num_classes = int(label_array.max()) + 1 if label_array.size else 0
    if alpha is not None and scheme != "dirichlet":
        raise ValueError(f"alpha is only used by scheme='dirichlet', not {scheme!r}")
    if sizes is not None and scheme != "by_size":
        raise ValueError(f"sizes is only used by scheme='by_size', not {scheme!r}")
    impl = _resolve(implementation)
    common: dict[str, Any] = {"scheme": scheme, "seed": seed, "num_samples": n}

    if scheme == "iid":
        if num_devices > n:
            raise ValueError(f"num_devices={num_devices} is more than the {n} samples: an IID partition "
                             "would leave devices empty")
        parts = _iid_flwr(n, num_devices, seed) if impl == "flwr_datasets" else _iid(n, num_devices, seed)
    elif scheme == "dirichlet":
        if label_array is None:
            raise ValueError("scheme='dirichlet' needs the labels, not only the number of samples")
        if alpha is None:
            raise ValueError("scheme='dirichlet' needs alpha (the Dirichlet concentration, > 0)")
        alpha = _check_positive("alpha", alpha)
        if num_devices * min_partition_size > n:
            raise ValueError(f"min_partition_size={min_partition_size} on {num_devices} devices needs "
                             f"{num_devices * min_partition_size} samples, there are {n}")
        if impl == "flwr_datasets":
            parts, attempts = _dirichlet_flwr(label_array, num_devices, alpha, min_partition_size, seed), None
        else:
            parts, attempts = _dirichlet(label_array, num_devices, alpha, min_partition_size, max_attempts, seed)
        common.update(alpha=alpha, min_partition_size=min_partition_size, attempts=attempts)
    else:
        if sizes is not None:
            counts = _check_sizes(sizes, num_devices, n, min_partition_size)
            common.update(size_distribution="explicit")
        else:
            if size_distribution not in SIZE_DISTRIBUTIONS:
                raise ValueError(f"unknown size_distribution {size_distribution!r}; allowed: "
                                 f"{', '.join(SIZE_DISTRIBUTIONS)}")
            name, value = ("size_sigma", size_sigma) if size_distribution == "lognormal" else (
                "size_exponent", size_exponent)
            value = _check_positive(name, value)
            if num_devices * min_partition_size > n:
                raise ValueError(f"min_partition_size={min_partition_size} on {num_devices} devices needs "
                                 f"{num_devices * min_partition_size} samples, there are {n}")
            counts = _draw_sizes(n, num_devices, size_distribution, value, min_partition_size, seed)
            common.update(size_distribution=size_distribution, size_parameter=value)
        common.update(min_partition_size=min_partition_size)
        if impl == "flwr_datasets":
            if min(counts) == 0:
                raise ValueError("flwr-datasets' SizePartitioner refuses empty devices (a size of 0 here); use "
                                 "implementation='builtin' or min_partition_size >= 1")
            parts = _by_size_flwr(n, counts, seed)
        else:
            parts = _by_size(n, counts, seed)

    class_counts = None
    if label_array is not None:
        class_counts = tuple(tuple(int(c) for c in np.bincount(label_array[p], minlength=num_classes))
                             for p in parts)
    return Partition(
        indices=tuple(tuple(int(i) for i in np.sort(p)) for p in parts),
        implementation=impl,
        implementation_version=_version(impl),
        num_classes=num_classes,
        class_counts=class_counts,
        **common,
    )


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _read_labels(labels: Sequence[int] | np.ndarray | int) -> tuple[np.ndarray | None, int]:
    """``(labels as int64, n)``, or ``(None, n)`` when only the number of samples was given."""
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
        if labels < 0:
            raise ValueError(f"labels as a number of samples must be >= 0, got {labels}")
        return None, int(labels)
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one integer label per sample (1-D), got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices), got dtype {array.dtype}")
    if int(array.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(array.min())}")
    return array.astype(np.int64), int(array.size)


def _check_sizes(sizes: Sequence[int], num_devices: int, n: int, min_partition_size: int) -> list[int]:
    sizes = list(sizes)
    if len(sizes) != num_devices:
        raise ValueError(f"sizes has {len(sizes)} entries for num_devices={num_devices}")
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"sizes[{i}] must be an int >= 0, got {size!r}")
        if size < min_partition_size:
            raise ValueError(f"sizes[{i}]={size} is below min_partition_size={min_partition_size} "
                             "(min_partition_size=0 allows empty devices)")
    if sum(sizes) != n:
        raise ValueError(f"sizes add up to {sum(sizes)}, the data set has {n} samples: every sample goes "
                         "to exactly one device")
    return [int(size) for size in sizes]


# --------------------------------------------------------------------------- built-in (numpy)


def _rng(seed: int) -> np.random.Generator:
    """The sample-order stream: ``default_rng(seed)``, the generator ``datasets.Dataset.shuffle`` uses."""
    return np.random.Generator(np.random.PCG64(seed))


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts that add up to ``total`` in proportion to ``weights``, each within 1 of its exact
    share (the largest fractional parts round up, ties to the lower index)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
    return counts


def _iid(n: int, num_devices: int, seed: int) -> list[np.ndarray]:
    return np.array_split(_rng(seed).permutation(n), num_devices)


def _by_size(n: int, counts: Sequence[int], seed: int) -> list[np.ndarray]:
    return np.split(_rng(seed).permutation(n), np.cumsum(counts)[:-1])


def _draw_sizes(n: int, num_devices: int, distribution: str, value: float, minimum: int, seed: int) -> list[int]:
    """Device sizes: ``minimum`` each, the rest shared in proportion to seeded weights. The weights come
    from a child stream of ``SeedSequence(seed)``, so the sample order stays the one of ``"iid"``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed).spawn(1)[0]))
    if distribution == "lognormal":
        weights = rng.lognormal(0.0, value, num_devices)
    else:
        weights = rng.pareto(value, num_devices) + 1.0
    counts = minimum + _largest_remainder(weights, n - num_devices * minimum)
    return [int(c) for c in counts]


def _dirichlet(labels: np.ndarray, num_devices: int, alpha: float, minimum: int, max_attempts: int,
               seed: int) -> tuple[list[np.ndarray], int]:
    """Per class present (in label order): shuffle the class's samples, draw the devices' shares from
    Dirichlet(alpha), round them by largest remainder and deal the samples out. Redraw the whole partition
    until every device has ``minimum`` samples, at most ``max_attempts`` times."""
    rng = _rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_devices, alpha)
    smallest = 0
    for attempt in range(1, max_attempts + 1):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for members in by_class:
            members = rng.permutation(members)
            counts = _largest_remainder(rng.dirichlet(concentration), members.size)
            for device, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
                pieces[device].append(chunk)
        parts = [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in pieces]
        smallest = min(p.size for p in parts)
        if smallest >= minimum:
            return parts, attempt
    raise ValueError(
        f"no Dirichlet draw in max_attempts={max_attempts} gave every device min_partition_size={minimum} "
        f"samples ({num_devices} devices, {labels.size} samples, alpha={alpha}; the last draw's smallest "
        f"device had {smallest}); pass min_partition_size=0 to allow empty devices, or a larger alpha, "
        "fewer devices or more max_attempts"
    )


# --------------------------------------------------------------------------- flwr-datasets (optional)


def _resolve(implementation: str) -> str:
    if implementation == "auto":
        return "flwr_datasets" if importlib.util.find_spec("flwr_datasets") is not None else "builtin"
    return implementation


def _version(implementation: str) -> str:
    if implementation == "flwr_datasets":
        return f"flwr-datasets {importlib.metadata.version('flwr-datasets')}"
    return f"numpy {np.__version__}"


def _flwr() -> tuple[Any, Any]:
    """``(datasets.Dataset, flwr_datasets.partitioner)``, imported here only: flwr-datasets is optional."""
    try:
        import datasets
        from flwr_datasets import partitioner
    except ImportError as err:
        raise ImportError(f"implementation='flwr_datasets' needs flwr-datasets: {FLWR_INSTALL_HINT} ({err})") from err
    return datasets.Dataset, partitioner


def _load_all(partitioner: Any, num_devices: int) -> list[np.ndarray]:
    return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_devices)]


def _iid_flwr(n: int, num_devices: int, seed: int) -> list[np.ndarray]:
    """``IidPartitioner`` cuts contiguous shards and draws nothing, so the data set is shuffled first."""
    dataset, flwr = _flwr()
    p = flwr.IidPartitioner(num_partitions=num_devices)
    p.dataset = dataset.from_dict({"index": list(range(n))}).shuffle(seed=seed)
    return _load_all(p, num_devices)


def _by_size_flwr(n: int, counts: Sequence[int], seed: int) -> list[np.ndarray]:
    """``SizePartitioner`` cuts contiguous pieces of the given sizes, so the data set is shuffled first."""
    dataset, flwr = _flwr()
    p = flwr.SizePartitioner(partition_sizes=[int(c) for c in counts])
    p.dataset = dataset.from_dict({"index": list(range(n))}).shuffle(seed=seed)
    return _load_all(p, len(counts))


def _dirichlet_flwr(labels: np.ndarray, num_devices: int, alpha: float, minimum: int,
                    seed: int) -> list[np.ndarray]:
    dataset, flwr = _flwr()
    if num_devices > labels.size:
        raise ValueError(f"num_devices={num_devices} is more than the {labels.size} samples, which "
                         "flwr-datasets' DirichletPartitioner refuses; use implementation='builtin'")
    p = flwr.DirichletPartitioner(num_partitions=num_devices, partition_by="label", alpha=alpha,
                                  min_partition_size=minimum, self_balancing=False, shuffle=True, seed=seed)
    p.dataset = dataset.from_dict({"label": labels.tolist(), "index": list(range(labels.size))})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified min_partition_size")  # one per redraw
        try:
            return _load_all(p, num_devices)
        except ValueError as err:
            if "max number of attempts" not in str(err):
                raise
            raise ValueError(
                f"flwr-datasets' DirichletPartitioner gave up: no draw gave every device "
                f"min_partition_size={minimum} samples ({num_devices} devices, {labels.size} samples, "
                f"alpha={alpha}): {err} Pass min_partition_size=0 to allow empty devices, or a larger alpha "
                "or fewer devices"
            ) from err
