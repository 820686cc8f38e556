"""Faults injected from the scenario (`[faults]`): crashes and Byzantine behaviour.

A crashing peer dies by SIGKILL when it reaches its round. A Byzantine peer trains
like any other but sends `poison(model)` instead of its model (sign_flip, scale,
gaussian, nan), or trains on flipped labels and sends the result honestly
(label_flip). A dissensus attacker (He, Karimireddy & Jaggi 2022, "Byzantine-robust
decentralized learning via ClippedGossip") knows the graph: it sends each honest
neighbour i, as soon as i's model of the round arrives, a model built to cancel (or,
with epsilon > 1, reverse) i's gossip step towards the others, so the honest peers
drift apart instead of agreeing. They exist to show what the robust aggregators are
for: the attacks are real, and the defences are measured against them.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import networkx as nx
import numpy as np

from p2pfl.scenario import Byzantine, Scenario
from p2pfl.topology import local_weights


def die(logger: Any) -> None:
    """An injected crash (`[faults] crash`): SIGKILL, no clean-up, as a power cut would."""
    logger.warning("crash_injected")
    os.kill(os.getpid(), signal.SIGKILL)


def poison(attack: Byzantine, model: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a Byzantine peer sends in place of `model` (float32, same shape)."""
    if attack.attack == "sign_flip":
        out = -model
    elif attack.attack == "scale":
        out = attack.factor * model
    elif attack.attack == "gaussian":
        out = model + rng.normal(0.0, attack.sigma, model.shape)
    elif attack.attack == "nan":
        out = np.full_like(model, np.nan)
    else:  # label_flip poisons the training data; dissensus crafts per neighbour
        out = model
    return np.ascontiguousarray(out, dtype=np.float32)


def flip_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    """label_flip: class c becomes n_classes - 1 - c (every label wrong when n_classes > 1)."""
    return (n_classes - 1 - y).astype(y.dtype)


def dissensus_gains(s: Scenario, graph: nx.Graph, attacker: int) -> dict[int, float]:
    """For each honest neighbour i of `attacker`: epsilon * W_i(honest) / W_i(attackers),
    the gain of `dissensus`, from i's mixing weights (the graph is public).

    With every dissensus attacker next to i sending its crafted model, i's step
    sum_k W_ik (x_k - x_i) loses epsilon times its honest part (exactly so when each
    attacker's centre is the weighted mean of i's honest neighbours): 1 cancels it.
    """
    attack = s.byzantine(attacker)
    if attack is None or attack.attack != "dissensus":
        raise ValueError(f"peer {attacker} is not a dissensus attacker")
    colluders = {f.peer for f in s.faults.byzantine if f.attack == "dissensus"}
    gains: dict[int, float] = {}
    for i in graph.neighbors(attacker):
        if i in colluders:
            continue
        w = local_weights(
            s.gossip.mixing, graph.degree[i], {k: graph.degree[k] for k in graph.neighbors(i)}
        )
        byz = sum(wk for k, wk in w.items() if k in colluders)
        gains[i] = attack.epsilon * (sum(w.values()) - byz) / byz
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
