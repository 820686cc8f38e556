"""The dissensus attack's arithmetic: gains from the public graph, and what it sends."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from p2pfl.core.attacks import dissensus, dissensus_gains
from p2pfl.core.graphs import local_weights
from p2pfl.core.mixing import gossip_step, stack_neighbourhood


def test_gains_follow_the_targets_mixing_weights():
    """Star around 0 plus edge 1-2: peer 1 has neighbours 0 (attacker) and 2; gains are
    epsilon * W(honest) / W(attackers) from the Metropolis weights of the target."""
    g = nx.Graph([(0, 1), (0, 2), (0, 3), (0, 4), (1, 2)])
    gains = dissensus_gains(g, 0, {0}, 2.0, "metropolis")
    assert sorted(gains) == [1, 2, 3, 4]
    w1 = local_weights("metropolis", 2, {0: 4, 2: 2})  # 1/5 to the attacker, 1/3 to peer 2
    assert gains[1] == pytest.approx(2.0 * w1[2] / w1[0])
    assert gains[3] == 0.0  # peer 3 hears only the attacker: no honest step to cancel


def test_gains_use_the_runs_mixing_rule():
    """With uniform mixing the target's weights are 1 / (degree + 1) each."""
    g = nx.Graph([(0, 1), (0, 2), (0, 3), (0, 4), (1, 2)])
    gains = dissensus_gains(g, 0, {0}, 1.0, "uniform")
    assert gains[1] == pytest.approx(1.0)  # peer 1: one honest and one attacking neighbour


def test_colluders_are_not_targets_and_share_the_push():
    """Two adjacent attackers: neither crafts for the other; a target of both splits it."""
    g = nx.Graph([(0, 1), (0, 2), (1, 2), (2, 3)])
    gains = dissensus_gains(g, 0, {0, 1}, 1.0, "metropolis")
    assert sorted(gains) == [2]  # 1 is a colluder
    w = local_weights("metropolis", 3, {0: 2, 1: 2, 3: 1})
    assert gains[2] == pytest.approx(w[3] / (w[0] + w[1]))


def test_only_a_dissensus_attacker_has_gains():
    """A peer outside the colluders (e.g. a sign_flip attacker) has no gains to compute."""
    with pytest.raises(ValueError, match="not a dissensus attacker"):
        dissensus_gains(nx.path_graph(3), 0, {2}, 1.0, "metropolis")


def test_epsilon_one_cancels_the_targets_gossip_step():
    """The target's plain gossip step with the crafted model equals its own model (the
    honest neighbours' models at the attacker's centre): no step towards agreement."""
    g = nx.Graph([(0, 1), (1, 2), (1, 3)])  # attacker 0; target 1 hears 2 and 3
    gain = dissensus_gains(g, 0, {0}, 1.0, "metropolis")[1]
    rng = np.random.default_rng(0)
    centre = rng.normal(size=6).astype(np.float32)
    own = (centre + rng.normal(size=6)).astype(np.float32)
    crafted = dissensus(own, centre, gain)
    weights = local_weights("metropolis", 3, {0: 1, 2: 1, 3: 1})
    models = {0: crafted, 2: centre, 3: centre}
    stack, w = stack_neighbourhood(sorted(g[1]), models, weights, 6)
    params = np.asarray(gossip_step(own, stack, w).params)
    np.testing.assert_allclose(params, own, rtol=1e-5, atol=1e-5)
