"""Every peer of a run on one leading axis: stacked shards, stacked states, batched steps.

The peers' data comes from `learning.local.host_data` (the dataset loaded and split
once, each peer's shard padded to the scenario's shared shapes, exactly as each
networked peer derives its own), their initial states from the trainer's `init` under
`jax.vmap`, and training and evaluation are the networked peer's own `Trainer`
functions under `jax.vmap`. Work runs in chunks of at most `chunk` peers, every chunk
the same size (the last one padded by repeating its last peer), so one compiled
program serves the whole run and memory stays flat however many peers there are.

With more than one JAX device, each chunk's peer axis is sharded across them
(`jax.sharding.NamedSharding` over a one-axis mesh): the same programs, partitioned by
XLA, and the same results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from p2pfl.learning.local import LearningSpec, host_data, init_args, make_peer_trainer
from p2pfl.learning.trainer import Shard, Trainer, TrainState

Tree = Any  # a pytree whose leaves all have the peer axis first
Rows = np.ndarray | None  # peer ids to run, in order (None: every peer)
# samples evaluated in one call at most (every peer of a chunk on its test split and the
# holdout): ~70 MB of an MLP-64's activations, so evaluation memory stays flat
EVAL_ROWS = 2**17


class Population(NamedTuple):
    """All peers' data and learning functions; their states live beside it (`states`)."""

    train: Shard  # x [n, n_max, f], y [n, n_max], n [n]
    test: Shard
    holdout: Shard | None  # the common holdout, not stacked
    n_train: np.ndarray  # [n] real training samples: the FedAvg weights
    trainer: Trainer
    n_classes: int
    chunk: int  # peers per batched call (a multiple of the device count)
    eval_chunk: int  # peers per evaluation call: bounded by the rows it evaluates
    test_chunk: int  # ... the same without the holdout (test splits only)
    sharding: NamedSharding | None  # the peer axis across devices, if more than one
    train_step: Callable[[TrainState, Shard], tuple[TrainState, jax.Array]]  # vmapped
    evaluate_step: Callable[..., Any]  # vmapped (params, test, holdout) -> metrics


def _sharding(chunk: int) -> tuple[int, NamedSharding | None]:
    """The chunk rounded up to a multiple of the devices, and the peer-axis sharding."""
    devices = jax.devices()
    if len(devices) == 1:
        return chunk, None
    chunk = -(-chunk // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("peers",))
    return chunk, NamedSharding(mesh, PartitionSpec("peers"))


def build(spec: LearningSpec, chunk: int, label_flips: frozenset[int] = frozenset()) -> Population:
    """Every peer of `spec`'s data set-up, in id order; `chunk` bounds a batched call."""
    n = spec.data.peers
    host, ds = host_data(spec.data, list(range(n)), label_flips)
    trainer = make_peer_trainer(spec, ds)
    chunk, sharding = _sharding(min(chunk, n))
    holdout = None if host.holdout is None else Shard(*jax.device_put(host.holdout))
    rows = host.test[0].shape[1] + (0 if host.holdout is None else len(host.holdout[1]))
    eval_chunk, _ = _sharding(max(1, min(chunk, EVAL_ROWS // max(1, rows))))
    test_chunk, _ = _sharding(max(1, min(chunk, EVAL_ROWS // max(1, host.test[0].shape[1]))))
    return Population(
        Shard(*jax.device_put(host.train)),  # on the device once, sliced per chunk
        Shard(*jax.device_put(host.test)),
        holdout,
        host.n_train,
        trainer,
        ds.n_classes,
        chunk,
        eval_chunk,
        test_chunk,
        sharding,
        jax.jit(jax.vmap(trainer.train)),
        _evaluate_fn(trainer),
    )


def initial_states(pop: Population, spec: LearningSpec) -> TrainState:
    """Every peer's initial state, stacked: `trainer.init` of each peer's streams."""
    args = np.array([init_args(spec, i) for i in range(len(pop.n_train))], dtype=np.int32)
    init = jax.vmap(pop.trainer.init)
    return _map_chunks(lambda a: init(a[:, 0], a[:, 1], a[:, 2]), pop, args, rows=None)


@jax.jit
def _gather(tree: Tree, rows: jax.Array) -> Tree:
    return jax.tree_util.tree_map(lambda a: a[rows], tree)


def _take(tree: Tree, rows: np.ndarray) -> Tree:
    """The rows `rows` of every leaf (one compiled gather for the whole tree)."""
    return _gather(tree, jnp.asarray(rows))


def _map_chunks(
    fn: Callable[..., Tree], pop: Population, *stacked: Tree, rows: Rows, chunk: int | None = None
) -> Tree:
    """`fn` over the peer axis of `stacked` (every peer's, in id order), for peers `rows`
    (None: all) in that order, `chunk` (default `pop.chunk`) peers a call; the results
    stacked like `rows`."""
    n = len(pop.n_train)
    if rows is not None and len(rows) == n and (np.asarray(rows) == np.arange(n)).all():
        rows = None  # every peer in order: no gather
    size = pop.chunk if chunk is None else chunk
    whole = rows is None and n == size  # one call on the stacks as they are
    ids = np.arange(n) if rows is None else np.asarray(rows)
    if len(ids) == 0:
        raise ValueError("no peers to run")
    outs = []
    for start in range(0, len(ids), size):
        part = ids[start : start + size]
        padded = np.concatenate([part, np.full(size - len(part), part[-1])])
        args = list(stacked) if whole else [_take(a, padded) for a in stacked]
        if pop.sharding is not None:
            args = jax.device_put(args, pop.sharding)
        out = fn(*args)
        outs.append(_take(out, np.arange(len(part))) if len(part) < size else out)
    if len(outs) == 1:
        return outs[0]
    return jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts), *outs)


def train(pop: Population, states: TrainState, rows: Rows = None) -> tuple[TrainState, jax.Array]:
    """One round's local training of peers `rows` (None: all) from their `states` (every
    peer's, stacked): the new states and losses of `rows`, stacked in that order."""
    return _map_chunks(pop.train_step, pop, states, pop.train, rows=rows)


def _evaluate_fn(trainer: Trainer) -> Callable[..., Any]:
    def one(params: jax.Array, test: Shard, holdout: Shard | None) -> Any:
        return trainer.evaluate_sets(params, (test,) if holdout is None else (test, holdout))

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def evaluate(
    pop: Population, params: jax.Array, rows: Rows = None, holdout: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """(test accuracy, holdout accuracy or None) of peers `rows` (None: all), in that
    order: each peer's model from `params` (every peer's, `[n, d]`) on its own test split
    and (unless `holdout` is False) on the common holdout."""
    common = pop.holdout if holdout else None
    results = _map_chunks(
        lambda p, t: pop.evaluate_step(p, t, common),
        pop,
        params,
        pop.test,
        rows=rows,
        chunk=pop.eval_chunk if holdout else pop.test_chunk,
    )
    results = jax.device_get(results)
    test_acc = np.asarray(results[0][0])
    hold_acc = np.asarray(results[1][0]) if len(results) > 1 else None
    return test_acc, hold_acc


def evaluate_holdout(pop: Population, params: jax.Array) -> tuple[float, float]:
    """(accuracy, loss) of one model `[d]` on the common holdout (the server's figure)."""
    assert pop.holdout is not None
    results = jax.device_get(pop.trainer.evaluate_sets(params, (pop.holdout,)))
    return float(results[0][0]), float(results[0][1])
