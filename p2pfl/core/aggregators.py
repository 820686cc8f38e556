"""Aggregation rules of a round, and the one registry that picks them by name.

A set of models is stacked as `[n, d]` and reduced over axis 0 (optax
`experimental/_aggregating` style). The Byzantine-robust rules (median, trimmed mean,
Krum, self-centred clipping) are numpy: sums run in float64, results are float32 `[d]`
(a later simulator port moves them to jax.numpy). The plain means are
`mixing.gossip_step` / `mixing.fedavg_step` (jax, float32). Inputs are assumed finite
(the wire layer checks); bad arguments raise `ValueError`.

`gossip_aggregator` / `server_aggregator` turn a config name into the round's rule once;
the runtime (and later the simulator) calls it every round.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from jax.typing import ArrayLike

from p2pfl.core.mixing import Array, Mixed, disagreement, fedavg_step, gossip_step

GOSSIP_AGGREGATORS = ("mean", "median", "trimmed_mean", "clipping")
SERVER_AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


def _stack(models: np.ndarray, what: str = "models") -> np.ndarray:
    """`models` as a float64 `[n, d]` copy with n >= 1, or ValueError."""
    x = np.asarray(models)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{what} must be a non-empty [n, d] stack, got shape {x.shape}")
    return x.astype(np.float64)


def _weights(weights: ArrayLike, k: int) -> np.ndarray:
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


# The round's rules, chosen once from the config and called every round:
# a gossip peer's (own [d], neighbours [k, d], weights [k]) -> Mixed (params [d], disagreement)
GossipAggregator = Callable[[ArrayLike, ArrayLike, ArrayLike], Mixed]
# the server's (updates [n, d], weights [n]) -> the new global model, float32 [d]
ServerAggregator = Callable[[ArrayLike, ArrayLike], Array]


def _neighbourhood(
    own: ArrayLike, neighbours: ArrayLike, weights: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(own [d], neighbours [k, d], weights float64 [k]) as numpy, checked."""
    x, r = np.asarray(own), np.asarray(neighbours)
    if x.ndim != 1 or r.ndim != 2 or r.shape[1] != x.shape[0]:
        raise ValueError(f"own must be [d] and neighbours [k, d], got {x.shape} and {r.shape}")
    return x, r, _weights(weights, r.shape[0])


def gossip_aggregator(
    name: str,
    *,
    trim: int = 0,
    tau: float | None = None,
    clip_fraction: float = 0.2,
    clip_drop: float | None = None,
) -> GossipAggregator:
    """A gossip peer's rule for `name` (one of `GOSSIP_AGGREGATORS`), built once.

    The rule takes `gossip_step`'s arguments (neighbours in id order, weight 0 for one
    not heard) and returns a `Mixed`. "mean" *is* `gossip_step` (jax, float32). The
    robust rules drop the rows of weight 0 first, then: median / trimmed_mean take own
    as one more (unweighted) row, trim reduced to what the rows allow; clipping is
    `self_centred_clip`, with `tau=None` picking tau each round by
    `adaptive_tau(..., clip_fraction)`. They run in numpy (float64 inside, float32
    out) and report the same disagreement as `gossip_step` (`mixing.disagreement`).
    A rule raises ValueError on bad shapes or weights (or a clipped sum that
    overflows float32).
    """
    if name not in GOSSIP_AGGREGATORS:
        raise _unknown("gossip", name, GOSSIP_AGGREGATORS)
    if name == "mean":
        return gossip_step
    trim = _count(trim, "trim")

    def rule(x: np.ndarray, r: np.ndarray, w: np.ndarray) -> np.ndarray:
        if name == "clipping":
            radius = adaptive_tau(x, r, w, clip_fraction) if tau is None else tau
            return self_centred_clip(x, r, w, radius, clip_drop)
        stack = np.concatenate([x[None, :], r]) if r.shape[0] else x[None, :]
        if name == "median":
            return coordinate_median(stack)
        return trimmed_mean(stack, _fit_trim(trim, stack.shape[0]))

    def robust(own: ArrayLike, neighbours: ArrayLike, weights: ArrayLike) -> Mixed:
        x, r, w = _neighbourhood(own, neighbours, weights)
        heard = w != 0
        params = rule(x, r[heard], w[heard])
        # on the padded [k, d] stack, as gossip_step does: one trace for every round
        return Mixed(params, np.asarray(disagreement(x, r, w.astype(np.float32))))

    robust.__doc__ = f"The {name!r} gossip rule (see `gossip_aggregator`)."
    return robust


def server_aggregator(name: str, *, trim: int = 0, f: int = 0) -> ServerAggregator:
    """The server's rule for `name` (one of `SERVER_AGGREGATORS`), built once.

    The rule takes the round's `[n, d]` updates (in peer id order) and their `[n]`
    weights. "mean" *is* `fedavg_step` (FedAvg, jax, float32; weights need not be
    normalised). The robust rules are unweighted numpy (float64 inside, float32 out),
    with trim and f reduced to what n allows. "krum" is multi-Krum with m = n - f: the
    mean of the n - f best-scored updates (f as asked, even where n forces fewer for
    the scores). Krum proper (m = 1) kept one honest peer's update a round, the same
    peer's each time, and ended ~3 points below FedAvg with or without an attack.
    Krum needs n >= 3: below that, the median (= the mean).
    """
    if name not in SERVER_AGGREGATORS:
        raise _unknown("server", name, SERVER_AGGREGATORS)
    if name == "mean":
        return fedavg_step
    trim, asked = _count(trim, "trim"), _count(f, "f")

    def robust(updates: ArrayLike, weights: ArrayLike) -> np.ndarray:
        x = _stack(np.asarray(updates), "updates")
        _weights(weights, x.shape[0])
        n = x.shape[0]
        if name == "median" or (name == "krum" and n < 3):
            return coordinate_median(x)
        if name == "trimmed_mean":
            return trimmed_mean(x, _fit_trim(trim, n))
        # Scores use the f that n allows; the n - f kept use the f asked for, so a round
        # with few updates still leaves the worst-scored ones out instead of averaging
        # them all.
        return krum(x, max(0, min(asked, (n - 3) // 2)), m=max(1, n - asked))

    robust.__doc__ = f"The {name!r} server rule (see `server_aggregator`)."
    return robust
