"""Factories and loaders for tests/test_custom.py, importable as "custom_models:<name>".

The MLPs all match the built-in `mlp` (one hidden ReLU layer of `HIDDEN` units,
He-normal weights, zero biases), so that their accuracies compare like for like.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from p2pfl.learning import datasets, models

HIDDEN = 64
_HE = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # as models._dense


def raw_mlp(n_features: int, n_classes: int, key: jax.Array) -> models.ModelDef:
    """The built-in MLP itself, as a plain (init, apply) pair."""
    return models.mlp(n_features, n_classes, [HIDDEN])


class _LinenMLP(linen.Module):
    n_classes: int

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = linen.relu(linen.Dense(HIDDEN, kernel_init=_HE)(x))
        return linen.Dense(self.n_classes, kernel_init=_HE)(x)


def linen_mlp(n_features: int, n_classes: int, key: jax.Array) -> linen.Module:
    """The MLP as a Flax linen module."""
    return _LinenMLP(n_classes)


class _NnxMLP(nnx.Module):
    def __init__(self, n_features: int, n_classes: int, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(n_features, HIDDEN, kernel_init=_HE, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, n_classes, kernel_init=_HE, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


def nnx_mlp(n_features: int, n_classes: int, key: jax.Array) -> nnx.Module:
    """The MLP as a Flax nnx module, initialised from `key`."""
    return _NnxMLP(n_features, n_classes, nnx.Rngs(key))


def equinox_mlp(n_features: int, n_classes: int, key: jax.Array) -> eqx.Module:
    """The MLP as an Equinox module (one example in, its logits out), He-initialised."""
    mlp = eqx.nn.MLP(n_features, n_classes, HIDDEN, 1, key=key)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(mlp.layers))
    weights = [
        _HE(k, layer.weight.shape[::-1]).T for k, layer in zip(keys, mlp.layers, strict=True)
    ]
    biases = [jnp.zeros(layer.weight.shape[0]) for layer in mlp.layers]
    return eqx.tree_at(
        lambda m: [x.weight for x in m.layers] + [x.bias for x in m.layers],
        mlp,
        weights + biases,
    )


# -- bad factories ---------------------------------------------------------------------

NOT_CALLABLE = 42


def returns_string(n_features: int, n_classes: int, key: jax.Array) -> str:
    return "a model"


def wrong_logits(n_features: int, n_classes: int, key: jax.Array) -> models.ModelDef:
    """Logits for one class too many."""
    return models.mlp(n_features, n_classes + 1, [8])


def raises(n_features: int, n_classes: int, key: jax.Array) -> Any:
    raise RuntimeError("factory exploded")


def integer_params(n_features: int, n_classes: int, key: jax.Array) -> models.ModelDef:
    def init(k: jax.Array) -> Any:
        return {"w": jnp.zeros((n_features, n_classes), jnp.int32)}

    def apply(p: Any, x: jax.Array) -> jax.Array:
        return x @ p["w"].astype(jnp.float32)

    return models.ModelDef(init, apply)


# -- loaders ---------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits, as a user would return them."""
    ds = datasets.digits()
    return ds.x, ds.y


def digits_with_holdout() -> tuple[np.ndarray, ...]:
    """The digits, its last 300 rows as the given common holdout."""
    x, y = digits()
    return x[:-300], y[:-300], x[-300:], y[-300:]


def bad_3d() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((10, 2, 2)), np.zeros(10, dtype=np.int64)


def bad_float_labels() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((10, 3)), np.zeros(10)


def bad_label_range() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((10, 3)), np.arange(10) - 1


def bad_lengths() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((10, 3)), np.zeros(9, dtype=np.int64)


def bad_nan() -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((10, 3))
    x[4, 1] = np.nan
    return x, np.arange(10) % 2


def bad_return() -> np.ndarray:
    return np.zeros((10, 3))


def bad_holdout_width() -> tuple[np.ndarray, ...]:
    y = np.arange(40) % 2
    return np.zeros((40, 3)), y, np.zeros((5, 4)), y[:5]


def too_few() -> tuple[np.ndarray, np.ndarray]:
    """Five samples: not enough for eight peers."""
    return np.zeros((5, 3)), np.arange(5) % 2
