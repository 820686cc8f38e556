"""A jitted optax training loop over one flat parameter vector and a padded shard.

State is one immutable `TrainState` the peer replaces every round. Parameters are
kept flat (one vector, leaves in pytree order) because that is what travels on the wire and what
gossip mixes; the model sees the pytree through `unravel`.

Every peer of a scenario holds its data as a `Shard` of the same length `n_max` (the
largest shard of the scenario), its own `n` real rows first and zero rows after them.
So every peer runs the same programs, compiled once (the persistent compile cache then
serves every process of a launch, and `p2pfl.learning.exported` spares them the
tracing too), and the functions `jax.vmap` over a leading peer axis. Padding is
invisible: a peer trains and evaluates exactly as it would on its unpadded rows,
whatever `n_max` is.

One epoch: the real rows in a random order (each real row draws a uniform key from
`fold_in(epoch key, row)`, padded rows get +inf, and `argsort` puts the real rows
first), cut into batches of `batch_size`. The peer's last batch may be partial: its
padded rows are masked out of the loss mean, so every real row weighs exactly once per
epoch. Batches past the peer's own `ceil(n / batch_size)` are skipped (`lax.cond`:
parameters and optimizer state pass through unchanged; under `vmap` it becomes a
select, with the same result).
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
ParamsLike = FlatParams | np.ndarray  # what evaluation takes: a device or a host vector
Metrics = tuple[jax.Array, jax.Array]  # (accuracy, mean loss), float32 scalars


class TrainState(NamedTuple):
    """Everything a peer's learning needs between rounds."""

    params: FlatParams
    opt_state: Any
    key: jax.Array


class Shard(NamedTuple):
    """Samples padded to a fixed length: the first `n` rows are real, the rest zeros.

    A pytree, so shards of several peers stack on a leading axis for `jax.vmap`.
    """

    x: jax.Array  # [n_max, features] float32
    y: jax.Array  # [n_max] int32
    n: jax.Array  # int32 scalar: how many leading rows are real


def pad_shard(x: np.ndarray, y: np.ndarray, n_max: int | None = None) -> Shard:
    """`x`, `y` padded with zero rows to `n_max` rows (default: their own length), on device.

    Raises ValueError if there are more than `n_max` rows.
    """
    n = len(y)
    n_max = n if n_max is None else n_max
    if n > n_max:
        raise ValueError(f"{n} samples do not fit a shard padded to {n_max}")
    xp = np.zeros((n_max, *x.shape[1:]), dtype=np.float32)
    yp = np.zeros(n_max, dtype=np.int32)
    xp[:n], yp[:n] = x, y
    # device_put, not jnp.asarray: the latter compiles a tiny program per shape and dtype
    return Shard(*jax.device_put((xp, yp, np.int32(n))))


class Trainer(NamedTuple):
    """Pure jitted functions for one model and optimizer; `train` runs a round's local epochs.

    None of them depends on a peer's shard size: one compile serves every peer whose
    shards have the same padded shapes, and each maps over a leading peer axis.
    """

    init: Callable[[int, int, int], TrainState]  # (seed, init stream, train stream) -> state
    train: Callable[[TrainState, Shard], tuple[TrainState, jax.Array]]  # -> (state, loss)
    evaluate: Callable[[ParamsLike, Shard], Metrics]
    # metrics on several shards in one call: one trace and one transfer
    evaluate_sets: Callable[[ParamsLike, tuple[Shard, ...]], tuple[Metrics, ...]]
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
        return jax.tree_util.tree_unflatten(
            treedef, [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves, strict=True)]
        )

    return unravel, sum(sizes)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over the positions where `mask` holds (0 when none does)."""
    m = mask.astype(values.dtype)
    return (values * m).sum() / jnp.maximum(m.sum(), 1.0)


def epoch_order(key: jax.Array, n: jax.Array, n_max: int) -> jax.Array:
    """A random order of rows 0..n_max-1 with the `n` real rows first, in random order.

    Row i's sort key depends only on (key, i), so the real rows' order does not depend
    on `n_max`: padding cannot change how a peer trains.
    """
    rows = jnp.arange(n_max)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(rows)
    return jnp.argsort(jnp.where(rows < n, u, jnp.inf))


class DpSgd(NamedTuple):
    """DP-SGD (Abadi et al. 2016): per-example gradients clipped to `clip` in L2, their
    sum noised with N(0, (noise_multiplier · clip)²), over the expected batch size."""

    clip: float
    noise_multiplier: float


def clipped_example_grads(
    loss_one: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    y: jax.Array,
    clip: jax.Array | float,
) -> tuple[jax.Array, Any]:
    """Every row's loss and its own gradient (`vmap`), each scaled to L2 norm at most
    `clip` over the whole parameter pytree: DP-SGD's per-example clipping."""
    losses, grads = jax.vmap(jax.value_and_grad(loss_one), in_axes=(None, 0, 0))(params, x, y)
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    sq = sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves)
    scale = jnp.minimum(1.0, jnp.float32(clip) / jnp.maximum(jnp.sqrt(sq), 1e-30))
    return losses, jax.tree_util.tree_unflatten(
        treedef, [g * scale.reshape((-1,) + (1,) * (g.ndim - 1)) for g in leaves]
    )


def dp_sgd_gradient(
    loss_one: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    y: jax.Array,
    taken: jax.Array,
    dp: DpSgd,
    key: jax.Array,
    expected: jax.Array | float,
) -> tuple[jax.Array, Any]:
    """One DP-SGD step's gradient: the clipped gradients of the `taken` rows summed,
    plus N(0, (noise_multiplier · clip)²) per coordinate, over `expected` (the
    expected batch size, fixed so one row moves the sum by at most `clip`); with the
    taken rows' mean loss."""
    losses, clipped = clipped_example_grads(loss_one, params, x, y, dp.clip)
    leaves, treedef = jax.tree_util.tree_flatten(clipped)
    keys = jax.random.split(key, len(leaves))
    sigma = jnp.float32(dp.noise_multiplier * dp.clip)
    weight = taken.astype(jnp.float32)
    noised = [
        (jnp.tensordot(weight, g, axes=1) + sigma * jax.random.normal(k, g.shape[1:]))
        / jnp.maximum(jnp.float32(expected), 1e-12)
        for g, k in zip(leaves, keys, strict=True)
    ]
    return _masked_mean(losses, taken), jax.tree_util.tree_unflatten(treedef, noised)


def make_trainer(
    model: ModelDef,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    local_epochs: int,
    dp_sgd: DpSgd | None = None,
) -> Trainer:
    """Build jitted train/evaluate functions for shards of any padded length.

    Everything, initialisation included, runs under `jax.jit`: eager JAX ops would each
    be lowered separately, which costs a peer about half a second of start-up. A
    function is traced once per padded shard shape, not per peer.

    With `dp_sgd` a round is DP-SGD with Poisson sampling (`core.privacy.dp_sgd_schedule`):
    each step draws its rows (a uniform per row from the step's key: padding cannot
    change the draw), takes every row's own gradient (`vmap`), clips each, sums the
    drawn ones, adds the noise and divides by the expected batch size. Every step
    computes all `n_max` rows' gradients: exact Poisson sampling under fixed shapes.
    """
    unravel, n_params = _unraveler(model)

    def tree_loss(params: Any, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
        logits = model.apply(params, x)
        return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y), mask)

    def _state_as(flat_state: Any, to_tree: Callable[[FlatParams], Any]) -> Any:
        """The optimizer state with each params-shaped leaf as a parameter pytree."""
        leaves, treedef = jax.tree_util.tree_flatten(flat_state)
        return jax.tree_util.tree_unflatten(
            treedef, [to_tree(x) if x.shape == (n_params,) else x for x in leaves]
        )

    def _state_back(flat_state: Any, tree_state: Any) -> Any:
        """`_state_as` undone: params-shaped subtrees back to flat vectors."""
        leaves, treedef = jax.tree_util.tree_flatten(flat_state)
        parts = treedef.flatten_up_to(tree_state)  # type: ignore[attr-defined]
        return jax.tree_util.tree_unflatten(
            treedef,
            [
                _ravel(p) if x.shape == (n_params,) else p
                for x, p in zip(leaves, parts, strict=True)
            ],
        )

    @jax.jit
    def init(seed: int, init_stream: int, train_stream: int) -> TrainState:
        base = jax.random.PRNGKey(seed)
        leaves = jax.tree_util.tree_leaves(model.init(jax.random.fold_in(base, init_stream)))
        flat = jnp.concatenate([leaf.ravel() for leaf in leaves]).astype(jnp.float32)
        return TrainState(flat, optimizer.init(flat), jax.random.fold_in(base, train_stream))

    @jax.jit
    def train(state: TrainState, shard: Shard) -> tuple[TrainState, jax.Array]:
        n_max = shard.y.shape[0]
        bs = max(1, min(batch_size, n_max))  # a peer smaller than a batch: one full batch
        n_batches = -(-n_max // bs)
        n = shard.n
        own_batches = (n + bs - 1) // bs

        def step(carry: tuple, batch: tuple[jax.Array, jax.Array]) -> tuple[tuple, jax.Array]:
            idx, valid = batch

            def run(carry: tuple) -> tuple[tuple, jax.Array]:
                params, opt_state = carry
                loss, grads = jax.value_and_grad(tree_loss)(
                    params, shard.x[idx], shard.y[idx], valid
                )
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            def skip(carry: tuple) -> tuple[tuple, jax.Array]:
                return carry, jnp.zeros((), jnp.float32)

            return jax.lax.cond(valid[0], run, skip, carry)

        def epoch(carry: tuple, key: jax.Array) -> tuple[tuple, jax.Array]:
            order = epoch_order(key, n, n_max)
            slots = jnp.arange(n_batches * bs)
            idx = jnp.concatenate([order, jnp.zeros(n_batches * bs - n_max, order.dtype)])
            batches = (idx.reshape(n_batches, bs), (slots < n).reshape(n_batches, bs))
            carry, losses = jax.lax.scan(step, carry, batches)
            return carry, losses.sum() / jnp.maximum(own_batches, 1)

        def dp_epoch(carry: tuple, key: jax.Array) -> tuple[tuple, jax.Array]:
            assert dp_sgd is not None
            rows = jnp.arange(n_max)
            q = jnp.minimum(1.0, batch_size / jnp.maximum(n, 1).astype(jnp.float32))
            own_steps = (n + batch_size - 1) // batch_size

            def dp_step(carry: tuple, s: jax.Array) -> tuple[tuple, jax.Array]:
                draw, noise_key = jax.random.split(jax.random.fold_in(key, s))
                u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(draw, i)))(rows)
                taken = (u < q) & (rows < n)

                def run(carry: tuple) -> tuple[tuple, jax.Array]:
                    params, opt_state = carry
                    loss, grads = _dp_gradient(params, taken, noise_key, q * n)
                    updates, opt_state = optimizer.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), loss

                def skip(carry: tuple) -> tuple[tuple, jax.Array]:
                    return carry, jnp.zeros((), jnp.float32)

                return jax.lax.cond(s < own_steps, run, skip, carry)

            carry, losses = jax.lax.scan(dp_step, carry, jnp.arange(n_batches))
            return carry, losses.sum() / jnp.maximum(own_steps, 1)

        def _dp_gradient(
            params: Any, taken: jax.Array, key: jax.Array, expected: jax.Array
        ) -> tuple[jax.Array, Any]:
            assert dp_sgd is not None

            def one(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
                logits = model.apply(p, x[None])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]

            return dp_sgd_gradient(one, params, shard.x, shard.y, taken, dp_sgd, key, expected)

        # The steps run on the parameter pytree (and the optimizer state's params-shaped
        # leaves as pytrees): the same arithmetic as on the flat vector, without an
        # unravel and its gradient's concatenation in every step (~25% of a step).
        start = (unravel(state.params), _state_as(state.opt_state, unravel))
        keys = jax.random.split(state.key, local_epochs + 1)
        (params, opt_state), losses = jax.lax.scan(
            epoch if dp_sgd is None else dp_epoch, start, keys[1:]
        )
        flat_state = _state_back(state.opt_state, opt_state)
        return TrainState(_ravel(params), flat_state, keys[0]), losses[-1]

    def metrics(flat: FlatParams, shard: Shard) -> Metrics:
        logits = model.apply(unravel(flat), shard.x)
        mask = jnp.arange(shard.y.shape[0]) < shard.n
        loss = _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, shard.y), mask)
        hits = (jnp.argmax(logits, -1) == shard.y).astype(jnp.float32)
        return _masked_mean(hits, mask), loss

    @jax.jit
    def evaluate_sets(flat: FlatParams, shards: tuple[Shard, ...]) -> tuple[Metrics, ...]:
        return tuple(metrics(flat, s) for s in shards)

    return Trainer(init, train, jax.jit(metrics), evaluate_sets, with_params, n_params)


def _ravel(tree: Any) -> FlatParams:
    """A parameter pytree as the flat float32 vector (leaves in pytree order)."""
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree_util.tree_leaves(tree)])


def with_params(state: TrainState, flat: FlatParams | np.ndarray) -> TrainState:
    """`state` with its parameters replaced by `flat` (moved to the device as float32,
    placed as the old ones were: committed to their device if they were, so a jitted
    step sees the same argument placement every round)."""
    if isinstance(flat, jax.Array) and flat.dtype == jnp.float32:
        return state._replace(params=flat)
    old = state.params
    where = old.sharding if isinstance(old, jax.Array) and old.committed else None
    return state._replace(params=jax.device_put(np.asarray(flat, dtype=np.float32), where))


def as_numpy(flat: FlatParams) -> np.ndarray:
    """The parameter vector as a contiguous float32 numpy array, ready for the wire."""
    return np.ascontiguousarray(np.asarray(flat, dtype=np.float32))
