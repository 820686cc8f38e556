"""The train step over padded shards: vmappable, padding-invisible, compiled once for all peers."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p2pfl.config.learning import flips_labels, learning_spec
from p2pfl.config.loader import parse
from p2pfl.learning import datasets, exported, local
from p2pfl.learning.models import ModelDef, mlp
from p2pfl.learning.trainer import Shard, Trainer, TrainState, make_trainer, pad_shard

FEATURES, CLASSES, BATCH, EPOCHS = 6, 3, 8, 3
SIZES = [5, 13, 20, 27]  # smaller than a batch, partial last batch, exact batches, the largest


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    x = (rng.normal(size=(n, FEATURES)) + y[:, None]).astype(np.float32)
    return x, y


def _trainer(model: ModelDef | None = None, epochs: int = EPOCHS) -> Trainer:
    model = model or mlp(FEATURES, CLASSES, [16])
    return make_trainer(model, optax.adam(0.05), BATCH, epochs)


def _leaves(state: TrainState) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))


def _counted(model: ModelDef) -> tuple[ModelDef, list[int]]:
    """The model with a Python counter bumped each time its apply is traced."""
    traces = [0]

    def apply(params: Any, x: jax.Array) -> jax.Array:
        traces[0] += 1
        return model.apply(params, x)

    return ModelDef(model.init, apply), traces


def test_vmap_over_peers_equals_each_peer_alone():
    """vmap of train over 4 peers of different real sizes matches each one trained alone."""
    tr = _trainer()
    n_max = max(SIZES)
    shards = [pad_shard(*_data(n, seed=i), n_max) for i, n in enumerate(SIZES)]
    states = [tr.init(0, 7, 100 + i) for i in range(len(SIZES))]
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    batched, losses = jax.vmap(tr.train)(stack(states), stack(shards))
    for i, (state, shard) in enumerate(zip(states, shards, strict=True)):
        alone, loss = tr.train(state, shard)
        mine = jax.tree_util.tree_map(lambda a, i=i: a[i], batched)
        assert _max_diff(_leaves(mine), _leaves(alone)) <= 1e-6
        assert abs(float(losses[i]) - float(loss)) <= 1e-6
        np.testing.assert_array_equal(np.asarray(mine.key), np.asarray(alone.key))
    assert not np.allclose(np.asarray(batched.params[0]), np.asarray(batched.params[1]))


@pytest.mark.parametrize("n", SIZES)
def test_padding_is_invisible(n: int):
    """A peer trains bit-for-bit the same whatever length its shard is padded to."""
    tr = _trainer()
    x, y = _data(n)
    state = tr.init(0, 7, 100)
    results = [tr.train(state, pad_shard(x, y, n_max)) for n_max in (max(n, BATCH), 40, 64)]
    for other, loss in results[1:]:
        np.testing.assert_array_equal(np.asarray(other.params), np.asarray(results[0][0].params))
        assert _max_diff(_leaves(other), _leaves(results[0][0])) == 0.0
        assert float(loss) == float(results[0][1])


def test_padding_below_a_batch_is_invisible():
    """A shard shorter than a batch padded to less than a batch trains as padded to more."""
    tr = _trainer()
    x, y = _data(5)
    state = tr.init(0, 7, 100)
    short, _ = tr.train(state, pad_shard(x, y))  # n_max = 5 < batch: batches of 5
    long, _ = tr.train(state, pad_shard(x, y, 3 * BATCH))
    assert _max_diff(_leaves(short), _leaves(long)) <= 1e-6


def test_skipped_batches_leave_params_and_optimizer_state_unchanged():
    """Batches past a peer's own count do nothing: no real rows -> the state is untouched,
    and the optimizer steps exactly epochs * ceil(n / batch) times."""
    tr = _trainer()
    x, y = _data(27)
    state = tr.init(0, 7, 100)
    empty = Shard(jnp.asarray(x), jnp.asarray(y), jnp.asarray(0, jnp.int32))
    after, loss = tr.train(state, empty)
    assert _max_diff(_leaves(after), _leaves(state)) == 0.0
    assert float(loss) == 0.0
    assert not np.array_equal(np.asarray(after.key), np.asarray(state.key))  # the key moves on
    for n in SIZES:
        after, _ = tr.train(state, pad_shard(*_data(n), 64))
        adam = after.opt_state[0]  # optax.adam: (ScaleByAdamState, EmptyState)
        assert int(adam.count) == EPOCHS * -(-n // BATCH)


def test_one_batch_is_one_full_batch_step():
    """A shard smaller than a batch takes one step on the mean loss of all its real rows."""
    model = mlp(FEATURES, CLASSES, [])
    tr = make_trainer(model, optax.sgd(0.1), BATCH, 1)
    x, y = _data(5)
    state = tr.init(0, 7, 100)
    after, _ = tr.train(state, pad_shard(x, y, 32))

    def loss(flat: jax.Array) -> jax.Array:
        b, w = flat[:CLASSES], flat[CLASSES:].reshape(FEATURES, CLASSES)  # leaves sorted by key
        logits = model.apply([{"w": w, "b": b}], jnp.asarray(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    expected = state.params - 0.1 * jax.grad(loss)(state.params)
    np.testing.assert_allclose(np.asarray(after.params), np.asarray(expected), atol=1e-6)


def test_masked_evaluation_equals_unpadded_evaluation():
    """Accuracy and loss on a padded shard equal those on its real rows alone."""
    tr = _trainer()
    x, y = _data(23, seed=3)
    state, _ = tr.train(tr.init(0, 7, 100), pad_shard(x, y))
    plain = tr.evaluate(state.params, pad_shard(x, y))
    padded = tr.evaluate(state.params, pad_shard(x, y, 64))
    assert float(padded[0]) == float(plain[0])
    assert float(padded[1]) == pytest.approx(float(plain[1]), abs=1e-6)
    sets = tr.evaluate_sets(state.params, (pad_shard(x, y, 64), pad_shard(x[:7], y[:7], 64)))
    assert float(sets[0][0]) == float(plain[0])
    assert float(sets[1][0]) == float(tr.evaluate(state.params, pad_shard(x[:7], y[:7]))[0])


def test_one_trace_serves_peers_of_every_shard_size():
    """Peers 0..3 with different real sizes but one padded shape trace train and eval once."""
    model, traces = _counted(mlp(FEATURES, CLASSES, [16]))
    tr = _trainer(model)
    n_max = max(SIZES)
    state = tr.init(0, 7, 100)
    traces_after_init = traces[0]
    for i, n in enumerate(SIZES):
        shard = pad_shard(*_data(n, seed=i), n_max)
        tr.train(tr.init(0, 7, 100 + i), shard)
        tr.evaluate_sets(state.params, (shard,))
        if i == 0:
            first = traces[0]
    assert traces[0] == first > traces_after_init
    assert tr.train._cache_size() == 1  # type: ignore[attr-defined]
    assert tr.evaluate_sets._cache_size() == 1  # type: ignore[attr-defined]


def test_every_peer_of_a_scenario_gets_the_same_shapes():
    """Peers of a dirichlet split (very different shard sizes) pad to one set of shapes."""
    s = parse({"topology": {"peers": 6}, "data": {"partition": "dirichlet", "alpha": 0.3}})
    spec = learning_spec(s)
    locs = [local.build(spec, i) for i in range(s.peers)]
    sizes = {loc.data.n_train for loc in locs}
    assert len(sizes) > 1
    shapes = {
        (loc.data.train.x.shape, loc.data.test.x.shape, loc.data.holdout.x.shape) for loc in locs
    }
    assert len(shapes) == 1
    for loc in locs:
        assert int(loc.data.train.n) == loc.data.n_train
        assert loc.data.train.x.shape[0] == max(sizes)
    # each peer process builds its own trainer: the same program text means one
    # persistent-cache entry (one compile) serves them all
    texts = {
        (
            loc.trainer.train.lower(loc.state, loc.data.train).as_text(),  # type: ignore[attr-defined]
            loc.trainer.evaluate_sets.lower(  # type: ignore[attr-defined]
                loc.state.params, (loc.data.test, loc.data.holdout)
            ).as_text(),
        )
        for loc in (locs[0], locs[-1])
    }
    assert len(texts) == 1


def test_label_flip_is_a_plain_flag():
    """flips_labels reads the scenario; build(label_flip=True) flips only the training labels."""
    s = parse({"faults": {"byzantine": [{"peer": 1, "attack": "label_flip"}]}})
    assert flips_labels(s, 1) and not flips_labels(s, 0)
    spec = learning_spec(s)
    honest, flipped = local.build(spec, 1), local.build(spec, 1, label_flip=True)
    n = honest.data.n_train
    np.testing.assert_array_equal(
        np.asarray(flipped.data.train.y[:n]), 9 - np.asarray(honest.data.train.y[:n])
    )
    np.testing.assert_array_equal(np.asarray(flipped.data.test.y), np.asarray(honest.data.test.y))


def test_learning_layer_never_imports_the_config_layer():
    """No module under p2pfl/learning imports p2pfl.config (dependencies point down)."""
    root = Path(__file__).resolve().parents[1] / "p2pfl" / "learning"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.startswith("p2pfl.config")], path


def test_precompile_marker_follows_the_settings_that_shape_the_programs():
    """The launcher's precompile marker changes with the training shapes, not with gossip."""
    from p2pfl.app.precompile import marker

    base = marker(parse({}))
    assert base is not None
    assert marker(parse({"gossip": {"round_timeout_s": 3.0}})) == base
    assert marker(parse({"training": {"rounds": 3}})) == base
    assert marker(parse({"training": {"batch_size": 16}})) != base
    assert marker(parse({"topology": {"peers": 16}})) != base


def _same(a: Any, b: Any) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exported_programs_compute_what_the_traced_trainer_computes(program_store: Path):
    """Peers served by the exported programs (no tracing) get bit-identical states and metrics."""
    spec = learning_spec(parse({"topology": {"peers": 4}, "model": {"init": "per_peer"}}))
    local.export_steps(spec, 0, server=True)
    assert any(program_store.iterdir())
    for peer in (0, 3):
        loc = local.build(spec, peer)
        ref = local.make_peer_trainer(spec, local.peer_data(spec.data, peer)[1])
        state = ref.init(spec.data.seed, *local.random_streams(spec.model, peer))
        _same(loc.state, state)
        assert isinstance(loc.trainer.train, exported.Program)
        assert loc.trainer.train.serves(loc.state, loc.data.train)
        assert loc.trainer.n_params == ref.n_params
        ours = loc.state
        for _ in range(2):
            ours, loss = loc.trainer.train(ours, loc.data.train)
            state, ref_loss = ref.train(state, loc.data.train)
            assert isinstance(ours, TrainState)
            _same(ours, state)
            assert float(loss) == float(ref_loss)
        host = np.asarray(ours.params)  # a peer evaluates host (mixed) parameters too
        assert local.evaluate(loc.trainer, host, loc.data) == local.evaluate(ref, host, loc.data)
    server = local.build_server(spec)
    sets = (server.holdout,)
    assert isinstance(server.trainer.evaluate_sets, exported.Program)
    assert server.trainer.evaluate_sets.serves(server.params, sets)
    _same(server.trainer.evaluate_sets(server.params, sets), ref.evaluate_sets(server.params, sets))


def stack_args(loc: local.Local) -> tuple[TrainState, Shard]:
    return loc.state, loc.data.train


def test_exported_programs_fall_back_for_other_arguments(program_store: Path):
    """Other shapes, vmap and a damaged store all run the traced functions, with their results."""
    spec = learning_spec(parse({"topology": {"peers": 4}}))
    local.export_steps(spec, 0)
    loc = local.build(spec, 1)
    ref = local.make_peer_trainer(spec, local.peer_data(spec.data, 1)[1])
    n = loc.data.n_train
    other = pad_shard(np.asarray(loc.data.train.x[:n]), np.asarray(loc.data.train.y[:n]), n + 3)
    assert not loc.trainer.train.serves(loc.state, other)  # type: ignore[attr-defined]
    _same(loc.trainer.train(loc.state, other), ref.train(loc.state, other))
    stack = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), (loc.state, loc.data.train))
    _same(jax.vmap(loc.trainer.train)(*stack), jax.vmap(ref.train)(*stack))
    for path in program_store.iterdir():
        path.write_bytes(b"not a program")
    damaged = local.build(spec, 1)
    _same(damaged.state, loc.state)
    assert not isinstance(damaged.trainer.train, exported.Program)
    _same(damaged.trainer.train(damaged.state, damaged.data.train), ref.train(*stack_args(loc)))


def test_bundled_dataset_is_parsed_once_per_store(program_store: Path):
    """The digits CSV is parsed once; later loads read the stored arrays, equal to a parse."""
    spec = learning_spec(parse({})).data
    first = local.load_dataset(spec, 0)
    assert len(list(program_store.glob("*.npz"))) == 1
    again = local.load_dataset(spec, 3)
    fresh = datasets.digits()
    for ds in (first, again):
        np.testing.assert_array_equal(ds.x, fresh.x)
        np.testing.assert_array_equal(ds.y, fresh.y)
        assert ds.x.dtype == fresh.x.dtype and ds.y.dtype == fresh.y.dtype
        assert (ds.n_classes, ds.image_shape) == (fresh.n_classes, fresh.image_shape)
