"""Byzantine-robust aggregation of flat parameter vectors, as pure numpy functions.

A set of models is stacked as `[n, d]` and reduced over axis 0 (optax
`experimental/_aggregating` style). Sums run in float64; results are float32 `[d]`.
Inputs are assumed finite (the wire layer checks); bad arguments raise `ValueError`.
"""

from __future__ import annotations

import numpy as np

GOSSIP_AGGREGATORS = ("mean", "median", "trimmed_mean", "clipping")
SERVER_AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


def _stack(models: np.ndarray, what: str = "models") -> np.ndarray:
    """`models` as a float64 `[n, d]` copy with n >= 1, or ValueError."""
    x = np.asarray(models)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{what} must be a non-empty [n, d] stack, got shape {x.shape}")
    return x.astype(np.float64)


def _weights(weights: np.ndarray, k: int) -> np.ndarray:
    """`weights` as a float64 `[k]` vector of finite non-negative numbers, or ValueError."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have length {k} (one per model), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    return w


def _count(value: int, name: str) -> int:
    """A non-negative integer argument, or ValueError."""
    if int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def coordinate_median(models: np.ndarray) -> np.ndarray:
    """Per-coordinate median of `[n, d]`: ignores fewer than n/2 arbitrary rows.

    Coordinate-wise median of Yin et al. 2018, "Byzantine-robust distributed learning".
    """
    x = _stack(models)
    return np.median(x, axis=0, overwrite_input=True).astype(np.float32)


def trimmed_mean(models: np.ndarray, trim: int) -> np.ndarray:
    """Per coordinate, drop the `trim` largest and smallest values and average the rest.

    Coordinate-wise trimmed mean of Yin et al. 2018; tolerates up to `trim` arbitrary rows.
    """
    x = _stack(models)
    trim, n = _count(trim, "trim"), x.shape[0]
    if n <= 2 * trim:
        raise ValueError(f"trimmed_mean needs n > 2 * trim, got n={n}, trim={trim}")
    if trim:
        x.sort(axis=0)
        x = x[trim : n - trim]
    return x.mean(axis=0).astype(np.float32)


def krum(models: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """(Multi-)Krum: the mean of the m rows closest (in L2) to their n - f - 2 nearest others.

    Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant gradient
    descent"; tolerates f arbitrary rows when n >= 2f + 3.
    """
    x = _stack(models)
    f, n = _count(f, "f"), x.shape[0]
    if n < 2 * f + 3:
        raise ValueError(f"krum needs n >= 2f + 3, got n={n}, f={f}")
    if int(m) != m or not 1 <= m <= n - f:
        raise ValueError(f"krum needs 1 <= m <= n - f = {n - f}, got m={m!r}")
    # Differences taken directly, not via the Gram matrix: no cancellation for close rows.
    dist = np.stack([np.square(x - row).sum(axis=1) for row in x])
    np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
    nearest = np.sort(dist, axis=1)[:, : n - f - 2]
    scores = nearest.sum(axis=1)
    best = np.argsort(scores, kind="stable")[: int(m)]  # ties: the lower index wins
    return x[best].mean(axis=0).astype(np.float32)


def self_centred_clip(
    own: np.ndarray,
    received: np.ndarray,
    weights: np.ndarray,
    tau: float,
    drop: float | None = None,
) -> np.ndarray:
    """x_i + sum_j w_ij clip(x_j - x_i, tau), with clip(v, tau) = v min(1, tau / ||v||_2).

    ClippedGossip of He, Karimireddy & Jaggi 2022: no neighbour pulls by more than w_ij tau.
    With `drop`, a neighbour farther than drop * tau does not pull at all (its weight
    stays with x_i): an outlier that clipping would still let push by tau every round,
    always the same way, is left out instead.
    """
    x = np.asarray(own)
    if x.ndim != 1:
        raise ValueError(f"own must be a flat [d] vector, got shape {x.shape}")
    d = x.shape[0]
    r = np.asarray(received)
    if r.ndim != 2 or r.shape[1] != d:
        raise ValueError(f"received must be [k, {d}] like own, got shape {r.shape}")
    w = _weights(weights, r.shape[0])
    if not tau > 0:
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    base = x.astype(np.float64)
    diff = r.astype(np.float64) - base
    norms = np.linalg.norm(diff, axis=1)
    with np.errstate(divide="ignore"):  # a zero norm is never above tau: scale 1 there
        scale = np.where(norms > tau, tau / norms, 1.0)
    if drop is not None:
        if not drop >= 1.0:
            raise ValueError(f"drop must be a number >= 1, got {drop!r}")
        scale = np.where(norms > drop * tau, 0.0, scale)
    with np.errstate(over="ignore"):  # reported below, as a ValueError
        out = (base + (w * scale) @ diff).astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("the clipped sum overflows float32: lower tau or the weights")
    return out


def adaptive_tau(
    own: np.ndarray, received: np.ndarray, weights: np.ndarray, fraction: float
) -> float:
    """ClippedGossip's adaptive radius: clip the farthest neighbours holding at most
    `fraction` of the weight, i.e. tau = the largest distance among the others."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    r = np.asarray(received, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        return 1.0  # nothing to clip: any radius will do
    w = _weights(weights, r.shape[0])
    dist = np.linalg.norm(r - np.asarray(own, dtype=np.float64), axis=1)
    clipped = 0.0
    for j in np.argsort(-dist, kind="stable"):
        if clipped + w[j] > fraction:
            return max(float(dist[j]), 1e-12)
        clipped += w[j]
    return max(float(dist.min()), 1e-12)


def _fit_trim(trim: int, n: int) -> int:
    """The largest trim up to `trim` that leaves at least one value: min(trim, (n - 1) // 2)."""
    return min(_count(trim, "trim"), (n - 1) // 2)


def _unknown(kind: str, name: str, allowed: tuple[str, ...]) -> ValueError:
    """The error for an aggregator name outside `allowed`."""
    return ValueError(f"unknown {kind} aggregator {name!r}; expected one of {', '.join(allowed)}")


def gossip_aggregate(
    name: str,
    own: np.ndarray,
    received: np.ndarray,
    weights: np.ndarray,
    *,
    trim: int,
    tau: float | None,
    clip_fraction: float = 0.2,
    clip_drop: float | None = None,
) -> np.ndarray:
    """A gossip peer's robust step over its own model and the `[k, d]` ones it received.

    median / trimmed_mean treat own as one more (unweighted) row; "mean" stays with
    `gossip.mix`, whose exact float64 path the peer keeps. clipping with `tau=None`
    picks tau each round by `adaptive_tau(..., clip_fraction)`.
    """
    if name not in GOSSIP_AGGREGATORS:
        raise _unknown("gossip", name, GOSSIP_AGGREGATORS)
    if name == "mean":
        raise ValueError("use gossip.mix for the plain mean")
    if name == "clipping":
        if tau is None:
            tau = adaptive_tau(own, received, weights, clip_fraction)
        return self_centred_clip(own, received, weights, tau, clip_drop)
    x, r = np.asarray(own), np.asarray(received)
    if x.ndim != 1 or r.ndim != 2 or r.shape[1] != x.shape[0]:
        raise ValueError(f"own must be [d] and received [k, d], got {x.shape} and {r.shape}")
    _weights(weights, r.shape[0])
    stack = np.concatenate([x[None, :], r]) if r.shape[0] else x[None, :]
    if name == "median":
        return coordinate_median(stack)
    return trimmed_mean(stack, _fit_trim(trim, stack.shape[0]))


def server_aggregate(
    name: str, updates: np.ndarray, weights: np.ndarray, *, trim: int, f: int
) -> np.ndarray:
    """The server's step over the `[n, d]` updates of a round.

    "mean" is FedAvg (weights normalised); the robust rules are unweighted, with trim and
    f reduced to what n allows. "krum" is multi-Krum with m = n - f: the mean of the n - f
    best-scored updates (f as asked, even where n forces fewer for the scores). Krum
    proper (m = 1) kept one honest peer's update a round, the same peer's each time, and
    ended ~3 points below FedAvg with or without an attack.
    Krum needs n >= 3: below that, the median (= the mean).
    """
    if name not in SERVER_AGGREGATORS:
        raise _unknown("server", name, SERVER_AGGREGATORS)
    x = _stack(updates, "updates")
    w = _weights(weights, x.shape[0])
    n = x.shape[0]
    if name == "mean":
        total = w.sum()
        if not 0 < total < np.inf:
            raise ValueError(f"weights sum to {total}, not a positive finite number")
        acc = np.zeros(x.shape[1])
        for row, wj in zip(x, w / total, strict=True):  # row by row: gossip.weighted_mean's sums
            acc += row * wj
        return acc.astype(np.float32)
    if name == "median" or (name == "krum" and n < 3):
        return coordinate_median(x)
    if name == "trimmed_mean":
        return trimmed_mean(x, _fit_trim(trim, n))
    # Scores use the f that n allows; the n - f kept use the f asked for, so a round with
    # few updates still leaves the worst-scored ones out instead of averaging them all.
    asked = _count(f, "f")
    return krum(x, max(0, min(asked, (n - 3) // 2)), m=max(1, n - asked))
