"""PNG plots of a run's histories (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def accuracy_plot(
    histories: Mapping[int, list[dict[str, Any]]],
    path: Path,
    title: str,
    server: list[dict[str, Any]] | None = None,
) -> None:
    """Holdout accuracy per round: one thin line per peer, their mean in bold, and (in
    centralized mode) the server's global model."""
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
    pts = [(r["round"], r["holdout_accuracy"]) for r in server or [] if r["holdout_accuracy"]]
    if pts:
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, lw=1.5, ls="--", color="tab:red", label="global model (server)")
    ax.set(xlabel="round", ylabel="holdout accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_plot(histories: Mapping[int, list[dict[str, Any]]], path: Path, title: str) -> None:
    """The privacy-utility curve: the peers' mean holdout accuracy against their mean ε,
    one point per round (rounds without an accuracy left out)."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for rows in histories.values():
        for row in rows:
            if row.get("epsilon") is not None and row.get("holdout_accuracy") is not None:
                by_round.setdefault(row["round"], []).append(
                    (row["epsilon"], row["holdout_accuracy"])
                )
    rounds = sorted(by_round)
    eps = [float(np.mean([e for e, _ in by_round[r]])) for r in rounds]
    acc = [float(np.mean([a for _, a in by_round[r]])) for r in rounds]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(eps, acc, marker="o", ms=3, lw=1.5)
    for r, x, y in zip(rounds, eps, acc, strict=True):
        if r and r % max(1, len(rounds) // 8) == 0:
            ax.annotate(f"r{r}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, -9))
    ax.set(xlabel="ε (mean over peers)", ylabel="mean holdout accuracy", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
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


def compare_plot(curves: Mapping[str, Mapping[str, list]], path: Path, title: str) -> None:
    """Holdout accuracy of each mode against round, cumulative bytes sent (log) and seconds.

    `curves` maps a mode name to parallel lists `round`, `accuracy`, `bytes`, `seconds`;
    points whose accuracy or x value is missing (or not positive on the log axis) are skipped.
    Each mode keeps one colour in all three panels.
    """
    from matplotlib.ticker import MaxNLocator

    panels = [
        ("round", "round", False),
        ("bytes", "cumulative bytes sent", True),
        ("seconds", "seconds since launch", False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, (mode, curve) in enumerate(curves.items()):
            pts = [
                (x, y)
                for x, y in zip(curve[key], curve["accuracy"], strict=True)
                if x is not None and y is not None and (x > 0 or not log)
            ]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, lw=2, marker="o", ms=2.5, color=f"C{i}", label=mode)
        if log:
            ax.set_xscale("log")
        if key == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel=label, ylim=(0, 1))
        ax.grid(alpha=0.3)
        if ax.lines:  # a panel with no data gets no (empty) legend
            ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("holdout accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
