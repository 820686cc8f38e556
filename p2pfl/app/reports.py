"""What the inspecting commands print: `p2pfl privacy` (the ε a scenario's peers will
have, before anything runs) and `p2pfl topology` (the graph and its mixing figures)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from p2pfl.config.loader import graph
from p2pfl.config.schema import Scenario


def privacy(s: Scenario, console: Console) -> None:
    """The DP mechanism of `s`, its noise multiplier and a peer's ε every 10 rounds."""
    from rich.table import Table

    from p2pfl.config.privacy import dp_plan, forecast

    dp = dp_plan(s)
    if s.privacy.secure_aggregation:
        console.print(
            f"{s.name}: secure aggregation: the server unmasks only the sum of each round's "
            f"updates (each coordinate clipped to ±{s.privacy.secagg_range:g}); it adds no "
            "noise and spends no ε",
            markup=False,
        )
    if dp is None:
        console.print(
            f"{s.name}: no differential privacy ([privacy] mechanism = 'none')", markup=False
        )
        return
    rounds = s.training.rounds
    marks = sorted({*range(10, rounds + 1, 10), rounds})
    at = forecast(s, marks)
    how = "calibrated for target_epsilon" if s.privacy.target_epsilon is not None else "set"
    kind = {
        ("dp_sgd", "peer"): "DP-SGD (sample-level, each peer's records)",
        ("update", "peer"): "update (participant-level, local DP)",
        ("update", "server"): f"update (participant-level, central DP, Poisson q = {dp.q:g})",
    }[(dp.mechanism, dp.where)]
    console.print(
        f"{s.name} ({s.mode}): {kind}, clip {dp.clip:g}, noise multiplier {dp.sigma:.4g} "
        f"({how}), δ = {dp.delta:g}, {dp.accountant.upper()} accountant",
        markup=False,
    )
    table = Table("after round", "ε (a peer that trains every round)")
    for r in marks:
        lo, hi = at[r]
        table.add_row(str(r), f"{hi:.4g}" if lo == hi else f"{lo:.4g} to {hi:.4g} (by shard size)")
    console.print(table)
    if s.mode == "centralized" and dp.where == "peer":
        console.print(
            f"centralized: a peer spends ε only in the rounds it is sampled in (fraction "
            f"{s.centralized.fraction:g}); the column is the most it can spend"
        )


def topology(s: Scenario, as_json: bool = False, png: str | None = None) -> None:
    """`s`'s graph figures (a table, or one JSON line), and its drawing to `png`."""
    from p2pfl.core.graphs import report

    g = graph(s)
    rep = report(g, s.gossip.mixing)
    if as_json:
        print(json.dumps(asdict(rep)))
    else:
        from rich.table import Table

        table = Table(
            "figure", "value", title=f"{s.name}: {s.topology.kind}, {s.gossip.mixing} mixing"
        )
        rows = {
            "peers": rep.peers,
            "edges": len(rep.edges),
            "degree min/max": f"{rep.degree_min}/{rep.degree_max}",
            "diameter": rep.diameter,
            "λ (second-largest eigenvalue modulus)": f"{rep.slem:.4f}",
            "spectral gap 1-λ": f"{rep.spectral_gap:.4f}",
            f"rounds to consensus (λ^R < {rep.consensus_tolerance:g})": rep.rounds_to_consensus,
        }
        for k, v in rows.items():
            table.add_row(k, str(v))
        Console().print(table)
        if len(rep.edges) <= 64:
            print("edges:", " ".join(f"{a}-{b}" for a, b in rep.edges))
    if png:
        from p2pfl.app.plots import topology_plot

        topology_plot(g, Path(png), f"{s.name}: {s.topology.kind} (λ = {rep.slem:.3f})")
