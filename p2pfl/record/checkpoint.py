"""A peer's state on disk: parameters, optimizer state, round and PRNG key, one npz file.

Written atomically every round (a temporary file, then a rename), so a peer killed at
any moment leaves either the previous round's checkpoint or this one, never half of
one. Read back without pickle: the optimizer state's structure comes from a freshly
initialised state of the same model and optimizer, and only its leaves are stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2pfl.learning.trainer import TrainState


class Checkpoint(NamedTuple):
    """A restored state and the last round it completed."""

    state: TrainState
    round: int
    releases: int = 0  # DP releases made up to `round`: the accountant goes on from them


def path_for(out_dir: Path, peer_id: int) -> Path:
    """Where peer `peer_id` keeps its checkpoint in a run folder."""
    return out_dir / "checkpoints" / f"peer-{peer_id}.npz"


def save(path: Path, state: TrainState, round_: int, releases: int = 0) -> None:
    """Write `state` after `round_` atomically (with the DP releases made so far)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(state.opt_state)
    arrays: dict[str, np.ndarray] = {
        "params": np.asarray(state.params),
        "key": np.asarray(state.key),
        "round": np.asarray(round_, dtype=np.int64),
        "releases": np.asarray(releases, dtype=np.int64),
    }
    arrays.update({f"opt_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, allow_pickle=False, **arrays)
    tmp.replace(path)


def load(path: Path, like: TrainState) -> Checkpoint:
    """The checkpoint at `path`, shaped like `like` (a fresh state of the same model).

    Raises ValueError if the file does not fit (another model or optimizer).
    """
    leaves, treedef = jax.tree_util.tree_flatten(like.opt_state)
    try:
        with np.load(path, allow_pickle=False) as f:
            params, key, round_ = f["params"], f["key"], int(f["round"])
            releases = int(f["releases"]) if "releases" in f.files else 0
            opt = [f[f"opt_{i}"] for i in range(len(leaves))]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a checkpoint of this scenario ({exc})") from None
    if params.shape != like.params.shape or key.shape != like.key.shape:
        raise ValueError(f"{path} holds another model ({params.shape}, not {like.params.shape})")
    for saved, fresh in zip(opt, leaves, strict=True):
        if saved.shape != np.shape(fresh):
            raise ValueError(f"{path} holds another optimizer state")
    opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in opt])
    state = TrainState(jnp.asarray(params), opt_state, jnp.asarray(key))
    return Checkpoint(state, round_, releases)
