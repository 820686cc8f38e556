"""Every peer of a run on one leading axis: stacked shards, stacked states, batched steps.

The peers' data comes from `learning.local.host_data` (the dataset loaded and split
once, each peer's shard padded to the scenario's shared shapes, exactly as each
networked peer derives its own), their initial states from the trainer's `init` under
`jax.vmap`, and training and evaluation are the networked peer's own `Trainer`
functions under `jax.vmap`. Work runs in chunks of at most `chunk` peers, every chunk
the same size (the last one padded by repeating its last peer), so one compiled
program serves the whole run and memory stays flat however many peers there are.

The batched programs are exported once into the compile cache and read back by later
runs of the same shapes (`learning.exported.stored_or_exported`): a run traces nothing.
With more than one JAX device, each chunk's peer axis is sharded across them
(`jax.sharding.NamedSharding` over a one-axis mesh): the same programs, partitioned by
XLA, and the same results. Across JAX processes (`jax.distributed`), each computes its
contiguous share of the peers on its own devices and the shares are gathered, so that
every process holds all the results.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from p2pfl.learning import exported
from p2pfl.learning.local import (
    LearningSpec,
    host_data,
    init_args,
    make_peer_trainer,
    program_settings,
)
from p2pfl.learning.trainer import Shard, Trainer, TrainState

Tree = Any  # a pytree whose leaves all have the peer axis first
Rows = np.ndarray | None  # peer ids to run, in order (None: every peer)
# samples evaluated in one call at most (every peer of a chunk on its test split and the
# holdout): ~70 MB of an MLP-64's activations, so evaluation memory stays flat
EVAL_ROWS = 2**17


class ProcessLostError(RuntimeError):
    """Another JAX process of a distributed run is gone (its results never came)."""


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
    init_step: Callable[[jax.Array], TrainState]  # vmapped over [chunk, 3] init args
    init_one: Callable[[int, int, int], TrainState]  # `trainer.init`
    evaluate_holdout: Callable[[jax.Array, Shard], Any]  # one model on the holdout
    processes: int = 1  # JAX processes of the run (`jax.distributed`): each its share
    process: int = 0  # ... and this one's index


def _sharding(chunk: int) -> tuple[int, NamedSharding | None]:
    """The chunk rounded up to a multiple of this process's devices, and the peer-axis
    sharding across them."""
    devices = jax.local_devices()
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
    train, test = Shard(*jax.device_put(host.train)), Shard(*jax.device_put(host.test))
    # one device: the batched programs exported once and read back by later runs (no
    # tracing); across devices XLA partitions them at each run's own trace
    settings = program_settings(spec, ds) if sharding is None else None
    if settings is not None:
        settings = {**settings, "sim": _source_digest()}
    programs = _Programs(settings, trainer, jax.eval_shape(trainer.init, 0, 0, 0))
    return Population(
        train,  # on the device once, sliced per chunk
        test,
        holdout,
        host.n_train,
        trainer,
        ds.n_classes,
        chunk,
        eval_chunk,
        test_chunk,
        sharding,
        programs.train(chunk, train),
        programs.evaluate(eval_chunk, test_chunk, test, holdout),
        programs.init(chunk),
        programs.init_one(),
        programs.evaluate_holdout(holdout),
        jax.process_count(),
        jax.process_index(),
    )


@functools.cache
def _source_digest() -> str:
    """This module's source: it defines the batched programs, so it keys them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _batched(tree: Tree, size: int) -> Tree:
    """Shape specs of `tree`'s leaves with a leading axis of `size` in place of theirs."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((size, *a.shape[1:]), a.dtype), tree
    )


def _stacked(tree: Tree, size: int) -> Tree:
    """Shape specs of `tree`'s leaves (one peer's) stacked `size` times."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((size, *a.shape), a.dtype), tree)


class _Programs(NamedTuple):
    """The trainer's functions batched over peers, each served by its exported program
    for the shapes a run calls it with (`exported.stored_or_exported`)."""

    settings: dict[str, Any] | None  # None: plain `jax.jit`
    trainer: Trainer
    like: TrainState  # one peer's state, as shape specs

    def _served(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], out: Any) -> Any:
        tree = jax.tree_util.tree_structure(out)
        return exported.stored_or_exported(self.settings, f"sim {name}", fn, args, tree)

    def train(self, chunk: int, train: Shard) -> Any:
        state = _stacked(self.like, chunk)
        fn = jax.vmap(self.trainer.train)
        return self._served("train", fn, (state, _batched(train, chunk)), (state, 0))

    def evaluate(self, eval_chunk: int, test_chunk: int, test: Shard, holdout: Shard | None) -> Any:
        trainer = self.trainer

        def one(params: jax.Array, test: Shard, holdout: Shard | None) -> Any:
            return trainer.evaluate_sets(params, (test,) if holdout is None else (test, holdout))

        both = jax.vmap(one, in_axes=(0, 0, None))
        alone = jax.vmap(lambda p, t: one(p, t, None))
        with_holdout = None
        if holdout is not None:
            spec = (_stacked(self.like.params, eval_chunk), _batched(test, eval_chunk), holdout)
            with_holdout = self._served("evaluate", both, spec, ((0, 0), (0, 0)))
        alone_spec = (_stacked(self.like.params, test_chunk), _batched(test, test_chunk))
        test_only = self._served("evaluate test", alone, alone_spec, ((0, 0),))

        def evaluate(params: jax.Array, test: Shard, holdout: Shard | None) -> Any:
            if holdout is None:
                return test_only(params, test)
            assert with_holdout is not None
            return with_holdout(params, test, holdout)

        return evaluate

    def init(self, chunk: int) -> Any:
        init = jax.vmap(self.trainer.init)
        spec = jax.ShapeDtypeStruct((chunk, 3), np.int32)
        return self._served("init", lambda a: init(a[:, 0], a[:, 1], a[:, 2]), (spec,), self.like)

    def init_one(self) -> Any:
        scalar = jax.ShapeDtypeStruct((), np.int32)
        return self._served("init one", self.trainer.init, (scalar,) * 3, self.like)

    def evaluate_holdout(self, holdout: Shard | None) -> Any:
        evaluate_sets = self.trainer.evaluate_sets
        if holdout is None:
            return jax.jit(lambda params, h: evaluate_sets(params, (h,)))
        args = (self.like.params, holdout)
        return self._served(
            "evaluate holdout", lambda p, h: evaluate_sets(p, (h,)), args, ((0, 0),)
        )


def initial_states(pop: Population, spec: LearningSpec) -> TrainState:
    """Every peer's initial state, stacked: `trainer.init` of each peer's streams."""
    args = np.array([init_args(spec, i) for i in range(len(pop.n_train))], dtype=np.int32)
    return _map_chunks(pop.init_step, pop, jnp.asarray(args), rows=None)


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
    stacked like `rows`. Across JAX processes each computes its contiguous share of
    `rows` and every one gets all the results."""
    n = len(pop.n_train)
    if rows is not None and len(rows) == n and (np.asarray(rows) == np.arange(n)).all():
        rows = None  # every peer in order: no gather
    size = pop.chunk if chunk is None else chunk
    ids = np.arange(n) if rows is None else np.asarray(rows)
    if len(ids) == 0:
        raise ValueError("no peers to run")
    if pop.processes > 1:
        return _across_processes(fn, pop, stacked, ids, size)
    return _local(fn, pop, stacked, ids, size, whole=rows is None and n == size)


def _local(
    fn: Callable[..., Tree],
    pop: Population,
    stacked: tuple[Tree, ...],
    ids: np.ndarray,
    size: int,
    whole: bool,
) -> Tree:
    """`fn` over peers `ids` on this process's devices, `size` peers a call (`whole`:
    one call on the stacks as they are)."""
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


def _across_processes(
    fn: Callable[..., Tree], pop: Population, stacked: tuple[Tree, ...], ids: np.ndarray, size: int
) -> Tree:
    """`fn` over peers `ids` split into one contiguous share per JAX process (each on
    its own devices, the same `size`-peer programs as one process runs, so the same
    results), then gathered so that every process holds all of them in `ids` order."""
    from jax.experimental import multihost_utils

    k = pop.processes
    m = -(-len(ids) // k)
    mine = ids[pop.process * m : (pop.process + 1) * m]
    out = _local(fn, pop, stacked, mine if len(mine) else ids[-1:], size, whole=False)

    def padded(a: jax.Array) -> np.ndarray:  # every process contributes m rows
        host = np.asarray(a)[: len(mine)]
        return np.concatenate([host, np.zeros((m - len(host), *host.shape[1:]), host.dtype)])

    try:
        gathered = multihost_utils.process_allgather(jax.tree_util.tree_map(padded, out))
    except Exception as exc:  # the collective's own error: a process is gone
        raise ProcessLostError(
            f"process {pop.process}: the other JAX processes' results did not come ({exc})"
        ) from exc
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a.reshape(k * m, *a.shape[2:])[: len(ids)]), gathered
    )


def train(pop: Population, states: TrainState, rows: Rows = None) -> tuple[TrainState, jax.Array]:
    """One round's local training of peers `rows` (None: all) from their `states` (every
    peer's, stacked): the new states and losses of `rows`, stacked in that order."""
    return _map_chunks(pop.train_step, pop, states, pop.train, rows=rows)


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
    results = jax.device_get(pop.evaluate_holdout(params, pop.holdout))
    return float(results[0][0]), float(results[0][1])
