"""A synchronous gossip round for every peer at once: the networked peer's core step over
gathered neighbourhoods.

Peer i's neighbourhood is a fixed row of `k_max` slots (its neighbours in ascending
id, then padding), so a round gathers `[n, k_max, d]` from the models sent and calls
`core.mixing.gossip_step` under `jax.vmap`: the very function a networked peer calls
on the `[degree, d]` stack `stack_neighbourhood` builds, with zero-weight rows where a
neighbour was not heard (padding slots are never heard). Never an n x n matrix.

Who is heard is the networked round's rule: the sender is alive, the link delivered
its model, and the receiver keeps it only if it is finite (the wire check drops the
rest). Each heard neighbour weighs what `core.graphs.local_weights` gives it; the rest
of the weight stays with the peer. A robust aggregator runs peer by peer, the
networked rule itself on the same `[degree, d]` stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2pfl.core.aggregators import GossipAggregator
from p2pfl.core.attacks import dissensus
from p2pfl.core.graphs import Mixing, local_weights
from p2pfl.core.mixing import disagreement, gossip_step


class Neighbourhoods(NamedTuple):
    """Every peer's neighbourhood as fixed-width rows."""

    idx: np.ndarray  # [n, k_max] int32: neighbours in ascending id, then the peer itself
    weight: np.ndarray  # [n, k_max] float32: each neighbour's mixing weight (0: padding)
    real: np.ndarray  # [n, k_max] bool: a neighbour, not padding
    degree: np.ndarray  # [n] int


def neighbourhoods(neighbours: Sequence[Sequence[int]], mixing: Mixing) -> Neighbourhoods:
    """The rows of every peer from its sorted neighbour list and the mixing rule.

    Weights are `local_weights` of all neighbours (the networked peer's weights when it
    hears every one of them; a neighbour not heard only zeroes its own weight).
    """
    n = len(neighbours)
    degree = np.array([len(nb) for nb in neighbours])
    k = max(1, int(degree.max()))
    idx = np.repeat(np.arange(n, dtype=np.int32)[:, None], k, axis=1)
    weight = np.zeros((n, k), np.float32)
    real = np.zeros((n, k), bool)
    for i, nb in enumerate(neighbours):
        w = local_weights(mixing, len(nb), {j: int(degree[j]) for j in nb})
        idx[i, : len(nb)] = nb
        weight[i, : len(nb)] = [w[j] for j in nb]
        real[i, : len(nb)] = True
    return Neighbourhoods(idx, weight, real, degree)


class Mixed(NamedTuple):
    """The round's new models and figures, for every peer."""

    params: jax.Array  # [n, d]
    disagreement: np.ndarray  # [n]
    kept_own: np.ndarray  # [n] bool: the mix failed or was not finite; own model kept


@jax.jit
def _mix_mean(
    own: jax.Array,
    sent: jax.Array,
    idx: jax.Array,
    base: jax.Array,
    delivered: jax.Array,
    alive: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole plain-mean round after training, in one program: which rows are used
    (delivered and finite), `gossip_step` of every peer on its gathered `[k_max, d]`
    rows, and own models kept where the mix is not finite or the peer is down."""
    finite = jnp.isfinite(sent).all(axis=1)
    weights = jnp.where(delivered & finite[idx], base, 0.0)
    mixed = jax.vmap(gossip_step)(own, sent[idx], weights)
    params, not_finite = _settle(own, mixed.params, alive)
    return params, mixed.disagreement, not_finite


@jax.jit
def _settle(own: jax.Array, mixed: jax.Array, alive: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The round's models: the mix, or the peer's own where the mix is not finite (as
    the networked peer does) or the peer is down; and where it was not finite."""
    finite = jnp.isfinite(mixed).all(axis=1)
    return jnp.where((finite & alive)[:, None], mixed, own), ~finite


# the same step on a stack already gathered (a dissensus attacker's rows put in)
_mix_stack = jax.jit(jax.vmap(gossip_step))


def mix(
    own: jax.Array,
    sent: jax.Array,
    nb: Neighbourhoods,
    delivered: np.ndarray,
    alive: np.ndarray,
    rule: GossipAggregator,
    crafted: Mapping[tuple[int, int], jax.Array] | None = None,
) -> Mixed:
    """Every peer's gossip step; a peer that is down keeps its model.

    Args:
        own: `[n, d]` each peer's model after training.
        sent: `[n, d]` what each peer sent (its model, or an attacker's transform of it).
        nb: the neighbourhood rows.
        delivered: `[n, k_max]` bool: the slot's model reached the peer this round (it
            is used if it is also finite: the receivers' wire check drops the rest).
        alive: `[n]` bool: the peer is up this round.
        rule: the plan's gossip aggregator ("mean" is `gossip_step` itself).
        crafted: (receiver, slot) -> the model a dissensus attacker sent that receiver
            in place of its `sent` row.
    """
    if rule is gossip_step and not crafted:
        params, spread, failed = _mix_mean(
            own, sent, nb.idx, nb.weight, jnp.asarray(delivered), jnp.asarray(alive)
        )
        return Mixed(params, np.asarray(spread), np.asarray(failed))
    finite = np.asarray(jnp.isfinite(sent).all(axis=1))
    used = delivered & finite[nb.idx]
    weights = jnp.asarray(np.where(used, nb.weight, 0.0).astype(np.float32))
    stack = sent[jnp.asarray(nb.idx)]  # [n, k_max, d]
    for (i, slot), model in (crafted or {}).items():
        stack = stack.at[i, slot].set(model)
    if rule is gossip_step:
        params, spread = _mix_stack(own, stack, weights)
        failed = np.zeros(len(own), bool)
    else:
        params, spread, failed = _mix_each(own, stack, weights, nb, rule)
    settled, not_finite = _settle(own, params, jnp.asarray(alive))
    return Mixed(settled, np.asarray(spread), failed | np.asarray(not_finite))


def _mix_each(
    own: jax.Array, stack: jax.Array, weights: jax.Array, nb: Neighbourhoods, rule: GossipAggregator
) -> tuple[jax.Array, np.ndarray, np.ndarray]:
    """A robust rule, peer by peer, on each peer's `[degree, d]` stack (numpy rules):
    the mixed models, the disagreements, and where the rule failed (own model kept)."""
    own_h, stack_h, w_h = (np.asarray(a) for a in (own, stack, weights))
    out = np.empty_like(own_h)
    spread = np.empty(len(own_h), np.float32)
    failed = np.zeros(len(own_h), bool)
    for i in range(len(own_h)):
        k = int(nb.degree[i])
        try:
            mixed = rule(own_h[i], stack_h[i, :k], w_h[i, :k])
            out[i], spread[i] = np.asarray(mixed.params), float(mixed.disagreement)
        except ValueError:  # e.g. clipping would overflow float32: the peer keeps its own
            out[i], failed[i] = own_h[i], True
            spread[i] = float(disagreement(own_h[i], stack_h[i, :k], w_h[i, :k]))
    return jnp.asarray(out), spread, failed


def dissensus_rows(
    gains: Mapping[int, Mapping[int, float]],
    own: jax.Array,
    sent: jax.Array,
    nb: Neighbourhoods,
    delivered: np.ndarray,
) -> dict[tuple[int, int], jax.Array]:
    """What each dissensus attacker sends each honest neighbour it heard this round:
    `core.attacks.dissensus` of the neighbour's model and its own (its own model where
    that is not finite); a target it did not hear gets the plain model (no row here).

    `delivered[j, s]` (the receiver's side): the model of `nb.idx[j, s]` reached j; the
    result maps (receiver, slot) to the crafted model, as `mix` takes it.
    """
    rows: dict[tuple[int, int], jax.Array] = {}
    if not gains:
        return rows
    own_h, sent_h = np.asarray(own), np.asarray(sent)
    for a, targets in gains.items():
        slots_of_a = {int(j): s for s, j in enumerate(nb.idx[a]) if nb.real[a, s]}
        for j, gain in targets.items():
            if not delivered[a, slots_of_a[j]]:
                continue  # a never had j's model: it sends j its plain model
            crafted = dissensus(sent_h[j], own_h[a], gain)
            if not np.isfinite(crafted).all():
                crafted = own_h[a]
            slot = next(s for s in range(nb.idx.shape[1]) if nb.real[j, s] and nb.idx[j, s] == a)
            rows[(j, slot)] = jnp.asarray(crafted, jnp.float32)
    return rows
