"""PNG plots of a run's histories (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def accuracy_plot(histories: Mapping[int, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Holdout accuracy per round: one thin line per peer and their mean in bold."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for peer, rows in sorted(histories.items()):
        pts = [
            (r["round"], r["holdout_accuracy"]) for r in rows if r["holdout_accuracy"] is not None
        ]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, lw=0.8, alpha=0.5, label=f"peer {peer}" if len(histories) <= 10 else None)
            series[peer] = dict(pts)
    if series:
        rounds = sorted({r for s in series.values() for r in s})
        mean = [np.mean([s[r] for s in series.values() if r in s]) for r in rounds]
        ax.plot(rounds, mean, lw=2.5, color="black", label="mean")
    ax.set(xlabel="round", ylabel="holdout accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def topology_plot(graph: Any, path: Path, title: str) -> None:
    """Draw the peers' graph (spring layout, fixed seed) with node ids."""
    import networkx as nx

    fig, ax = plt.subplots(figsize=(6, 6))
    pos = nx.spring_layout(graph, seed=0)
    nx.draw_networkx(graph, pos, ax=ax, node_color="#8ecae6", node_size=300, font_size=8)
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
