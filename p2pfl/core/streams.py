"""Every random stream of a run, named once.

A run draws all its randomness from the scenario's seed. Each use gets its own stream
number here, so two uses never share a sequence and a number is never typed twice:
numpy streams are seeded `np.random.default_rng([seed, STREAM, ...])`, JAX streams are
`jax.random.fold_in(PRNGKey(seed), STREAM (+ peer id))`.
"""

from __future__ import annotations

import numpy as np

# numpy: np.random.default_rng([seed, <stream>, ...]), the stream number always second,
# so no two uses can ever draw the same sequence
HOLDOUT = 1  # [seed, HOLDOUT]: which samples form the common holdout
SPLIT = 2  # [seed, SPLIT]: how the pool is dealt out to the peers
PEER_TEST = 3  # [seed, PEER_TEST, peer]: a peer's own train/test split of its shard
SAMPLE = 4  # [seed, SAMPLE, round]: which peers the server samples in a round
ATTACK = 11  # a Byzantine peer's noise; drawn in JAX, from stream ATTACK_KEY below
LINK = 12  # [seed, LINK, peer]: which messages a faulty link loses
SIM_LINK = 13  # [seed, SIM_LINK, round]: which links lose their model in a simulated round

# JAX: jax.random.fold_in(PRNGKey(seed), <stream>). Streams 0 .. peers - 1 are the
# peers' own initial models (model.init = "per_peer"): named streams sit far above.
SHARED_INIT = 2**31 - 1  # the initial model every peer shares (model.init = "shared")
TRAIN_BASE = 2**30  # peer i shuffles its batches with stream TRAIN_BASE + i
# fold_in(fold_in(PRNGKey(seed), ATTACK_KEY), peer): a peer's outgoing-model noise
# (`transforms.gaussian`)
ATTACK_KEY = 2**29 + ATTACK
DP = 14  # differential-privacy noise; drawn in JAX, from stream DP_KEY below
# fold_in(fold_in(fold_in(PRNGKey(seed), DP_KEY), peer), round): the noise a peer adds
# to its round-r update (`privacy.privatize`); stateless, so a resumed peer and the
# simulator draw the very same noise
DP_KEY = 2**29 + DP


def rng(seed: int, *path: int) -> np.random.Generator:
    """The numpy generator of one stream: `default_rng([seed, *path])`."""
    return np.random.default_rng([seed, *path])
