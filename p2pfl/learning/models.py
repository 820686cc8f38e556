"""JAX models as pure (init, apply) pairs over a parameter pytree.

`logreg` is a linear softmax classifier, `mlp` stacks ReLU layers of `hidden`
widths, `cnn` is two strided 3x3 convolutions and a dense head for image data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any  # a pytree of jax.Array; flattened to one float32 vector for the wire


class ModelDef(NamedTuple):
    """`init(key) -> params` and `apply(params, x) -> logits` for x of shape [batch, features]."""

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


def _dense(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    scale = jnp.sqrt(2.0 / n_in)
    return {"w": jax.random.normal(key, (n_in, n_out)) * scale, "b": jnp.zeros(n_out)}


def mlp(n_features: int, n_classes: int, hidden: Sequence[int]) -> ModelDef:
    """A ReLU multilayer perceptron; `hidden = []` gives logistic regression."""
    sizes = [n_features, *hidden, n_classes]

    def init(key: jax.Array) -> Params:
        keys = jax.random.split(key, len(sizes) - 1)
        return [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return ModelDef(init, apply)


def cnn(
    image_shape: tuple[int, int], n_classes: int, channels: Sequence[int] = (16, 32)
) -> ModelDef:
    """Two stride-2 3x3 convolutions with ReLU, then a dense layer to the classes."""
    h, w = image_shape

    def out_hw(size: int) -> int:
        for _ in channels:
            size = (size + 1) // 2
        return size

    flat = out_hw(h) * out_hw(w) * channels[-1]

    def init(key: jax.Array) -> Params:
        keys = jax.random.split(key, len(channels) + 1)
        convs, c_in = [], 1
        for k, c_out in zip(keys, channels, strict=False):
            scale = jnp.sqrt(2.0 / (9 * c_in))
            convs.append(
                {"w": jax.random.normal(k, (3, 3, c_in, c_out)) * scale, "b": jnp.zeros(c_out)}
            )
            c_in = c_out
        return {"convs": convs, "head": _dense(keys[-1], flat, n_classes)}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], h, w, 1)
        for conv in params["convs"]:
            x = jax.lax.conv_general_dilated(
                x, conv["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = jax.nn.relu(x + conv["b"])
        return x.reshape(x.shape[0], -1) @ params["head"]["w"] + params["head"]["b"]

    return ModelDef(init, apply)


def make_model(
    kind: str,
    n_features: int,
    n_classes: int,
    hidden: Sequence[int] = (64,),
    image_shape: tuple[int, int] | None = None,
) -> ModelDef:
    """The model a scenario names."""
    if kind == "logreg":
        return mlp(n_features, n_classes, [])
    if kind == "mlp":
        return mlp(n_features, n_classes, hidden)
    if kind == "cnn":
        if image_shape is None:
            raise ValueError("cnn needs image data")
        return cnn(image_shape, n_classes)
    raise ValueError(f"unknown model kind {kind!r}")
