"""Mixing maths: Metropolis-Hastings weights, spectral figures, `p2pfl topology`, and one
peer's mix of what arrived (the core step over its stacked neighbourhood)."""

from __future__ import annotations

import itertools
import json
import math

import networkx as nx
import numpy as np
import pytest

from p2pfl.app.cli import main
from p2pfl.config.schema import Topology
from p2pfl.core.graphs import (
    build_graph,
    local_weights,
    metropolis_weight,
    mixing_matrix,
    report,
    slem,
)
from p2pfl.core.mixing import fedavg_step, gossip_step, stack_neighbourhood
from p2pfl.protocol import wire
from p2pfl.protocol.wire import Chunked

# One topology of every kind, each with enough peers to be non-trivial.
KINDS = {
    "ring": Topology(kind="ring", peers=9),
    "full": Topology(kind="full", peers=6),
    "star": Topology(kind="star", peers=7),
    "line": Topology(kind="line", peers=5),
    "grid": Topology(kind="grid", peers=12),
    "torus": Topology(kind="torus", peers=16),
    "regular": Topology(kind="regular", peers=10, degree=3),
    "erdos_renyi": Topology(kind="erdos_renyi", peers=12, p=0.5),
    "small_world": Topology(kind="small_world", peers=14, k=4, p=0.3),
    "barabasi_albert": Topology(kind="barabasi_albert", peers=15, m=2),
    "edges": Topology(kind="edges", peers=5, edges=[(0, 1), (1, 2), (2, 3), (3, 4), (4, 1)]),
}


def _graph(kind: str) -> nx.Graph:
    return build_graph(KINDS[kind], seed=3)


@pytest.fixture(params=sorted(KINDS))
def graph(request) -> nx.Graph:
    return _graph(request.param)


def test_every_kind_builds_connected_graph_on_all_peers(graph):
    """Each kind yields a connected graph with nodes exactly 0..peers-1."""
    n = graph.number_of_nodes()
    assert sorted(graph.nodes) == list(range(n))
    assert nx.is_connected(graph)
    assert nx.number_of_selfloops(graph) == 0


@pytest.mark.parametrize("mixing", ["metropolis", "uniform"])
def test_mixing_matrix_rows_sum_to_one_and_non_negative(graph, mixing):
    """W is row-stochastic and non-negative, with zeros off the graph's edges."""
    w = mixing_matrix(graph, mixing)
    n = graph.number_of_nodes()
    assert w.shape == (n, n)
    assert (w >= -1e-15).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    adjacency = nx.to_numpy_array(graph, nodelist=range(n)) > 0
    off_graph = ~adjacency & ~np.eye(n, dtype=bool)
    assert (w[off_graph] == 0).all()
    assert (w[adjacency] > 0).all()


def test_metropolis_is_symmetric_and_doubly_stochastic(graph):
    """Metropolis-Hastings W is symmetric, so columns also sum to one."""
    w = mixing_matrix(graph, "metropolis")
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_metropolis_preserves_the_mean(graph):
    """One mixing step W @ x keeps the network mean of every coordinate."""
    rng = np.random.default_rng(0)
    w = mixing_matrix(graph, "metropolis")
    x = rng.normal(size=(graph.number_of_nodes(), 7))
    np.testing.assert_allclose((w @ x).mean(axis=0), x.mean(axis=0), atol=1e-12)
    x_r = x
    for _ in range(25):
        x_r = w @ x_r
    np.testing.assert_allclose(x_r.mean(axis=0), x.mean(axis=0), atol=1e-10)


def test_metropolis_slem_below_one(graph):
    """A connected graph's Metropolis matrix has λ < 1, so consensus is reached."""
    lam = slem(mixing_matrix(graph, "metropolis"))
    assert 0.0 <= lam < 1.0


def test_uniform_weights_on_irregular_graph_are_not_symmetric():
    """Uniform 1/(deg+1) weights differ across an edge of unequal degrees (why MH is default)."""
    w = mixing_matrix(_graph("star"), "uniform")
    assert not np.allclose(w, w.T)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 16, 33, 100])
def test_ring_slem_matches_closed_form(n):
    """A ring's λ equals 1/3 + (2/3)·cos(2π/n)."""
    w = mixing_matrix(build_graph(Topology(kind="ring", peers=n)))
    assert slem(w) == pytest.approx(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)), abs=1e-9)


def test_full_graph_mixes_in_one_round():
    """On a full graph MH weights are 1/n everywhere: one round reaches the mean (λ = 0)."""
    g = build_graph(Topology(kind="full", peers=6))
    w = mixing_matrix(g)
    np.testing.assert_allclose(w, np.full((6, 6), 1 / 6), atol=1e-12)
    rep = report(g)
    assert rep.slem == pytest.approx(0.0, abs=1e-9)
    assert rep.rounds_to_consensus == 0


@pytest.mark.parametrize("rounds", [1, 3, 10, 40])
def test_disagreement_shrinks_by_lambda_per_round(graph, rounds):
    """‖W^R x - x̄‖ ≤ λ^R ‖x - x̄‖ for the symmetric Metropolis matrix."""
    rng = np.random.default_rng(rounds)
    w = mixing_matrix(graph, "metropolis")
    lam = slem(w)
    x = rng.normal(size=(graph.number_of_nodes(), 5))
    mean = x.mean(axis=0)
    x_r = np.linalg.matrix_power(w, rounds) @ x
    before = np.linalg.norm(x - mean)
    after = np.linalg.norm(x_r - mean)
    assert after <= lam**rounds * before + 1e-9


def test_ring_disagreement_bound_is_tight():
    """On a ring, the slowest eigenvector decays at exactly λ per round (the bound is sharp)."""
    n = 12
    w = mixing_matrix(build_graph(Topology(kind="ring", peers=n)))
    lam = slem(w)
    x = np.cos(2 * np.pi * np.arange(n) / n)  # eigenvector of the slowest mode, mean 0
    x_r = np.linalg.matrix_power(w, 5) @ x
    assert np.linalg.norm(x_r) == pytest.approx(lam**5 * np.linalg.norm(x), rel=1e-9)


def test_metropolis_weight_uses_only_the_two_degrees():
    """w_ij = 1/(1 + max(deg_i, deg_j)), the same from both ends."""
    assert metropolis_weight(2, 5) == metropolis_weight(5, 2) == pytest.approx(1 / 6)
    assert metropolis_weight(1, 1) == pytest.approx(0.5)


def test_local_weights_rebuild_the_global_matrix(graph):
    """Each peer's local weights (own degree, neighbours' degrees) equal its row of W."""
    w = mixing_matrix(graph)
    for i in graph.nodes:
        local = local_weights("metropolis", graph.degree[i], {j: graph.degree[j] for j in graph[i]})
        for j, wij in local.items():
            assert wij == pytest.approx(w[i, j])
        assert 1 - sum(local.values()) == pytest.approx(w[i, i])


def test_report_figures_for_a_line():
    """report() gives edges, diameter, degrees, λ, gap and rounds to consensus."""
    g = build_graph(Topology(kind="line", peers=5))
    rep = report(g, tolerance=1e-3)
    assert rep.peers == 5
    assert rep.edges == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert rep.diameter == 4
    assert (rep.degree_min, rep.degree_max) == (1, 2)
    assert rep.spectral_gap == pytest.approx(1 - rep.slem)
    assert rep.rounds_to_consensus is not None
    assert rep.slem**rep.rounds_to_consensus < 1e-3 <= rep.slem ** (rep.rounds_to_consensus - 1)


def test_grid_and_torus_shapes():
    """A 3x4 grid has 17 edges and a 4x4 torus is 4-regular with 32 edges."""
    grid = build_graph(Topology(kind="grid", peers=12, rows=3))
    assert grid.number_of_edges() == 3 * 3 + 4 * 2
    torus = build_graph(Topology(kind="torus", peers=16))
    assert {d for _, d in torus.degree()} == {4}
    assert torus.number_of_edges() == 32


def test_random_kinds_are_deterministic_in_seed():
    """Random graph kinds give the same graph for the same seed."""
    for kind in ("regular", "erdos_renyi", "small_world", "barabasi_albert"):
        a = build_graph(KINDS[kind], seed=11)
        b = build_graph(KINDS[kind], seed=11)
        assert sorted(a.edges) == sorted(b.edges), kind


def _write(tmp_path, text: str):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_topology_json_output(tmp_path, capsys):
    """`p2pfl topology --json` prints one JSON object with the spectral figures."""
    path = _write(tmp_path, '[topology]\nkind = "ring"\npeers = 10\n')
    assert main(["topology", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peers"] == 10
    assert len(data["edges"]) == 10
    assert data["diameter"] == 5
    assert data["slem"] == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / 10))
    assert data["spectral_gap"] == pytest.approx(1 - data["slem"])
    assert isinstance(data["rounds_to_consensus"], int)
    assert data["rounds_to_consensus"] > 0


def test_topology_json_for_explicit_edges(tmp_path, capsys):
    """An explicit edge list comes back in the JSON edges, normalised and sorted."""
    path = _write(tmp_path, '[topology]\nkind = "edges"\npeers = 3\nedges = [[2, 1], [0, 1]]\n')
    assert main(["topology", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["edges"] == [[0, 1], [1, 2]]
    assert data["diameter"] == 2


def test_topology_table_output(tmp_path, capsys):
    """The human table names λ, the spectral gap and lists the edges of a small graph."""
    path = _write(tmp_path, '[topology]\nkind = "ring"\npeers = 4\n')
    assert main(["topology", str(path)]) == 0
    out = capsys.readouterr().out
    assert "spectral gap" in out
    assert "0-1" in out and "0-3" in out


def test_topology_png(tmp_path, capsys):
    """`--png FILE` writes a PNG drawing of the graph."""
    path = _write(tmp_path, '[topology]\nkind = "torus"\npeers = 9\n')
    png = tmp_path / "g.png"
    assert main(["topology", str(path), "--json", "--png", str(png)]) == 0
    capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


# ---- one peer's mixing of what arrived: the core step over its neighbourhood ----


def mix(own, received, weights):
    """A peer's mix as the runtime computes it: every neighbour `weights` names, stacked
    in id order (zero rows for those not heard), through the core gossip step."""
    stack, w = stack_neighbourhood(sorted(weights), received, weights, np.size(own))
    out = gossip_step(np.ravel(own), stack, w)
    return np.asarray(out.params).reshape(np.shape(own)), float(out.disagreement)


def weighted_mean(models, weights):
    """The server's FedAvg over the models in id order."""
    ids = sorted(models)
    stack = np.stack([np.ravel(np.asarray(models[j])) for j in ids]) if ids else np.zeros((0, 1))
    return np.asarray(fedavg_step(stack, np.array([weights[j] for j in ids])))


def test_mix_with_all_neighbours_is_the_row_of_w():
    """mix() computes w_ii x_i + Σ w_ij x_j with w_ii = 1 - Σ w_ij."""
    own = np.array([1.0, 2.0], np.float32)
    received = {1: np.array([3.0, 0.0], np.float32), 2: np.array([-1.0, 4.0], np.float32)}
    weights = {1: 0.25, 2: 0.5}
    params, _ = mix(own, received, weights)
    expected = 0.25 * own + 0.25 * received[1] + 0.5 * received[2]
    np.testing.assert_allclose(params, expected, rtol=1e-6)
    assert params.dtype == np.float32


def test_mix_missing_neighbour_weight_stays_with_self():
    """A neighbour not heard from leaves its weight on the peer's own model."""
    own = np.array([1.0, 1.0], np.float32)
    received = {1: np.array([5.0, -3.0], np.float32)}
    weights = {1: 0.3, 2: 0.3}
    params, _ = mix(own, received, weights)
    np.testing.assert_allclose(params, 0.7 * own + 0.3 * received[1], rtol=1e-6)


def test_mix_with_nothing_received_keeps_own_model():
    """With no neighbour heard, the model is unchanged and disagreement is zero."""
    own = np.arange(4, dtype=np.float32)
    params, disagreement = mix(own, {}, {1: 0.5})
    np.testing.assert_array_equal(params, own)
    assert disagreement == 0.0


def test_mix_disagreement_is_distance_to_local_mean():
    """disagreement = ‖own - mean(own and received)‖."""
    own = np.array([0.0, 0.0], np.float32)
    received = {1: np.array([2.0, 0.0], np.float32), 2: np.array([4.0, 3.0], np.float32)}
    _, disagreement = mix(own, received, {1: 0.2, 2: 0.2})
    assert disagreement == pytest.approx(float(np.linalg.norm([2.0, 1.0])))


def _in_chunks(x: np.ndarray, *cuts: int) -> Chunked:
    """x as decode would hand it over if it had arrived cut at `cuts`."""
    flat = x.ravel()
    bounds = [0, *cuts, flat.size]
    return Chunked(tuple(flat[a:b] for a, b in itertools.pairwise(bounds)), x.shape)


def test_mix_of_chunked_models_equals_mix_of_joined_ones():
    """Models received in several frames mix exactly as the same models joined would."""
    rng = np.random.default_rng(7)
    own = rng.normal(size=11).astype(np.float32)
    received = {j: rng.normal(size=11).astype(np.float32) for j in (1, 2, 3)}
    weights = {1: 0.2, 2: 0.25, 3: 0.1, 4: 0.2}
    chunked = {1: _in_chunks(received[1], 4), 2: _in_chunks(received[2], 1, 5, 10), 3: received[3]}
    a, b = mix(own, chunked, weights), mix(own, received, weights)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    expected = 0.45 * own + 0.2 * received[1] + 0.25 * received[2] + 0.1 * received[3]  # 4 unheard
    np.testing.assert_allclose(a[0], expected, rtol=1e-6)
    mean = (own.astype(np.float64) + sum(received.values())) / 4
    assert a[1] == pytest.approx(float(np.linalg.norm(own - mean)), rel=1e-6)


def test_mix_of_a_decoded_multi_frame_model():
    """A model decoded from several wire frames (never joined) mixes like the array it was."""
    n = 2 * wire.MAX_FRAME_BYTES // 4 + 7
    rng = np.random.default_rng(8)
    own, theirs = rng.normal(size=(2, n)).astype(np.float32)
    frames = wire.encode("model", 1, 1, "s", {"degree": 2}, {"params": theirs})
    got = wire.decode(frames, wire.Expect("s", 1, {"params": (n,)})).arrays["params"]
    assert len(got.chunks) == 3
    params, _ = mix(own, {1: got}, {1: 0.5})
    np.testing.assert_array_equal(params, mix(own, {1: theirs}, {1: 0.5})[0])
    np.testing.assert_allclose(params, (own + theirs) / 2, rtol=1e-6, atol=1e-7)


def test_mix_refuses_a_model_of_another_size():
    """A received model whose chunks do not add up to our size is a programming error."""
    own = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="elements"):
        mix(own, {1: _in_chunks(np.zeros(5, np.float32), 2)}, {1: 0.5})


def test_weighted_mean_is_fedavg_and_reads_chunked_models():
    """weighted_mean = Σ n_j x_j / Σ n_j, for chunked and plain models alike."""
    rng = np.random.default_rng(9)
    models = {j: rng.normal(size=13).astype(np.float32) for j in (0, 3, 5)}
    samples = {0: 10.0, 3: 30.0, 5: 60.0}
    expected = np.average(np.stack(list(models.values())), axis=0, weights=[10, 30, 60])
    chunked = {0: _in_chunks(models[0], 6), 3: _in_chunks(models[3], 1, 12), 5: models[5]}
    out = weighted_mean(chunked, samples)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(out, weighted_mean(models, samples))
    assert out.dtype == np.float32
    uniform = weighted_mean(models, dict.fromkeys(models, 1.0))
    np.testing.assert_allclose(uniform, np.mean(list(models.values()), axis=0), rtol=1e-6)


def test_weighted_mean_on_a_full_graph_equals_every_peers_mix():
    """Full graph: each peer's Metropolis mix is the uniform FedAvg of all models, to float32
    rounding (the two steps sum in float32, in different orders: 1 ulp here)."""
    rng = np.random.default_rng(10)
    n = 8
    x = rng.normal(size=(n, 50)).astype(np.float32)
    g = nx.complete_graph(n)
    fedavg = weighted_mean(dict(enumerate(x)), dict.fromkeys(range(n), 1.0))
    for i in range(n):
        weights = local_weights("metropolis", n - 1, {j: n - 1 for j in g[i]})
        mixed, _ = mix(x[i], {j: x[j] for j in g[i]}, weights)
        np.testing.assert_allclose(mixed, fedavg, rtol=0, atol=1e-6)


def test_weighted_mean_refuses_nothing_and_zero_weights():
    """No model, or weights summing to zero, is an error rather than a silent NaN."""
    with pytest.raises(ValueError, match="non-empty"):
        weighted_mean({}, {})
    with pytest.raises(ValueError, match="weights sum"):
        weighted_mean({1: np.ones(2, np.float32)}, {1: 0.0})


def _network_round(g: nx.Graph, x: np.ndarray, dropped: set[tuple[int, int]]) -> np.ndarray:
    """Every peer mixes what it heard, using local weights; `dropped` edges (both ways) are lost."""
    out = np.empty_like(x)
    for i in g.nodes:
        degs = {j: g.degree[j] for j in g[i]}
        weights = local_weights("metropolis", g.degree[i], degs)
        heard = {j: x[j] for j in g[i] if (min(i, j), max(i, j)) not in dropped}
        out[i] = mix(x[i], heard, weights)[0]
    return out


def test_mix_over_a_network_matches_w_and_preserves_mean(graph):
    """Peers mixing locally reproduce W @ x and keep the network mean."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(graph.number_of_nodes(), 6)).astype(np.float32)
    y = _network_round(graph, x, set())
    np.testing.assert_allclose(y, mixing_matrix(graph) @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.mean(axis=0), x.mean(axis=0), atol=1e-5)


def test_mix_mean_preserved_when_an_edge_is_lost_both_ways():
    """If both ends of an edge miss each other, renormalised weights still keep the mean."""
    g = _graph("torus")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(g.number_of_nodes(), 3)).astype(np.float32)
    dropped = {(min(a, b), max(a, b)) for a, b in list(g.edges)[:5]}
    y = _network_round(g, x, dropped)
    np.testing.assert_allclose(y.mean(axis=0), x.mean(axis=0), atol=1e-5)
    assert not np.allclose(y, _network_round(g, x, set()))
