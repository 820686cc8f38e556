"""The round's maths in p2pfl.core: gossip and FedAvg steps, the registry, the transforms."""

from __future__ import annotations

import jax
import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.core.aggregators import (
    GOSSIP_AGGREGATORS,
    SERVER_AGGREGATORS,
    gossip_aggregator,
    server_aggregator,
)
from p2pfl.core.graphs import local_weights
from p2pfl.core.mixing import disagreement, fedavg_step, gossip_step, stack_neighbourhood
from p2pfl.core.transforms import (
    ModelTransform,
    attack_transform,
    chain,
    gaussian,
    identity,
    nan,
    scale,
    sign_flip,
)

PROPERTY = settings(max_examples=60, deadline=None, database=None)
SETTINGS = {"trim": 1, "tau": None, "clip_fraction": 0.2, "clip_drop": None}


def _network(g: nx.Graph, x: np.ndarray, lost: frozenset[int] = frozenset()):
    """Every peer's gossip_step inputs, padded to the largest degree: [n, k_max, d], [n, k_max].

    Peers in `lost` hear nothing from their first neighbour this round.
    """
    n, d = x.shape
    k_max = max(dict(g.degree).values())
    stacks = np.zeros((n, k_max, d), np.float32)
    weights = np.zeros((n, k_max), np.float32)
    for i in range(n):
        neighbours = sorted(g[i])
        w = local_weights("metropolis", g.degree[i], {j: g.degree[j] for j in neighbours})
        heard = {j: x[j] for j in neighbours[1 if i in lost else 0 :]}
        s, ww = stack_neighbourhood(neighbours, heard, w, d)
        stacks[i, : len(neighbours)], weights[i, : len(neighbours)] = s, ww
    return stacks, weights


def _vmap_gap(g: nx.Graph, seed: int, lost: frozenset[int] = frozenset()) -> float:
    """max |vmap(gossip_step) - gossip_step peer by peer| over params and disagreement."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((g.number_of_nodes(), 40)).astype(np.float32)
    stacks, weights = _network(g, x, lost)
    batched = jax.vmap(gossip_step)(x, stacks, weights)
    gap = 0.0
    for i in range(len(x)):
        one = gossip_step(x[i], stacks[i], weights[i])
        gap = max(gap, float(np.max(np.abs(np.asarray(batched.params[i]) - one.params))))
        gap = max(gap, abs(float(batched.disagreement[i]) - float(one.disagreement)))
    return gap


def test_vmapped_step_over_a_ring_equals_peer_by_peer():
    """vmap(gossip_step) over 8 ring peers' states equals calling it for each peer."""
    assert _vmap_gap(nx.cycle_graph(8), seed=0) <= 1e-6


def test_vmapped_step_with_padding_and_losses_equals_peer_by_peer():
    """Uneven degrees padded to k_max and neighbours not heard: still the per-peer step."""
    g = nx.cycle_graph(8)
    g.add_edges_from([(0, 4), (0, 2), (1, 5)])  # degrees 2 .. 4
    assert _vmap_gap(g, seed=1, lost=frozenset({0, 3, 5})) <= 1e-6


@st.composite
def _arrivals(draw):
    """(own, neighbours, received models in arrival order, weights, the same shuffled)."""
    d = draw(st.integers(1, 6))
    k = draw(st.integers(1, 5))
    neighbours = draw(st.lists(st.integers(0, 50), min_size=k, max_size=k, unique=True))
    heard = draw(st.lists(st.sampled_from(neighbours), unique=True))
    values = st.floats(-100, 100, width=32)
    own = draw(hnp.arrays(np.float32, (d,), elements=values))
    models = draw(hnp.arrays(np.float32, (len(heard), d), elements=values))
    w = draw(st.lists(st.floats(0.01, 1 / (k + 1)), min_size=k, max_size=k))
    order = draw(st.permutations(range(len(heard))))
    return own, neighbours, heard, models, dict(zip(neighbours, w, strict=True)), order


@PROPERTY
@given(_arrivals(), st.sampled_from(GOSSIP_AGGREGATORS))
def test_mixing_does_not_depend_on_arrival_order(case, name):
    """Models arriving in any order, stacked by id, give bit-identical results (every rule)."""
    own, neighbours, heard, models, weights, order = case
    rule = gossip_aggregator(name, **SETTINGS)
    as_sent = {j: models[i] for i, j in enumerate(heard)}
    shuffled = {heard[i]: models[i] for i in order}  # dicts keep their insertion order
    reversed_ids = list(reversed(neighbours))
    a = rule(own, *stack_neighbourhood(neighbours, as_sent, weights, own.size))
    b = rule(own, *stack_neighbourhood(reversed_ids, shuffled, weights, own.size))
    np.testing.assert_array_equal(np.asarray(a.params), np.asarray(b.params))
    assert float(a.disagreement) == float(b.disagreement)


@pytest.mark.parametrize("n", [6, 8])
def test_complete_graph_gossip_equals_fedavg(n):
    """Full graph, Metropolis weights: each peer's one gossip step is FedAvg of all n."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    fedavg = np.asarray(fedavg_step(x, np.ones(n, np.float32)))
    g = nx.complete_graph(n)
    for i in range(n):
        w = local_weights("metropolis", n - 1, {j: n - 1 for j in g[i]})
        stack, ww = stack_neighbourhood(list(g[i]), {j: x[j] for j in g[i]}, w, 64)
        mixed = np.asarray(gossip_step(x[i], stack, ww).params)
        assert np.max(np.abs(mixed - fedavg)) <= 1e-6


@pytest.mark.parametrize("name", GOSSIP_AGGREGATORS)
def test_zero_weight_rows_change_nothing(name):
    """Rows of weight 0 (padding, or a neighbour not heard), even holding NaN, leave the
    params and the disagreement as they were without them."""
    rng = np.random.default_rng(3)
    own = rng.standard_normal(9).astype(np.float32)
    rows = rng.standard_normal((3, 9)).astype(np.float32)
    w = np.array([0.2, 0.25, 0.15], np.float32)
    padded = np.full((6, 9), np.nan, np.float32)
    padded[[0, 2, 5]] = rows
    pw = np.zeros(6, np.float32)
    pw[[0, 2, 5]] = w
    rule = gossip_aggregator(name, **SETTINGS)
    a, b = rule(own, rows, w), rule(own, padded, pw)
    np.testing.assert_allclose(np.asarray(b.params), np.asarray(a.params), rtol=0, atol=1e-6)
    assert float(b.disagreement) == pytest.approx(float(a.disagreement), abs=1e-6)
    assert np.isfinite(np.asarray(b.params)).all()


def test_gossip_step_by_hand():
    """(1 - sum w) own + sum w_j x_j; disagreement from own and the heard rows only."""
    own = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    rows = np.ones((3, 4), np.float32)
    out = gossip_step(own, rows, np.array([0.2, 0.0, 0.3], np.float32))
    np.testing.assert_allclose(np.asarray(out.params), [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    mean = (own + 2.0) / 3  # own and the two heard rows
    assert float(out.disagreement) == pytest.approx(float(np.linalg.norm(own - mean)), rel=1e-6)
    alone = gossip_step(own, np.zeros((3, 4), np.float32), np.zeros(3, np.float32))
    np.testing.assert_array_equal(np.asarray(alone.params), own)  # nobody heard: own kept
    assert float(alone.disagreement) == 0.0


def test_steps_are_traced_once_per_shape():
    """Calling a step again with new values of the same shapes does not retrace it."""
    rng = np.random.default_rng(4)
    d, k = 33, 3
    gossip_step(np.zeros(d, np.float32), np.zeros((k, d), np.float32), np.zeros(k, np.float32))
    before = gossip_step._cache_size()
    for _ in range(3):
        own = rng.standard_normal(d).astype(np.float32)
        rows = rng.standard_normal((k, d)).astype(np.float32)
        gossip_step(own, rows, rng.uniform(0, 0.3, k).astype(np.float32))
        disagreement(own, rows, np.ones(k, np.float32))
    assert gossip_step._cache_size() == before


def test_fedavg_step_weights_need_not_be_normalised():
    """sum w_j x_j / sum w_j with sample counts as weights; a zero weight drops its row."""
    x = np.array([[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]], np.float32)
    out = np.asarray(fedavg_step(x, np.array([10.0, 30.0, 0.0])))
    np.testing.assert_allclose(out, [2.5, 3.0], rtol=1e-6)
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0), "non-empty"),
        (np.zeros(3), np.ones(3), "non-empty"),
        (np.ones((2, 3)), np.ones(3), "length 2"),
        (np.ones((2, 3)), np.zeros(2), "weights sum"),
        (np.ones((2, 3)), np.array([1.0, -1.0]), "non-negative"),
        (np.ones((2, 3)), np.array([1.0, np.nan]), "finite"),
    ],
)
def test_fedavg_step_refuses_bad_input(updates, weights, match):
    """No update, mismatched or non-positive weights: a ValueError, not a silent NaN."""
    with pytest.raises(ValueError, match=match):
        fedavg_step(updates, weights)


def test_fedavg_step_runs_under_vmap():
    """The checked step still vmaps (value checks skipped on tracers): many servers at once."""
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    out = jax.vmap(fedavg_step)(x, np.ones((2, 3), np.float32))
    np.testing.assert_allclose(np.asarray(out), x.mean(axis=1), rtol=1e-6)


def test_stack_neighbourhood_refuses_strangers_and_wrong_sizes():
    """A model from a non-neighbour, or of another size, is a programming error."""
    with pytest.raises(ValueError, match="not neighbours"):
        stack_neighbourhood([1, 2], {3: np.zeros(4)}, {3: 0.5}, 4)
    with pytest.raises(ValueError, match="elements"):
        stack_neighbourhood([1, 2], {1: np.zeros(5)}, {1: 0.5}, 4)


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: gossip_aggregator("krum", **SETTINGS),
        lambda: gossip_aggregator("", **SETTINGS),
        lambda: server_aggregator("clipping", trim=1, f=1),
    ],
)
def test_unknown_aggregator_names_the_allowed_ones(build):
    """An unknown name raises ValueError naming every allowed rule of its kind."""
    with pytest.raises(ValueError, match="unknown") as info:
        build()
    kind = GOSSIP_AGGREGATORS if "gossip" in str(info.value) else SERVER_AGGREGATORS
    assert all(name in str(info.value) for name in kind)


@pytest.mark.parametrize("name", GOSSIP_AGGREGATORS)
def test_every_gossip_rule_has_the_documented_shapes(name):
    """own [d], neighbours [k, d], weights [k] -> Mixed(float32 [d], scalar)."""
    rng = np.random.default_rng(5)
    own, rows = rng.standard_normal(7).astype(np.float32), rng.standard_normal((4, 7))
    out = gossip_aggregator(name, **SETTINGS)(own, rows.astype(np.float32), np.full(4, 0.2))
    params = np.asarray(out.params)
    assert params.shape == (7,) and params.dtype == np.float32
    assert np.shape(out.disagreement) == () and np.isfinite(float(out.disagreement))
    assert float(out.disagreement) == pytest.approx(
        float(disagreement(own, rows.astype(np.float32), np.full(4, 0.2, np.float32)))
    )


@pytest.mark.parametrize("name", SERVER_AGGREGATORS)
def test_every_server_rule_has_the_documented_shapes(name):
    """updates [n, d], weights [n] -> float32 [d]."""
    rng = np.random.default_rng(6)
    out = server_aggregator(name, trim=1, f=1)(
        rng.standard_normal((5, 7)).astype(np.float32), np.arange(1.0, 6.0)
    )
    assert np.asarray(out).shape == (7,) and np.asarray(out).dtype == np.float32


# --- transforms -----------------------------------------------------------------------------

MODEL = np.linspace(-2.0, 3.0, 20_000, dtype=np.float32)


def _send(t: ModelTransform, model: np.ndarray = MODEL, seed: int = 0, peer: int = 1):
    """One application of `t` from its initial state: (what is sent, the next state)."""
    out, state = t.apply(model, t.init(seed, peer))
    return np.asarray(out), state


def test_attack_transforms_do_what_the_attacks_did():
    """sign_flip sends -x, scale f * x, gaussian x + N(0, sigma^2), nan all NaN (float32)."""
    np.testing.assert_array_equal(_send(attack_transform("sign_flip"))[0], -MODEL)
    scaled = _send(attack_transform("scale", factor=-4.0))[0]
    np.testing.assert_array_equal(scaled, np.float32(-4.0) * MODEL)
    noisy = _send(attack_transform("gaussian", sigma=0.5))[0]
    noise = noisy.astype(np.float64) - MODEL
    assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(0.5, rel=0.03)
    assert np.isnan(_send(attack_transform("nan"))[0]).all()
    for name in ("sign_flip", "scale", "gaussian", "nan"):
        out = _send(attack_transform(name))[0]
        assert out.dtype == np.float32 and out.shape == MODEL.shape


@pytest.mark.parametrize("name", ["label_flip", "dissensus"])
def test_training_attacks_send_the_model_as_it_is(name):
    """label_flip and dissensus are not outgoing transforms: the very model goes out."""
    t = attack_transform(name)
    out, _ = t.apply(MODEL, t.init(0, 0))
    assert out is MODEL


def test_unknown_attack_names_the_allowed_ones():
    """An attack outside the schema's list raises ValueError naming them all."""
    with pytest.raises(ValueError, match=r"sign_flip.*dissensus"):
        attack_transform("flip")


def test_chain_applies_in_order():
    """chain(a, b) is b after a: noise then scale(0) sends zeros, the other way only noise."""
    np.testing.assert_array_equal(_send(chain(gaussian(1.0), scale(0.0)))[0], 0.0)
    noise_only = _send(chain(scale(0.0), gaussian(1.0)))[0]
    np.testing.assert_array_equal(noise_only, _send(gaussian(1.0), np.zeros_like(MODEL))[0])
    np.testing.assert_array_equal(_send(chain(scale(2.0), sign_flip(), scale(3.0)))[0], -6 * MODEL)
    np.testing.assert_array_equal(_send(chain())[0], MODEL)
    assert _send(chain(identity(), nan()))[1] == ((), ())


def test_gaussian_state_advances_and_seeds_reproduce():
    """Two calls give different noise; the same (seed, peer) gives the same; another peer
    or seed another; a chained gaussian draws what it draws alone."""
    t = gaussian(1.0)
    state = t.init(7, 2)
    first, state = t.apply(MODEL, state)
    second, _ = t.apply(MODEL, state)
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    np.testing.assert_array_equal(np.asarray(first), _send(t, seed=7, peer=2)[0])
    assert not np.array_equal(np.asarray(first), _send(t, seed=7, peer=3)[0])
    assert not np.array_equal(np.asarray(first), _send(t, seed=8, peer=2)[0])
    chained = _send(chain(identity(), t, identity()), seed=7, peer=2)[0]
    np.testing.assert_array_equal(chained, np.asarray(first))


def test_transforms_vmap_over_peers():
    """One transform's apply vmaps over a leading peer axis, each peer with its own key."""
    t = gaussian(1.0)
    keys = jax.vmap(lambda p: t.init(0, p))(np.arange(3))
    models = np.tile(MODEL[:100], (3, 1))
    out, _ = jax.vmap(t.apply)(models, keys)
    np.testing.assert_array_equal(np.asarray(out[1]), _send(t, MODEL[:100], seed=0, peer=1)[0])
