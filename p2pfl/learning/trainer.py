"""A jitted optax training loop over one flat parameter vector, compiled once per process.

State is one immutable `TrainState` the peer replaces every round. Parameters are
kept flat (one vector, leaves in pytree order) because that is what travels on the wire and what
gossip mixes; the model sees the pytree through `unravel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from p2pfl.learning.models import ModelDef

FlatParams = jax.Array  # one float32 vector: the model as it travels and is mixed


class TrainState(NamedTuple):
    """Everything a peer's learning needs between rounds."""

    params: FlatParams
    opt_state: Any
    key: jax.Array


class Trainer(NamedTuple):
    """Pure functions for one model and optimizer; `train` runs a round's local epochs."""

    init: Callable[[int, int, int], TrainState]  # (seed, init stream, train stream) -> state
    train: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]
    evaluate: Callable[[FlatParams, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    # (accuracy, loss) on several (x, y) sets in one call: one trace and one transfer
    evaluate_sets: Callable[[FlatParams, tuple], tuple]
    with_params: Callable[[TrainState, FlatParams | np.ndarray], TrainState]
    n_params: int


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """An optax optimizer by scenario name."""
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "nesterov":
        return optax.sgd(learning_rate, momentum=0.9, nesterov=True)
    return getattr(optax, name)(learning_rate)


def _unraveler(model: ModelDef) -> tuple[Callable[[FlatParams], Any], int]:
    """Flat vector -> parameter pytree, from the model's shapes alone (nothing is run)."""
    shapes = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    cuts = np.cumsum(sizes)[:-1].tolist()

    def unravel(flat: FlatParams) -> Any:
        parts = jnp.split(flat, cuts)
        return treedef.unflatten(
            [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves, strict=True)]
        )

    return unravel, sum(sizes)


def make_trainer(
    model: ModelDef,
    optimizer: optax.GradientTransformation,
    n_train: int,
    batch_size: int,
    local_epochs: int,
) -> Trainer:
    """Build jitted train/evaluate functions for a shard of `n_train` samples.

    Everything, initialisation included, runs under `jax.jit`: eager JAX ops would each
    be lowered separately, which costs a peer about half a second of start-up.
    """
    unravel, n_params = _unraveler(model)
    bs = max(1, min(batch_size, n_train))
    n_batches = -(-n_train // bs)
    pad = n_batches * bs - n_train

    def loss_fn(flat: FlatParams, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply(unravel(flat), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def init(seed: int, init_stream: int, train_stream: int) -> TrainState:
        base = jax.random.PRNGKey(seed)
        leaves = jax.tree_util.tree_leaves(model.init(jax.random.fold_in(base, init_stream)))
        flat = jnp.concatenate([leaf.ravel() for leaf in leaves]).astype(jnp.float32)
        return TrainState(flat, optimizer.init(flat), jax.random.fold_in(base, train_stream))

    @jax.jit
    def train(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
        def step(carry: tuple, idx: jax.Array) -> tuple[tuple, jax.Array]:
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        def epoch(carry: tuple, key: jax.Array) -> tuple[tuple, jax.Array]:
            perm = jax.random.permutation(key, n_train)
            idx = jnp.concatenate([perm, perm[:pad]]).reshape(n_batches, bs)
            carry, losses = jax.lax.scan(step, carry, idx)
            return carry, losses.mean()

        keys = jax.random.split(state.key, local_epochs + 1)
        (params, opt_state), losses = jax.lax.scan(epoch, (state.params, state.opt_state), keys[1:])
        return TrainState(params, opt_state, keys[0]), losses[-1]

    def metrics(flat: FlatParams, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.apply(unravel(flat), x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return (jnp.argmax(logits, -1) == y).mean(), loss

    @jax.jit
    def evaluate_sets(flat: FlatParams, sets: tuple) -> tuple:
        return tuple(metrics(flat, x, y) for x, y in sets)

    def with_params(state: TrainState, flat: FlatParams | np.ndarray) -> TrainState:
        return state._replace(params=jnp.asarray(flat, dtype=jnp.float32))

    return Trainer(init, train, jax.jit(metrics), evaluate_sets, with_params, n_params)


def as_numpy(flat: FlatParams) -> np.ndarray:
    """The parameter vector as a contiguous float32 numpy array, ready for the wire."""
    return np.ascontiguousarray(np.asarray(flat, dtype=np.float32))
