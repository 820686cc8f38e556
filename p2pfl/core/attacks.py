"""Faults injected from the scenario (`[faults]`): Byzantine behaviour, as pure maths.

A Byzantine peer trains like any other but sends a transformed model instead of its
own (sign_flip, scale, gaussian, nan: the outgoing transforms of `transforms`), or
trains on flipped labels and sends the result honestly (label_flip). A dissensus
attacker (He, Karimireddy & Jaggi 2022, "Byzantine-robust decentralized learning via
ClippedGossip") knows the graph: it sends each honest neighbour i, as soon as i's model
of the round arrives, a model built to cancel (or, with epsilon > 1, reverse) i's
gossip step towards the others, so the honest peers drift apart instead of agreeing.
They exist to show what the robust aggregators are for: the attacks are real, and the
defences are measured against them. (Crashes are the runtime's: `process.die`.)
"""

from __future__ import annotations

from collections.abc import Set

import networkx as nx
import numpy as np

from p2pfl.core.graphs import Mixing, local_weights


def flip_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    """label_flip: class c becomes n_classes - 1 - c (every label wrong when n_classes > 1)."""
    return (n_classes - 1 - y).astype(y.dtype)


def dissensus_gains(
    graph: nx.Graph, attacker: int, colluders: Set[int], epsilon: float, mixing: Mixing
) -> dict[int, float]:
    """For each honest neighbour i of `attacker`: epsilon * W_i(honest) / W_i(attackers),
    the gain of `dissensus`, from i's `mixing` weights (the graph is public).

    `colluders` are every dissensus attacker of the run (`attacker` among them). With
    each of them next to i sending its crafted model, i's step sum_k W_ik (x_k - x_i)
    loses epsilon times its honest part (exactly so when each attacker's centre is the
    weighted mean of i's honest neighbours): 1 cancels it.
    """
    if attacker not in colluders:
        raise ValueError(f"peer {attacker} is not a dissensus attacker")
    gains: dict[int, float] = {}
    for i in graph.neighbors(attacker):
        if i in colluders:
            continue
        w = local_weights(mixing, graph.degree[i], {k: graph.degree[k] for k in graph.neighbors(i)})
        byz = sum(wk for k, wk in w.items() if k in colluders)
        gains[i] = epsilon * (sum(w.values()) - byz) / byz
    return gains


def dissensus(target: np.ndarray, centre: np.ndarray, gain: float) -> np.ndarray:
    """The model a dissensus attacker sends the neighbour whose model is `target`:
    target + gain * (target - centre), with `centre` its estimate of where the honest
    neighbours of the target are (the peer passes its own honestly trained model). The
    target's step is cancelled exactly (epsilon = 1) when `centre` is their weighted
    mean; with the attacker's estimate, most of it is."""
    t = np.asarray(target, dtype=np.float64)
    out = t + gain * (t - np.asarray(centre, dtype=np.float64))
    return np.ascontiguousarray(out, dtype=np.float32)
