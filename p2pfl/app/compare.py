"""Compare a centralized (FedAvg server) run with a gossip run of the same scenario.

Turns two finished run folders into one report: per-round curves (accuracy against
round, cumulative bytes and seconds since launch), final accuracy, rounds to a target
accuracy, traffic and the load on the busiest node; then a rich table, `compare.json`,
`compare.md` and a three-panel `compare.png`. Cheap to import: rich and matplotlib load
only in the functions that draw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.record import history

if TYPE_CHECKING:
    from rich.table import Table

MODES = ("centralized", "gossip")
CURVE_KEYS = ("round", "accuracy", "bytes", "seconds")
Curve = dict[str, list[Any]]  # one parallel list per CURVE_KEYS entry, ordered by round
TARGET_FRACTION = 0.95  # default target: this share of the weaker mode's final mean accuracy
FALLBACK_TARGET = 0.5  # default target when a mode has no final accuracy
MISSING = "-"  # table cell for a value the runs do not have


def _summary(run: Path, mode: str) -> dict[str, Any]:
    """The run's `summary.json`, checked to be a dict of the expected mode."""
    path = run / "summary.json"
    if not path.is_file():
        raise ValueError(f"{run}: no summary.json ({path}); is this a finished {mode} run?")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if summary.get("mode", mode) != mode:
        raise ValueError(f"{path}: mode is {summary['mode']!r}, expected {mode!r}")
    return summary


def _by_round(path: Path) -> dict[int, dict[str, Any]]:
    """A history file's complete lines keyed by round (garbled lines skipped, last one wins)."""
    rows = history.read(path)
    return {r["round"]: r for r in rows if isinstance(r, dict) and isinstance(r.get("round"), int)}


def _since(t: Any, started_at: Any) -> float | None:
    """Seconds from the launch to `t`, or None when either time is unknown."""
    return None if t is None or started_at is None else float(t) - float(started_at)


def _coordinator_curve(run: Path, started_at: Any) -> Curve:
    """Centralized curve: the global model's accuracy; every byte passes the coordinator."""
    path = run / "coordinator.jsonl"
    rows = _by_round(path)
    if not rows:
        raise ValueError(f"{run}: coordinator.jsonl is missing or has no complete line ({path})")
    curve: Curve = {k: [] for k in CURVE_KEYS}
    total: int | None = 0
    for r in sorted(rows):
        row = rows[r]
        total = _plus(total, row.get("bytes_sent", 0), row.get("bytes_received", 0))
        curve["round"].append(r)
        curve["accuracy"].append(row.get("holdout_accuracy"))
        curve["bytes"].append(total)
        curve["seconds"].append(_since(row.get("time"), started_at))
    return curve


def _gossip_curve(run: Path, started_at: Any) -> Curve:
    """Gossip curve: mean peer accuracy, bytes all peers sent, time the slowest peer got there."""
    peers = [h for p in sorted(run.glob("peer-*.jsonl")) if (h := _by_round(p))]
    if not peers and (run / "history.npz").is_file():
        return _columnar_curve(run)
    if not peers:
        raise ValueError(f"{run}: no peer-*.jsonl history with a complete line")
    curve: Curve = {k: [] for k in CURVE_KEYS}
    total: int | None = 0
    for r in sorted({r for h in peers for r in h}):
        rows = [h[r] for h in peers if r in h]  # only the peers that reached round r
        accs = [x["holdout_accuracy"] for x in rows if x.get("holdout_accuracy") is not None]
        times = [x["time"] for x in rows if x.get("time") is not None]
        total = _plus(total, *(x.get("bytes_sent", 0) for x in rows))
        curve["round"].append(r)
        curve["accuracy"].append(sum(accs) / len(accs) if accs else None)
        curve["bytes"].append(total)
        curve["seconds"].append(_since(max(times) if times else None, started_at))
    return curve


def _plus(total: int | None, *values: int | None) -> int | None:
    """A running byte count; None once any count is unknown (a simulated run's)."""
    if total is None or any(v is None for v in values):
        return None
    return total + sum(v for v in values if v is not None)


def _columnar_curve(run: Path) -> Curve:
    """Gossip curve of a large simulated run from its `history.npz` (no bytes, no times
    per round: the simulator has neither)."""
    import numpy as np

    with np.load(run / "history.npz") as cols:
        acc = cols["holdout_accuracy"]
    means = [float(np.nanmean(row)) if not np.isnan(row).all() else None for row in acc]
    rounds = list(range(len(means)))
    return {
        "round": rounds,
        "accuracy": means,
        "bytes": [None] * len(means),
        "seconds": [None] * len(means),
    }


def _default_target(final_means: list[float | None]) -> float:
    """95 % of the weaker final mean accuracy, rounded down to 0.01 (0.5 if one is unknown)."""
    known = [m for m in final_means if m is not None]
    if len(known) < len(final_means):
        return FALLBACK_TARGET
    # round() first so that 0.95 * 0.6 = 0.5699999... still floors to 0.57
    return math.floor(round(TARGET_FRACTION * min(known) * 100, 6)) / 100


def _rounds_to(curve: Curve, target: float) -> int | None:
    """First round whose curve accuracy reaches the target, None if none does."""
    pairs = zip(curve["round"], curve["accuracy"], strict=True)
    return next((r for r, acc in pairs if acc is not None and acc >= target), None)


def _mode(summary: dict[str, Any], curve: Curve, run: Path, target: float) -> dict[str, Any]:
    """One column of the comparison, from the run's summary and its curve."""
    acc = summary.get("final_holdout_accuracy") or {}
    busiest = summary.get("bytes_through_busiest") or {}
    completed = summary.get("completed_peers", [])
    return {
        "final_accuracy_mean": acc.get("mean"),
        "final_accuracy_min": acc.get("min"),
        "final_accuracy_max": acc.get("max"),
        "rounds_to_target": _rounds_to(curve, target),
        "bytes_sent_total": summary.get("bytes_sent_total"),
        "busiest_node": busiest.get("node"),
        "busiest_bytes": busiest.get("bytes"),
        "wall_s": summary.get("wall_s"),
        "completed_peers": len(completed) if isinstance(completed, list) else completed,
        "peers": summary.get("peers"),
        "run": str(run),
    }


def build_report(centralized: Path, gossip: Path, target: float | None = None) -> dict[str, Any]:
    """The comparison of two finished run folders (exactly what `compare.json` holds)."""
    runs = {"centralized": Path(centralized), "gossip": Path(gossip)}
    summaries = {m: _summary(runs[m], m) for m in MODES}
    started = {m: summaries[m].get("started_at") for m in MODES}
    curves = {
        "centralized": _coordinator_curve(runs["centralized"], started["centralized"]),
        "gossip": _gossip_curve(runs["gossip"], started["gossip"]),
    }
    if target is None:
        means = [(summaries[m].get("final_holdout_accuracy") or {}).get("mean") for m in MODES]
        target = _default_target(means)
    modes = {m: _mode(summaries[m], curves[m], runs[m], target) for m in MODES}
    c, g = modes["centralized"]["busiest_bytes"], modes["gossip"]["busiest_bytes"]
    return {
        "scenario": summaries["centralized"].get("scenario") or summaries["gossip"].get("scenario"),
        "target_accuracy": float(target),
        "modes": modes,
        "busiest_ratio": c / g if c and g else None,
        "curves": curves,
    }


def _human_bytes(n: int | None) -> str:
    """1234567 -> '1.2 MB' (decimal units); the exact count stays in compare.json."""
    if n is None:
        return MISSING
    if abs(n) < 1000:
        return f"{n} B"
    value = n / 1000
    for unit in ("kB", "MB", "GB"):
        if round(abs(value), 1) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _node(node: Any) -> str:
    """'coordinator', 'peer 3', or '-' for an unknown node."""
    if node is None:
        return MISSING
    return "coordinator" if node == "coordinator" else f"peer {node}"


def _fmt(value: Any, spec: str) -> str:
    """`value` formatted, or '-' when the run does not have it."""
    return MISSING if value is None else format(value, spec)


def _title(report: dict[str, Any]) -> str:
    """Names the scenario and the target accuracy (table title, markdown heading, figure)."""
    return (
        f"{report['scenario']}: centralized vs gossip "
        f"(target holdout accuracy {report['target_accuracy']:.2f})"
    )


LABELS = [
    "final holdout accuracy, mean",
    "final holdout accuracy, min",
    "final holdout accuracy, max",
    "rounds to reach {target:.2f}",
    "peers completed",
    "total bytes sent",
    "bytes through the busiest node",
    "wall time (s)",
]


def _cells(m: dict[str, Any]) -> list[str]:
    """One mode's column of the table, in the order of LABELS."""
    rounds = m["rounds_to_target"]
    return [
        _fmt(m["final_accuracy_mean"], ".3f"),
        _fmt(m["final_accuracy_min"], ".3f"),
        _fmt(m["final_accuracy_max"], ".3f"),
        "not reached" if rounds is None else str(rounds),
        f"{_fmt(m['completed_peers'], 'd')}/{_fmt(m['peers'], 'd')}",
        _human_bytes(m["bytes_sent_total"]),
        f"{_human_bytes(m['busiest_bytes'])} ({_node(m['busiest_node'])})",
        _fmt(m["wall_s"], ".1f"),
    ]


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table's rows (metric, centralized, gossip), shared by the terminal and markdown."""
    labels = [label.format(target=report["target_accuracy"]) for label in LABELS]
    c, g = (_cells(report["modes"][m]) for m in MODES)
    ratio = ("busiest node, centralized ÷ gossip", _fmt(report["busiest_ratio"], ".2f"), "")
    return [*zip(labels, c, g, strict=True), ratio]


def render_table(report: dict[str, Any]) -> Table:
    """The comparison as a rich table: one row per metric, one column per mode."""
    from rich.table import Table

    table = Table(title=_title(report))
    table.add_column("metric")
    for mode in MODES:
        table.add_column(mode, justify="right")
    for cells in _rows(report):
        table.add_row(*cells)
    return table


def _markdown(report: dict[str, Any], centralized: Path, gossip: Path) -> str:
    """`compare.md`: a heading naming scenario and target, the table, the two run folders."""
    lines = [f"## {_title(report)}", "", "| metric | centralized | gossip |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(report)]
    lines += ["", f"Runs: centralized `{centralized}`, gossip `{gossip}`.", ""]
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], centralized: Path, gossip: Path, out: Path) -> None:
    """Write `compare.json`, `compare.md` and `compare.png` into `out` (created if needed)."""
    from p2pfl.app.plots import compare_plot

    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "compare.md").write_text(_markdown(report, centralized, gossip))
    compare_plot(report["curves"], out / "compare.png", title=_title(report))
