"""The round's averaging maths, written once: the gossip step and the FedAvg step.

Both are pure `jax.numpy` functions, jitted once here: a weighted sum over the leading
axis of a stack (the gossip step keeps its own weight apart, so that one fused pass
also gives the disagreement). The networked peer, the coordinator and the simulator
call these same functions, so on a complete graph with equal weights one gossip step
is FedAvg up to the order of a float32 sum.

Contract for `gossip_step` (the caller builds it with `stack_neighbourhood`):

- `neighbours` is `[k, d]` with one row per neighbour *in the graph*, in ascending id
  order, `k` the peer's degree: fixed for the whole run, so the jitted step is traced
  once and never again (a changing `k` would recompile every time it changes).
- a neighbour not heard this round has a zero row and weight 0. A row of weight 0
  contributes nothing (whatever it holds, even NaN) and is not counted in the
  disagreement; the weight it would have had stays with the peer itself.
- `jax.vmap` over a leading peer axis runs every peer at once:
  `[n, d], [n, k_max, d], [n, k_max]`, padding rows of weight 0.

Precision: inputs are cast to float32 and summed in float32 by XLA, in an order XLA
picks for the shape (so the same shapes give the same bits). No TF32 or bfloat16: the
sum is an elementwise product and a reduction, not a matmul. Results are float32. The
earlier float64 numpy path is gone: a mix now differs from the float64 value by the
rounding of a (k + 1)-term float32 sum (measured ~2e-7 absolute on unit-scale models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from numpy.typing import ArrayLike as Readable

# A float32 array, numpy or jax: what the steps and rules give back.
Array = jax.Array | np.ndarray
# (ArrayLike: what the jitted steps take; Readable: anything `np.asarray` reads, such
# as a received `wire.Chunked`, which only the numpy-side helpers take.)


class Mixed(NamedTuple):
    """The mixed model and the local consensus estimate (both float32)."""

    params: Array  # [d]
    disagreement: Array | float  # scalar: ||own - mean(own and the heard rows)||, before mixing


def _check_neighbourhood(own: ArrayLike, neighbours: ArrayLike, weights: ArrayLike) -> None:
    """ValueError unless own is [d], neighbours [k, d] and weights [k] (shapes only:
    free under jit, where it runs once at trace time)."""
    o, r, w = jnp.shape(own), jnp.shape(neighbours), jnp.shape(weights)
    if len(o) != 1 or len(r) != 2 or r[1] != o[0] or w != (r[0],):
        raise ValueError(
            f"own must be [d], neighbours [k, d] and weights [k]; got {o}, {r} and {w}"
        )


def _weighted_sum(stack: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_j w_j x_j over axis 0 of `[n, d]`, in float32; rows of weight 0 count for
    nothing, whatever they hold."""
    used = weights != 0
    rows = jnp.where(used[:, None], stack, 0.0)
    return jnp.sum(jnp.where(used, weights, 0.0)[:, None] * rows, axis=0)


def _disagreement(own: ArrayLike, neighbours: ArrayLike, weights: ArrayLike) -> jax.Array:
    """||own - mean(own and the rows of non-zero weight)||: how far this peer is from
    its heard neighbourhood before mixing. Every gossip rule reports this figure."""
    _check_neighbourhood(own, neighbours, weights)
    x = jnp.asarray(own, jnp.float32)
    r = jnp.asarray(neighbours, jnp.float32)
    heard = jnp.asarray(weights, jnp.float32) != 0
    total = x + jnp.sum(jnp.where(heard[:, None], r, 0.0), axis=0)
    mean = total / (1.0 + jnp.sum(heard, dtype=jnp.float32))
    return jnp.linalg.norm(x - mean)


def _gossip_step(own: ArrayLike, neighbours: ArrayLike, weights: ArrayLike) -> Mixed:
    """One gossip peer's step: (own [d], neighbours [k, d], weights [k]) -> Mixed.

    params = (1 - sum w) own + sum_j w_j neighbours_j; disagreement = ||own - mean(own
    and the rows of non-zero weight)||. Rows in ascending neighbour id, k fixed (the
    degree), weight 0 for a neighbour not heard (see the module docstring). Jitted as
    `gossip_step`; `jax.vmap` over a leading peer axis gives the whole network's step.

    Both figures come from one pass over the masked rows (XLA fuses the two sums): a
    third of the time of stacking own on top and summing twice.
    """
    _check_neighbourhood(own, neighbours, weights)
    x = jnp.asarray(own, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    heard = w != 0
    rows = jnp.where(heard[:, None], jnp.asarray(neighbours, jnp.float32), 0.0)
    params = (1.0 - jnp.sum(w)) * x + jnp.sum(w[:, None] * rows, axis=0)
    mean = (x + jnp.sum(rows, axis=0)) / (1.0 + jnp.sum(heard, dtype=jnp.float32))
    return Mixed(params, jnp.linalg.norm(x - mean))


def _fedavg_step(updates: ArrayLike, weights: ArrayLike) -> jax.Array:
    """sum_j w_j x_j / sum_j w_j over `[n, d]`."""
    w = jnp.asarray(weights, jnp.float32)
    return _weighted_sum(jnp.asarray(updates, jnp.float32), w / jnp.sum(w))


# Jitted once here: a peer calls them every round with the same shapes, so they are
# traced once per process (the simulator's vmap traces its own batched version once).
gossip_step = jax.jit(_gossip_step)
disagreement = jax.jit(_disagreement)
_fedavg_jit = jax.jit(_fedavg_step)


def fedavg_step(updates: ArrayLike, weights: ArrayLike) -> jax.Array:
    """The FedAvg server's step: sum_j w_j x_j / sum_j w_j over `[n, d]` -> float32 `[d]`.

    Args:
        updates: `[n, d]`, n >= 1 (order them by peer id for a result that does not
            depend on arrival order).
        weights: `[n]`, finite and non-negative with a positive sum; need not be
            normalised (sample counts will do). A row of weight 0 counts for nothing.

    Shapes are checked always; the weights' values only when they are concrete (not
    under `jit` / `vmap`, where a zero total gives NaN). Raises ValueError.
    """
    u, w = jnp.shape(updates), jnp.shape(weights)
    if len(u) != 2 or u[0] < 1:
        raise ValueError(f"updates must be a non-empty [n, d] stack, got shape {u}")
    if w != (u[0],):
        raise ValueError(f"weights must have length {u[0]} (one per update), got shape {w}")
    if not isinstance(weights, jax.core.Tracer):
        v = np.asarray(weights, np.float64)
        if not np.isfinite(v).all() or (v < 0).any():
            raise ValueError("weights must be finite and non-negative")
        if not v.sum() > 0:
            raise ValueError(f"weights sum to {v.sum()}, not a positive number")
    return _fedavg_jit(updates, weights)


def stack_neighbourhood(
    neighbours: Sequence[int],
    received: Mapping[int, Readable],
    weights: Mapping[int, float],
    d: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`gossip_step`'s inputs from what arrived, whatever the order it arrived in.

    Args:
        neighbours: every neighbour of the peer in the graph (the rows, sorted here).
        received: neighbour -> its model this round (anything `np.asarray` reads as
            d elements, e.g. a `wire.Chunked`); a neighbour absent here was not heard.
        weights: neighbour -> mixing weight; read only for the neighbours received.
        d: the model's size.

    Returns:
        (stack float32 `[len(neighbours), d]`, w float32 `[len(neighbours)]`), rows in
        ascending id, a zero row and weight 0 for each neighbour not received.
    """
    ids = sorted(neighbours)
    if stray := set(received) - set(ids):
        raise ValueError(f"models from {sorted(stray)}, which are not neighbours")
    stack = np.zeros((len(ids), d), np.float32)
    w = np.zeros(len(ids), np.float32)
    for row, j in enumerate(ids):
        if j not in received:
            continue
        x = np.asarray(received[j])
        if x.size != d:
            raise ValueError(f"the model from {j} has {x.size} elements, ours has {d}")
        stack[row] = x.reshape(d)
        w[row] = weights[j]
    return stack, w
