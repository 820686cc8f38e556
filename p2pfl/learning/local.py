"""A peer's learning set-up from the scenario: its data shard, model, trainer, first state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2pfl.learning import datasets, partition
from p2pfl.learning.models import make_model
from p2pfl.learning.trainer import (
    FlatParams,
    Trainer,
    TrainState,
    make_optimizer,
    make_trainer,
)
from p2pfl.scenario import Scenario


class LocalData(NamedTuple):
    """A peer's own train/test split and the common holdout (device arrays)."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    x_holdout: jax.Array | None
    y_holdout: jax.Array | None


class Local(NamedTuple):
    """What one peer trains: data, trainer and initial state."""

    data: LocalData
    trainer: Trainer
    state: TrainState
    n_classes: int


def load_dataset(s: Scenario, peer_id: int) -> datasets.Dataset:
    """The whole dataset the scenario names (for npz: this peer's own file)."""
    d = s.data
    if d.dataset == "digits":
        return datasets.digits()
    if d.dataset == "breast_cancer":
        return datasets.breast_cancer()
    if d.dataset == "mnist5k":
        return datasets.mnist5k()
    if d.dataset == "synthetic":
        return datasets.synthetic(
            d.synthetic_samples, d.synthetic_features, d.synthetic_classes, s.seed
        )
    return datasets.npz(s.resolve(d.path.format(id=peer_id)), d.classes)


def peer_data(s: Scenario, peer_id: int) -> tuple[LocalData, datasets.Dataset]:
    """This peer's shard (derived from dataset, partition, seed and id) and the holdout."""
    ds = load_dataset(s, peer_id)
    d = s.data
    if d.dataset == "npz":
        train, test = partition.train_test(
            np.arange(len(ds.y)), d.peer_test_fraction, s.seed, peer_id
        )
        if d.holdout is not None:
            hold = datasets.npz(s.resolve(d.holdout), ds.n_classes)
            xh, yh = jnp.asarray(hold.x), jnp.asarray(hold.y)
        else:
            xh = yh = None
    else:
        split = partition.split(
            ds.y, s.peers, d.partition, s.seed, d.test_fraction, d.alpha, d.shards_per_peer
        )
        train, test = partition.train_test(
            split.shards[peer_id], d.peer_test_fraction, s.seed, peer_id
        )
        xh, yh = jnp.asarray(ds.x[split.holdout]), jnp.asarray(ds.y[split.holdout])
    data = LocalData(
        jnp.asarray(ds.x[train]),
        jnp.asarray(ds.y[train]),
        jnp.asarray(ds.x[test]),
        jnp.asarray(ds.y[test]),
        xh,
        yh,
    )
    return data, ds


SHARED_INIT_STREAM = 2**31 - 1  # PRNG stream of the shared initial model
TRAIN_STREAM_BASE = 2**30  # peer i shuffles with stream TRAIN_STREAM_BASE + i


def random_streams(s: Scenario, peer_id: int) -> tuple[int, int]:
    """(init stream, training stream): init is shared by all peers unless `init = per_peer`."""
    init = peer_id if s.model.init == "per_peer" else SHARED_INIT_STREAM
    return init, TRAIN_STREAM_BASE + peer_id


def evaluate(trainer: Trainer, params: FlatParams, d: LocalData) -> tuple[float, float | None]:
    """(accuracy on the peer's own test split, accuracy on the common holdout or None)."""
    sets: list[tuple[jax.Array, jax.Array]] = [(d.x_test, d.y_test)]
    if d.x_holdout is not None and d.y_holdout is not None:
        sets.append((d.x_holdout, d.y_holdout))
    results = jax.device_get(trainer.evaluate_sets(params, tuple(sets)))
    return float(results[0][0]), float(results[1][0]) if len(results) > 1 else None


def _trainer(s: Scenario, ds: datasets.Dataset, n_train: int) -> Trainer:
    model = make_model(s.model.kind, ds.x.shape[1], ds.n_classes, s.model.hidden, ds.image_shape)
    t = s.training
    return make_trainer(
        model, make_optimizer(t.optimizer, t.learning_rate), n_train, t.batch_size, t.local_epochs
    )


class Server(NamedTuple):
    """What the centralized server needs: the model's functions, the first global model,
    and the common holdout it evaluates on."""

    trainer: Trainer  # only `init`, `evaluate_sets` and `n_params` are used
    params: FlatParams
    holdout: tuple[jax.Array, jax.Array]


def build_server(s: Scenario) -> Server:
    """The server's side of the model: the shared initial parameters every peer starts from."""
    if s.data.dataset == "npz":
        if s.data.holdout is None:
            raise ValueError("a centralized npz scenario needs data.holdout")
        ds = datasets.npz(s.resolve(s.data.holdout), s.data.classes or 0)
        xh, yh = ds.x, ds.y
    else:
        ds = load_dataset(s, 0)
        d = s.data
        split = partition.split(
            ds.y, s.peers, d.partition, s.seed, d.test_fraction, d.alpha, d.shards_per_peer
        )
        xh, yh = ds.x[split.holdout], ds.y[split.holdout]
    trainer = _trainer(s, ds, 1)
    params = trainer.init(s.seed, SHARED_INIT_STREAM, TRAIN_STREAM_BASE).params
    return Server(trainer, params, (jnp.asarray(xh), jnp.asarray(yh)))


def build(s: Scenario, peer_id: int) -> Local:
    """Everything a peer needs to train, deterministic in (scenario, peer id).

    A label_flip Byzantine peer (`[faults] byzantine`) trains on flipped labels.
    """
    data, ds = peer_data(s, peer_id)
    attack = s.byzantine(peer_id)
    if attack is not None and attack.attack == "label_flip":
        from p2pfl.faults import flip_labels

        flipped = flip_labels(np.asarray(data.y_train), ds.n_classes)
        data = data._replace(y_train=jnp.asarray(flipped))
    trainer = _trainer(s, ds, int(data.x_train.shape[0]))
    return Local(data, trainer, trainer.init(s.seed, *random_streams(s, peer_id)), ds.n_classes)
