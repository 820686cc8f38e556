"""Outgoing-model transforms: what happens to a model between training and the wire.

optax-style: a transform is a pair of pure functions, `init(seed, peer) -> state` and
`apply(model, state) -> (model, state)`, with its state explicit (a JAX PRNG key, or
`()` when it has none) and replaced on every call, never mutated. `chain(a, b)` applies
a then b. The runtime builds a peer's chain once from the config and calls `apply` on
every model it sends; the simulator can `jax.vmap` the same `apply` over peers.

Today's members are the Byzantine attacks (`sign_flip`, `scale`, `gaussian`, `nan`,
picked by `attack_transform`); differential-privacy noise is meant to be one more
link in the chain (clip, then `gaussian` on its own stream).

Randomness: a transform that draws noise owns a JAX stream of `p2pfl.core.streams`,
keyed `fold_in(fold_in(PRNGKey(seed), stream), peer)`, so its noise depends on the
seed, the stream and the peer, not on where it sits in a chain. Two transforms of one
chain on the same stream would draw the same noise: give each its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from p2pfl.core import streams

# A transform's state: a pytree (a PRNG key, () when stateless, a tuple for a chain).
TransformState = Any

OUTGOING_ATTACKS = ("sign_flip", "scale", "gaussian", "nan")
TRAINING_ATTACKS = ("label_flip", "dissensus")  # not outgoing transforms: identity


class ModelTransform(NamedTuple):
    """A pure outgoing-model transform (see the module docstring)."""

    init: Callable[[int, int], TransformState]  # (seed, peer) -> the initial state
    apply: Callable[[ArrayLike, TransformState], tuple[ArrayLike, TransformState]]


def _stateless(f: Callable[[jax.Array], jax.Array]) -> ModelTransform:
    """A transform without state from a float32 model -> model function."""

    def apply(model: ArrayLike, state: TransformState) -> tuple[ArrayLike, TransformState]:
        return f(jnp.asarray(model, jnp.float32)), state

    return ModelTransform(lambda seed, peer: (), apply)


def stream_key(seed: int, stream: int, peer: int) -> jax.Array:
    """The PRNG key of one peer's use of a JAX stream: fold_in(fold_in(key, stream), peer)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), peer)


def identity() -> ModelTransform:
    """Sends the model as it is (the very object passed in: no copy, no conversion)."""
    return ModelTransform(lambda seed, peer: (), lambda model, state: (model, state))


def chain(*transforms: ModelTransform) -> ModelTransform:
    """The transforms applied in order, left to right; its state is the tuple of theirs."""

    def init(seed: int, peer: int) -> TransformState:
        return tuple(t.init(seed, peer) for t in transforms)

    def apply(model: ArrayLike, state: TransformState) -> tuple[ArrayLike, TransformState]:
        out: Any = model
        new = []
        for t, before in zip(transforms, state, strict=True):
            out, after = t.apply(out, before)
            new.append(after)
        return out, tuple(new)

    return ModelTransform(init, apply)


def sign_flip() -> ModelTransform:
    """Sends -model."""
    return _stateless(jnp.negative)


def scale(factor: float) -> ModelTransform:
    """Sends factor * model."""
    return _stateless(lambda x: jnp.float32(factor) * x)


def nan() -> ModelTransform:
    """Sends a model of NaNs (the receivers' checks must drop it)."""
    return _stateless(lambda x: jnp.full_like(x, jnp.nan))


def gaussian(sigma: float, stream: int = streams.ATTACK_KEY) -> ModelTransform:
    """Sends model + N(0, sigma^2) noise per coordinate, fresh on every call.

    State: the PRNG key of `stream` for this peer, split on every call.
    """

    def init(seed: int, peer: int) -> TransformState:
        return stream_key(seed, stream, peer)

    def apply(model: ArrayLike, state: TransformState) -> tuple[ArrayLike, TransformState]:
        x = jnp.asarray(model, jnp.float32)
        key, draw = jax.random.split(state)
        return x + jnp.float32(sigma) * jax.random.normal(draw, x.shape, jnp.float32), key

    return ModelTransform(init, apply)


def attack_transform(attack: str, *, factor: float = -4.0, sigma: float = 1.0) -> ModelTransform:
    """What a Byzantine peer running `attack` does to the model it sends.

    sign_flip, scale (by `factor`), gaussian (`sigma`) and nan are outgoing transforms;
    label_flip (poisons the training data) and dissensus (crafts one model per
    neighbour) send their model as it is: identity. Other names raise ValueError.
    """
    if attack == "sign_flip":
        return sign_flip()
    if attack == "scale":
        return scale(factor)
    if attack == "gaussian":
        return gaussian(sigma)
    if attack == "nan":
        return nan()
    if attack in TRAINING_ATTACKS:
        return identity()
    allowed = ", ".join(OUTGOING_ATTACKS + TRAINING_ATTACKS)
    raise ValueError(f"unknown attack {attack!r}; expected one of {allowed}")
