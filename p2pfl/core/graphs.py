"""Scenario topology -> networkx graph -> neighbours, mixing weights and spectral figures.

Peers need only local knowledge at run time: `metropolis_weight` takes the two
degrees, and each neighbour's degree travels in its messages. The global matrix
(`mixing_matrix`) exists for analysis, tests and `p2pfl topology`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import networkx as nx
import numpy as np

Mixing = Literal["metropolis", "uniform"]


class GraphError(ValueError):
    """A graph that cannot be built (bad parameters, disconnected); the message names the
    field as the scenario file spells it."""


class GraphSpec(Protocol):
    """What `build_graph` reads: the scenario's `[topology]` section has these fields."""

    @property
    def kind(self) -> str: ...
    @property
    def peers(self) -> int: ...
    @property
    def degree(self) -> int: ...
    @property
    def p(self) -> float: ...
    @property
    def k(self) -> int: ...
    @property
    def m(self) -> int: ...
    @property
    def rows(self) -> int | None: ...
    @property
    def edges(self) -> Sequence[tuple[int, int]] | None: ...
    @property
    def file(self) -> str | None: ...


def _error(message: str) -> GraphError:
    return GraphError(message)


def _grid_shape(n: int, rows: int | None) -> tuple[int, int]:
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if n % rows:
        raise _error(f"topology.rows = {rows}: must divide topology.peers = {n}")
    return rows, n // rows


def _from_edges(n: int, edges: list[tuple[int, int]], field: str) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for a, b in edges:
        if not (0 <= a < n and 0 <= b < n) or a == b:
            raise _error(f"{field}: edge [{a}, {b}] is not a pair of distinct peers in 0..{n - 1}")
        g.add_edge(a, b)
    return g


def build_graph(t: GraphSpec, seed: int = 0, base_dir: str = ".") -> nx.Graph:
    """The peers' graph with nodes 0..peers-1; refuses bad parameters and disconnection."""
    n, kind = t.peers, t.kind
    if kind == "ring":
        g = nx.cycle_graph(n)
    elif kind == "full":
        g = nx.complete_graph(n)
    elif kind == "star":
        g = nx.star_graph(n - 1)
    elif kind == "line":
        g = nx.path_graph(n)
    elif kind in ("grid", "torus"):
        rows, cols = _grid_shape(n, t.rows)
        g = nx.grid_2d_graph(rows, cols, periodic=kind == "torus")
        g = nx.convert_node_labels_to_integers(g, ordering="sorted")
    elif kind == "regular":
        if t.degree >= n or (n * t.degree) % 2:
            raise _error(
                f"topology.degree = {t.degree}: a regular graph on {n} peers needs "
                "degree < peers and peers * degree even"
            )
        g = nx.random_regular_graph(t.degree, n, seed=seed)
    elif kind == "erdos_renyi":
        g = nx.erdos_renyi_graph(n, t.p, seed=seed)
    elif kind == "small_world":
        if t.k >= n:
            raise _error(f"topology.k = {t.k}: must be < topology.peers = {n}")
        g = nx.connected_watts_strogatz_graph(n, t.k, t.p, tries=100, seed=seed)
    elif kind == "barabasi_albert":
        if t.m >= n:
            raise _error(f"topology.m = {t.m}: must be < topology.peers = {n}")
        g = nx.barabasi_albert_graph(n, t.m, seed=seed)
    else:
        g = _edges_graph(t, base_dir)
    if not nx.is_connected(g):
        parts = [sorted(c) for c in nx.connected_components(g)]
        field = f"topology.kind = {kind!r}"
        if kind == "edges":
            field = "topology.edges" if t.edges is not None else f"topology.file = {t.file!r}"
        raise _error(
            f"{field}: the graph is disconnected ({len(parts)} parts, "
            f"e.g. {parts[:3]}); peers in different parts could never agree"
        )
    return g


def _edges_graph(t: GraphSpec, base_dir: str) -> nx.Graph:
    if (t.edges is None) == (t.file is None):
        raise _error("topology.kind = 'edges': give exactly one of topology.edges or topology.file")
    if t.edges is not None:
        return _from_edges(t.peers, list(t.edges), "topology.edges")
    path = Path(t.file or "")
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise _error(f"topology.file = {t.file!r}: file does not exist")
    try:
        parsed = nx.read_edgelist(path, nodetype=int, data=False)
    except (TypeError, ValueError) as exc:
        raise _error(f"topology.file = {t.file!r}: not an integer edge list ({exc})") from None
    return _from_edges(t.peers, list(parsed.edges()), "topology.file")


def metropolis_weight(deg_i: int, deg_j: int) -> float:
    """Metropolis–Hastings weight of edge (i, j): symmetric, needs only the two degrees."""
    return 1.0 / (1.0 + max(deg_i, deg_j))


def local_weights(
    mixing: Mixing, own_degree: int, neighbour_degrees: dict[int, int]
) -> dict[int, float]:
    """This peer's weights for each neighbour (self weight is one minus their sum)."""
    if mixing == "uniform":
        return {j: 1.0 / (own_degree + 1) for j in neighbour_degrees}
    return {j: metropolis_weight(own_degree, d) for j, d in neighbour_degrees.items()}


def mixing_matrix(g: nx.Graph, mixing: Mixing = "metropolis") -> np.ndarray:
    """The n x n matrix W built from the same local rule every peer applies."""
    n = g.number_of_nodes()
    w = np.zeros((n, n))
    for i in range(n):
        degs = {j: g.degree[j] for j in g.neighbors(i)}
        for j, wij in local_weights(mixing, g.degree[i], degs).items():
            w[i, j] = wij
        w[i, i] = 1.0 - w[i].sum()
    return w


def slem(w: np.ndarray) -> float:
    """Second-largest eigenvalue modulus λ: disagreement shrinks by about λ per round."""
    moduli = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    return float(moduli[1]) if len(moduli) > 1 else 0.0


@dataclass(frozen=True)
class TopologyReport:
    """Figures `p2pfl topology` prints."""

    peers: int
    edges: list[tuple[int, int]]
    diameter: int
    degree_min: int
    degree_max: int
    slem: float
    spectral_gap: float
    rounds_to_consensus: int | None
    consensus_tolerance: float


def report(g: nx.Graph, mixing: Mixing = "metropolis", tolerance: float = 1e-3) -> TopologyReport:
    """Spectral summary; predicted rounds = rounds for λ^R to fall below `tolerance`."""
    lam = slem(mixing_matrix(g, mixing))
    rounds = (
        0 if lam < 1e-12 else (math.ceil(math.log(tolerance) / math.log(lam)) if lam < 1 else None)
    )
    degrees = [d for _, d in g.degree()]
    return TopologyReport(
        peers=g.number_of_nodes(),
        edges=sorted((min(a, b), max(a, b)) for a, b in g.edges()),
        diameter=nx.diameter(g),
        degree_min=min(degrees),
        degree_max=max(degrees),
        slem=lam,
        spectral_gap=1.0 - lam,
        rounds_to_consensus=rounds,
        consensus_tolerance=tolerance,
    )
