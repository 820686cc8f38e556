"""A small Flax linen CNN trained on mnist5k by eight gossiping peers, in one process.

Run it through the Python API (`pip install 'p2pfl-gossip[flax,mnist]'`):

    python examples/flax_cnn_mnist.py

or from the scenario file beside it, which names this module's factory
(`[model] kind = "custom"`, `factory = "flax_cnn_mnist:cnn"`; the scenario's folder is
on `sys.path` while it is imported):

    p2pfl simulate examples/flax_cnn_mnist.toml
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
from flax import linen


class CNN(linen.Module):
    """Two stride-2 3x3 convolutions with ReLU, then a dense layer to the classes."""

    side: int  # images are side x side, flattened into the rows p2pfl hands the model
    n_classes: int

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], self.side, self.side, 1)
        x = linen.relu(linen.Conv(16, (3, 3), strides=2)(x))
        x = linen.relu(linen.Conv(32, (3, 3), strides=2)(x))
        return linen.Dense(self.n_classes)(x.reshape(x.shape[0], -1))


def cnn(n_features: int, n_classes: int, key: jax.Array) -> CNN:
    """The factory p2pfl calls: rows of `n_features` = side x side pixels."""
    side = math.isqrt(n_features)
    if side * side != n_features:
        raise ValueError(f"{n_features} features are not a square image")
    return CNN(side, n_classes)


def main() -> None:
    """Simulate the scenario beside this file with `cnn` given as a Python object."""
    import p2pfl

    scenario = Path(__file__).with_name("flax_cnn_mnist.toml")
    result = p2pfl.simulate(scenario, model=cnn, out=Path("runs") / "flax_cnn_mnist")
    print(result.summary)


if __name__ == "__main__":
    main()
