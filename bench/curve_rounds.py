"""The quickstart's per-round time in clear against CurveZMQ (`[security] keys = "auto"`).

Runs `p2pfl launch` on copies of scenarios/quickstart.toml cut to `--rounds` rounds (10
by default; a free base port each, run folders in a temp dir), `--repeat` times each
way, alternating (plain first, then CURVE first, ...), so load that comes and goes hits
both alike. The CURVE copy adds `[security] keys = "auto"`: the launch makes fresh keys
in the run folder's `keys/` and every socket of every peer is CURVE (checked: the folder
is there in the CURVE runs, absent in the plain ones).

From each run folder:

- round wall time, rounds 2..R: max over peers of the history's `time` (unix time the
  round's line was written, one clock for all peers) at round r minus that max at r-1;
  round 1 is left out (first training call, start-up barrier). A run's figure is the
  median of its R-1 rounds;
- `summary.json`'s `wall_s` (the whole launch: start-up, R rounds, shut-down) and
  `wall_s / rounds`;
- the median over peers and rounds 2..R of the history's `comm_s` (send + mix, the part
  of a round that CURVE touches) and `wait_s`.

The CURVE / plain ratios are the median over repeats of the ratio within a repeat (the
two runs of a repeat are back to back).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    QUICKSTART,
    Row,
    Watch,
    add_quiet_arg,
    histories,
    launch,
    median,
    preamble,
    print_table,
    scenario_copy,
    wait_launch,
)

WAYS = ("plain", "curve")


def one_run(folder: Path, way: str, rounds: int) -> dict[str, float]:
    """Launch the quickstart once (`way`: plain or curve); its figures."""
    sections: dict[str, dict[str, Any]] = {"training": {"rounds": rounds}}
    if way == "curve":
        sections["security"] = {"keys": "auto"}
    folder.mkdir(parents=True)
    scenario = scenario_copy(folder, QUICKSTART, **sections)
    out = folder / "run"
    wait_launch(launch(scenario, out))
    if (out / "keys").is_dir() != (way == "curve"):
        raise RuntimeError(f"{out}: keys/ {'missing' if way == 'curve' else 'present'}")
    summary = json.loads((out / "summary.json").read_text())
    if summary["failed_peers"] or summary["rounds"] != rounds:
        raise RuntimeError(f"{out}: failed peers {summary['failed_peers']}, {summary['rounds']}")
    hist = histories(out)
    rec = {(p, row["round"]): row for p, h in hist.items() for row in h}
    peers = sorted(hist)
    rr = range(2, rounds + 1)
    walls = [
        max(rec[p, r]["time"] for p in peers) - max(rec[p, r - 1]["time"] for p in peers)
        for r in rr
    ]
    return {
        "round_s": median(walls),
        "wall_s": float(summary["wall_s"]),
        "wall_per_round_s": float(summary["wall_s"]) / rounds,
        "comm_s": median(rec[p, r]["comm_s"] for p in peers for r in rr),
        "wait_s": median(rec[p, r]["wait_s"] for p in peers for r in rr),
    }


def measure(rounds: int = 10, repeat: int = 3) -> tuple[list[dict[str, dict[str, float]]], int]:
    """[{plain: figures, curve: figures}] per repeat, and the most other p2pfl/pytest
    processes seen while they ran."""
    pairs = []
    with tempfile.TemporaryDirectory(prefix="p2pfl-curve-rounds-") as tmp, Watch() as watch:
        for i in range(repeat):
            order = WAYS if i % 2 == 0 else WAYS[::-1]
            pairs.append({way: one_run(Path(tmp) / f"{i}-{way}", way, rounds) for way in order})
    return pairs, watch.seen


def rows(pairs: list[dict[str, dict[str, float]]]) -> list[Row]:
    """Median of each figure each way, and CURVE / plain (median of per-repeat ratios)."""
    out = []
    for key, what in (
        ("round_s", "round wall time (rounds 2..R)"),
        ("wall_per_round_s", "summary wall_s / rounds"),
        ("wall_s", "summary wall_s (whole launch)"),
        ("comm_s", "comm_s (per peer, round)"),
        ("wait_s", "wait_s (per peer, round)"),
    ):
        each = {w: [p[w][key] for p in pairs] for w in WAYS}
        for w in WAYS:
            out.append(
                Row(
                    f"{what}, {w}",
                    statistics.median(each[w]) * 1e3,
                    "ms",
                    note="median over runs; each run: "
                    + ", ".join(f"{x * 1e3:.0f}" for x in each[w]),
                )
            )
        if key in ("round_s", "wall_s", "comm_s"):
            out.append(
                Row(
                    f"{what}, CURVE / plain",
                    statistics.median(
                        c / p for c, p in zip(each["curve"], each["plain"], strict=True)
                    ),
                    "x",
                    note="median of per-repeat ratios",
                )
            )
    return out


def run(rounds: int = 10, repeat: int = 3) -> tuple[list[Row], list[str]]:
    """Measure; rows and notes (for run_all)."""
    pairs, seen = measure(rounds, repeat)
    notes = [
        f"quickstart (8 peers, ring) cut to {rounds} rounds, {repeat} repeats each way, "
        'alternating; CURVE = [security] keys = "auto"'
    ]
    if seen:
        notes.append(
            f"WARNING: up to {seen} other p2pfl/pytest processes ran during the launches; "
            "timings are contended"
        )
    return rows(pairs), notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds per launch (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="launches each way (default 3)")
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    table, notes = run(args.rounds, args.repeat)
    print_table("quickstart per-round time, in clear vs CurveZMQ", table, [*pre, *notes])


if __name__ == "__main__":
    main()
