"""Bring-your-own model and data: adapters train like the built-in MLP, a custom loader
partitions like a built-in set, and every bad factory or loader is a ScenarioError
naming its field before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import custom_models
import jax
import numpy as np
import pytest

from p2pfl.config.learning import learning_spec
from p2pfl.config.loader import load, parse
from p2pfl.config.schema import ScenarioError
from p2pfl.learning import custom, datasets, exported, local, models

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
INITS = (0, 1, 2, 3)  # init streams the accuracies are averaged over
ROUNDS = 5


def _scenario(raw: dict[str, Any] | None = None) -> Any:
    """Two peers on digits, factories and loaders found beside this file."""
    base = {"topology": {"peers": 2}, "training": {"local_epochs": 2}}
    for k, v in (raw or {}).items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return parse(base, base_dir=str(TESTS))


def _custom(factory: str) -> dict[str, Any]:
    return {"model": {"kind": "custom", "factory": f"custom_models:{factory}"}}


def _accuracy(spec: local.LearningSpec) -> float:
    """Peer 0's accuracy on its test split and the holdout together, after ROUNDS rounds
    of local training, averaged over the INITS initialisations (one compile for all)."""
    loc = local.build(spec, 0)
    seed, _, train_stream = local.init_args(spec, 0)
    n_test, n_hold = int(loc.data.test.n), int(loc.data.holdout.n)
    results = []
    for stream in INITS:
        state = loc.trainer.init(seed, stream, train_stream)
        for _ in range(ROUNDS):
            state, _ = loc.trainer.train(state, loc.data.train)
        test, hold = local.evaluate(loc.trainer, state.params, loc.data)
        results.append((test * n_test + hold * n_hold) / (n_test + n_hold))
    return float(np.mean(results))


@pytest.fixture(scope="module")
def builtin_accuracy() -> float:
    return _accuracy(learning_spec(_scenario({"model": {"hidden": [custom_models.HIDDEN]}})))


@pytest.mark.parametrize("factory", ["raw_mlp", "linen_mlp", "nnx_mlp", "equinox_mlp"])
def test_adapter_trains_like_the_builtin_mlp(factory: str, builtin_accuracy: float):
    """Each kind of model reaches the built-in MLP's accuracy (same width, optimizer,
    epochs, data) within one point; the raw pair of the built-in functions exactly."""
    spec = learning_spec(_scenario(_custom(factory)))
    assert spec.model.kind == "custom"
    ours = _accuracy(spec)
    if factory == "raw_mlp":
        assert ours == builtin_accuracy
    assert abs(ours - builtin_accuracy) <= 0.01, (ours, builtin_accuracy)


@pytest.mark.parametrize("factory", ["linen_mlp", "nnx_mlp", "equinox_mlp"])
def test_adapter_initialises_from_the_init_stream(factory: str):
    """init(key) depends on p2pfl's init stream: per_peer starts differ, shared ones agree."""
    model = custom.make_model(f"custom_models:{factory}", 64, 10, 0, str(TESTS))
    key = jax.random.PRNGKey(0)
    first, again, other = (
        jax.tree_util.tree_leaves(model.init(jax.random.fold_in(key, s))) for s in (1, 1, 2)
    )
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_python_objects_override_the_file():
    """learning_spec takes a factory callable and arrays: both become custom and train."""
    x, y = custom_models.digits()
    spec = learning_spec(_scenario(), model=custom_models.linen_mlp, data=(x, y))
    assert (spec.model.kind, spec.data.dataset) == ("custom", "custom")
    loc = local.build(spec, 1)
    _, loss = loc.trainer.train(loc.state, loc.data.train)
    assert np.isfinite(float(loss)) and loc.n_classes == 10
    spec = learning_spec(_scenario(), data=custom_models.digits)
    assert spec.model.kind == "mlp" and local.load_dataset(spec.data, 0).x.shape == x.shape


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_custom_loader_partitions_like_the_builtin_set(partition: str):
    """The same arrays from a loader give the same shards, rows and holdout as `digits`."""
    data = {"partition": partition}
    builtin = learning_spec(_scenario({"topology": {"peers": 4}, "data": data})).data
    mine = learning_spec(
        _scenario(
            {
                "topology": {"peers": 4},
                "data": {**data, "dataset": "custom", "loader": "custom_models:digits"},
            }
        )
    ).data
    a, _ = local.host_data(builtin, list(range(4)))
    b, _ = local.host_data(mine, list(range(4)))
    for x, y in zip(
        jax.tree_util.tree_leaves((a.train, a.test, a.holdout, a.n_train)),
        jax.tree_util.tree_leaves((b.train, b.test, b.holdout, b.n_train)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    one, _ = local.peer_data(mine, 2)  # a networked peer derives the same shard
    np.testing.assert_array_equal(np.asarray(one.train.x), b.train[0][2])


def test_given_holdout_is_the_common_holdout_and_the_rest_is_the_pool():
    """(x, y, xh, yh): the holdout is exactly (xh, yh); the peers' shards cover all of x."""
    spec = learning_spec(
        _scenario(
            {
                "topology": {"peers": 3},
                "data": {"dataset": "custom", "loader": "custom_models:digits_with_holdout"},
            }
        )
    ).data
    ds = local.load_dataset(spec, 0)
    _, y, xh, yh = custom_models.digits_with_holdout()
    split = local._split(spec, ds)
    assert sorted(np.concatenate(split.shards).tolist()) == list(range(len(y)))
    host, _ = local.host_data(spec, [0, 1, 2])
    assert host.holdout is not None
    np.testing.assert_array_equal(host.holdout[0], xh)
    np.testing.assert_array_equal(host.holdout[1], yh)
    assert int(host.n_train.sum() + host.test[2].sum()) == len(y)


FACTORY_CASES = [
    ("custom_models:NOT_CALLABLE", "not callable"),
    ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ("custom_models:nowhere", "has no attribute 'nowhere'"),
    ("custom_models:returns_string", "must return an (init, apply) pair"),
    ("custom_models:wrong_logits", "apply must return float logits [batch, n_classes]"),
    ("custom_models:raises", "raised RuntimeError: factory exploded"),
    ("custom_models:integer_params", "non-float parameters"),
]


@pytest.mark.parametrize(("factory", "says"), FACTORY_CASES)
def test_bad_factory_is_a_scenario_error_naming_the_field(factory: str, says: str):
    """Each unusable factory fails at load with `model.factory = '...': <why>`."""
    with pytest.raises(ScenarioError) as err:
        _scenario({"model": {"kind": "custom", "factory": factory}})
    assert f"model.factory = {factory!r}" in str(err.value)
    assert says in str(err.value)


LOADER_CASES = [
    ("bad_3d", "x must be 2-D"),
    ("bad_float_labels", "y must be integer labels"),
    ("bad_label_range", "labels must lie in"),
    ("bad_lengths", "one label per row"),
    ("bad_nan", "NaN or infinite"),
    ("bad_return", "must return (x, y) or (x, y, x_holdout, y_holdout)"),
    ("bad_holdout_width", "the holdout has 4 features"),
    ("too_few", "partition needs at least 16"),
]


@pytest.mark.parametrize(("loader", "says"), LOADER_CASES)
def test_bad_loader_is_a_scenario_error_naming_the_field(loader: str, says: str):
    """Each unusable loader fails at load with `data.loader = '...': <why>`."""
    ref = f"custom_models:{loader}"
    with pytest.raises(ScenarioError) as err:
        _scenario({"topology": {"peers": 8}, "data": {"dataset": "custom", "loader": ref}})
    assert f"data.loader = {ref!r}" in str(err.value)
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"model": {"kind": "custom"}}, "model.factory is missing"),
        ({"model": {"factory": "custom_models:raw_mlp"}}, "only allowed with model.kind"),
        ({"data": {"dataset": "custom"}}, "data.loader is missing"),
        ({"data": {"loader": "custom_models:digits"}}, "only allowed with data.dataset"),
        ({"model": {"kind": "custom", "factory": "no colon"}}, "model.factory = 'no colon'"),
        (
            {"data": {"dataset": "custom", "loader": "custom_models:digits", "classes": 5}},
            "labels must lie in 0..4",
        ),
        (
            {"model": {"kind": "cnn"}, "data": {"dataset": "custom", "loader": "m:f"}},
            "model.kind = 'cnn' needs image data",
        ),
    ],
)
def test_custom_fields_are_required_exactly_when_custom(raw: dict[str, Any], says: str):
    """factory / loader must be given with kind / dataset custom, and only then."""
    with pytest.raises(ScenarioError) as err:
        _scenario(raw)
    assert says in str(err.value)


def test_bad_python_objects_are_scenario_errors():
    """A callable or arrays given to learning_spec are checked there, naming the field."""
    with pytest.raises(ScenarioError, match=r"model\.factory = '.*wrong_logits'"):
        learning_spec(_scenario(), model=custom_models.wrong_logits)
    x, y = custom_models.bad_nan()
    with pytest.raises(ScenarioError, match=r"data\.loader = .*NaN"):
        learning_spec(_scenario(), data=(x, y))
    with pytest.raises(ScenarioError, match=r"model\.factory = .*not callable"):
        learning_spec(_scenario(), model=3)  # type: ignore[arg-type]


@pytest.fixture
def program_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The exported-program store in a temporary folder (JAX's own cache left alone)."""
    folder = tmp_path / exported.FOLDER
    monkeypatch.setattr(exported, "store", lambda: folder)
    return folder


def test_custom_models_never_share_an_exported_program(program_store: Path):
    """An exported custom model serves only itself: another factory (same shapes) finds
    none of its programs, and a lambda is never exported."""
    spec = learning_spec(_scenario(_custom("linen_mlp")))
    local.export_steps(spec, 0)
    served = local.build(spec, 1)
    assert isinstance(served.trainer.train, exported.Program)
    assert served.trainer.train.serves(served.state, served.data.train)
    other = local.build(learning_spec(_scenario(_custom("nnx_mlp"))), 1)
    assert served.trainer.n_params == other.trainer.n_params
    assert not isinstance(other.trainer.init, exported.Program)
    ds = local.load_dataset(spec.data, 0)
    assert local.program_settings(spec, ds) != local.program_settings(
        learning_spec(_scenario(_custom("equinox_mlp"))), ds
    )
    lam = learning_spec(_scenario(), model=lambda f, c, k: models.mlp(f, c, [8]))
    assert local.program_settings(lam, ds) is None


def test_factory_identity_follows_its_source(tmp_path: Path):
    """Editing the factory's file changes its identity (so its exported programs' key)."""
    path = tmp_path / "edited_factory.py"
    path.write_text(
        "from p2pfl.learning import models\ndef f(n, c, key):\n    return models.mlp(n, c, [4])\n"
    )
    before = custom.identity("edited_factory:f", str(tmp_path))
    path.write_text(path.read_text().replace("[4]", "[5]"))
    after = custom.identity("edited_factory:f", str(tmp_path))
    assert before is not None and after is not None
    assert before["factory"] == after["factory"] == "edited_factory:f"
    assert before["source"] != after["source"]


def test_loader_is_called_once_per_process(tmp_path: Path):
    """Checking and building both use the loader's one result."""
    (tmp_path / "counted_loader.py").write_text(
        "import numpy as np\ncalls = []\n"
        "def load():\n    calls.append(1)\n"
        "    return np.eye(40, 3, dtype=np.float32), np.arange(40) % 2\n"
    )
    s = parse({"data": {"dataset": "custom", "loader": "counted_loader:load"}}, str(tmp_path))
    local.build(learning_spec(s), 0)
    assert sys.modules["counted_loader"].calls == [1]


def test_from_arrays_infers_classes_and_keeps_the_holdout_last():
    """n_classes defaults to the largest label + 1; a given holdout is the last rows."""
    ds = datasets.from_arrays(
        np.ones((6, 2)), np.array([0, 1, 2, 0, 1, 2]), (np.zeros((2, 2)), [3, 0])
    )
    assert (ds.n_classes, ds.holdout_rows, ds.x.shape, ds.x.dtype) == (4, 2, (8, 2), np.float32)
    np.testing.assert_array_equal(ds.y[-2:], [3, 0])


@pytest.mark.parametrize("name", ["hospitals_custom.toml", "flax_cnn_mnist.toml"])
def test_example_scenarios_load(name: str):
    """The examples' scenario files pass every check (their factory / loader included)."""
    s = load(ROOT / "examples" / name)
    assert "custom" in (s.model.kind, s.data.dataset)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "section", "body"),
    [
        ("simulate", "data", 'dataset = "custom"\nloader = "my_code:load"'),
        ("launch", "model", 'kind = "custom"\nfactory = "my_code:model"'),
    ],
)
def test_cli_exits_2_naming_the_bad_field(tmp_path: Path, command: str, section: str, body: str):
    """`p2pfl simulate|launch` with a bad loader / factory beside the scenario: exit 2,
    the field named on stderr."""
    (tmp_path / "my_code.py").write_text(
        "import numpy as np\n"
        "def load():\n    return np.zeros((20, 2, 2)), np.zeros(20, dtype=int)\n"
        "def model(n, c, key):\n    return 'not a model'\n"
    )
    scenario = tmp_path / "bad.toml"
    scenario.write_text(f"[topology]\npeers = 2\n\n[{section}]\n{body}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "p2pfl", command, str(scenario), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    field = (
        "data.loader = 'my_code:load'" if section == "data" else "model.factory = 'my_code:model'"
    )
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr
