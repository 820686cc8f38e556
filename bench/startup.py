"""Start-up: from `p2pfl launch` to the first round's start, and where a peer's time goes.

1. One warm-up launch of the quickstart (rounds = 1) fills JAX's persistent compile
   cache, as a user's second run would find it.
2. Measured launches (rounds = 2, a free base port). The clock starts just before
   `p2pfl launch` is spawned. "First round's start" is each peer's `peer_started` log
   timestamp: a peer logs it right after writing its round-0 record (the initial
   evaluation) and immediately before it starts round 1. The headline is the LAST
   peer's `peer_started` (all 8 peers in round 1); the first peer's is reported too,
   as are the launcher's own start (first peer process created, from psutil) and the
   time until every peer has finished round 1 (its first training call).
3. One peer's start-up taken apart (bench/_probe.py startup): the same steps as
   `p2pfl peer`, alone and pinned to one core, with the RSS after each step; then the
   same under `python -X importtime`, summed by top-level package.
4. With `--scale`: whole runs (40 rounds) of the quickstart with 8 peers (warm) and
   with 64 peers, first on an empty compile cache (its own `P2PFL_CACHE`: cold), then
   again on it (warm): the 64-peer warm run against 2.5 x the 8-peer one, and the cold
   run against 1.5 x the warm one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Row,
    add_quiet_arg,
    launch,
    log_events,
    peer_processes,
    peers_of,
    preamble,
    print_table,
    run_probe,
    scenario_copy,
    wait_launch,
)

TARGET_S = 2.0
SCALE_PEERS = 64
SCALE_TARGET = 2.5  # 64-peer whole run / 8-peer whole run, warm
COLD_TARGET = 1.5  # 64-peer whole run, cold cache / warm


def _watch(proc: subprocess.Popen[bytes], peers: int) -> tuple[list[float], float | None]:
    """Creation epochs of the launcher's peer processes, and when the last one exited."""
    seen: dict[int, float] = {}
    launcher = psutil.Process(proc.pid)
    gone_at = None
    while proc.poll() is None:
        try:
            children = peer_processes(launcher)
            for c in children:
                seen.setdefault(c.pid, c.create_time())
        except psutil.NoSuchProcess:
            break
        if len(seen) >= peers and not children:
            gone_at = time.time()
            break
        time.sleep(0.005 if len(seen) < peers else 0.02)
    return sorted(seen.values()), gone_at


def one_launch(folder: Path, rounds: int) -> dict[str, float]:
    """Seconds from spawning `p2pfl launch` to each start-up milestone."""
    scenario = scenario_copy(folder, training={"rounds": rounds})
    peers = peers_of(scenario)
    out = folder / "run"
    t0 = time.time()
    proc = launch(scenario, out)
    spawned, gone = _watch(proc, peers)
    wait_launch(proc)
    t_exit = time.time()
    ev = log_events(out)
    started = [e["ts"] for evs in ev.values() for e in evs if e.get("event") == "peer_started"]
    r1 = [
        e["ts"]
        for evs in ev.values()
        for e in evs
        if e.get("event") == "round_done" and e.get("round") == 1
    ]
    finished = [e["ts"] for evs in ev.values() for e in evs if e.get("event") == "peer_finished"]
    if len(started) != peers or len(r1) != peers:
        raise RuntimeError(
            f"{len(started)} peer_started and {len(r1)} round-1 events, expected {peers} each"
        )
    res = {
        "first peer_started": min(started) - t0,
        "last peer_started": max(started) - t0,
        "all peers done round 1": max(r1) - t0,
        "launch exited": t_exit - t0,
    }
    if spawned:
        res["first peer process created"] = spawned[0] - t0
        res["last peer process created"] = spawned[-1] - t0
    if finished:
        res["tail: last peer_finished -> launch exited"] = t_exit - max(finished)
        if gone is not None:
            res["tail: last peer_finished -> last peer process gone"] = gone - max(finished)
    return res


def peer_breakdown(folder: Path) -> list[dict[str, object]]:
    """Steps of one peer's start-up: name, seconds, RSS after (probe, one core)."""
    scenario = scenario_copy(folder, training={"rounds": 1})
    t0 = time.time()
    out, _ = run_probe("startup", str(scenario), "0", str(folder))
    steps, prev = [], t0
    for line in out.splitlines():
        e = json.loads(line)
        steps.append(
            {
                "step": e["step"],
                "s": e["t"] - prev,
                "end": e["t"] - t0,
                "rss": e["rss"],
                "phase": e.get("phase"),
            }
        )
        prev = e["t"]
    return steps


def import_times(folder: Path, top: int = 8) -> list[tuple[str, float]]:
    """(top-level package, summed self import seconds) over the probe's imports."""
    scenario = scenario_copy(folder, training={"rounds": 1})
    _, err = run_probe("startup", str(scenario), "0", str(folder), importtime=True)
    by_pkg: dict[str, float] = defaultdict(float)
    pat = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s+(\S.*)$")
    for line in err.splitlines():
        m = pat.match(line)
        if m:
            by_pkg[m.group(3).strip().split(".")[0]] += int(m.group(1)) / 1e6
    return sorted(by_pkg.items(), key=lambda kv: -kv[1])[:top]


def run(repeats: int = 2, breakdown: bool = True) -> tuple[list[Row], list[str]]:
    """Warm, measure `repeats` launches, take one peer apart; rows and notes."""
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        base = Path(tmp)
        (base / "warm").mkdir()
        warm = one_launch(base / "warm", rounds=1)
        runs = []
        for i in range(repeats):
            (base / f"m{i}").mkdir()
            runs.append(one_launch(base / f"m{i}", rounds=2))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows = [
            Row(
                "launch -> all 8 peers started (last peer_started)",
                med["last peer_started"],
                "s",
                TARGET_S,
                note=f"median of {repeats} warm launches: "
                + ", ".join(f"{r['last peer_started']:.2f}" for r in runs)
                + f"; warm-up launch {warm.get('last peer_started', float('nan')):.2f}",
            )
        ]
        for k in (
            "first peer process created",
            "last peer process created",
            "first peer_started",
            "all peers done round 1",
            "tail: last peer_finished -> last peer process gone",
            "tail: last peer_finished -> launch exited",
            "launch exited",
        ):
            if k in med:
                rows.append(Row(f"  {k}", med[k], "s"))
        if breakdown:
            (base / "probe").mkdir()
            steps = peer_breakdown(base / "probe")
            ready = next(s for s in steps if s["phase"] == "ready")
            cores = len(os.sched_getaffinity(0))
            peers = peers_of(base / "m0" / "quickstart.toml")
            rows.append(
                Row(
                    "one peer alone: spawn -> ready for round 1",
                    float(ready["end"]),
                    "s",
                    note=f"x {peers} peers / {cores} cores = "
                    f"{float(ready['end']) * peers / cores:.2f} s if CPU-bound",
                )
            )
            for s in steps:
                rows.append(
                    Row(
                        f"  step: {s['step']}",
                        float(s["s"]) * 1e3,
                        "ms",
                        note=f"RSS after {int(s['rss']) / 1e6:.0f} MB",
                    )
                )
            (base / "probe2").mkdir()
            imports = import_times(base / "probe2")
            rows.append(
                Row(
                    "  imports, self time by package (-X importtime)",
                    sum(t for _, t in imports),
                    "s",
                    note=", ".join(f"{p} {t * 1e3:.0f} ms" for p, t in imports),
                )
            )
            notes.append(
                "step rows: one peer's start-up alone on one core, warm compile cache "
                "(bench/_probe.py startup mirrors p2pfl peer: cli -> scenario -> logs -> "
                "jax + cache -> peer imports -> graph -> data -> trainer -> sockets -> "
                "round-0 evaluation); the train call steps happen in round 1"
            )
    notes.insert(
        0,
        "clock starts just before `p2pfl launch` is spawned; 'started' = the peer's "
        "peer_started log line, written right after its round-0 record, just before "
        "round 1",
    )
    return rows, notes


def whole_run(folder: Path, peers: int, env: dict[str, str] | None = None) -> float:
    """Seconds from spawning `p2pfl launch` to its exit, for the quickstart with `peers`."""
    folder.mkdir()
    scenario = scenario_copy(folder, topology={"peers": peers})
    t0 = time.time()
    wait_launch(launch(scenario, folder / "run", env=env), timeout_s=600.0)
    return time.time() - t0


def scale(repeats: int) -> list[Row]:
    """The 64-peer whole run against the 8-peer one (warm), and its cold run against warm."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        base = Path(tmp)
        whole_run(base / "warm-up", 8)
        small = [whole_run(base / f"p8-{i}", 8) for i in range(repeats)]
        env = {**os.environ, "P2PFL_CACHE": str(base / "cache")}
        cold = whole_run(base / "cold", SCALE_PEERS, env)
        warm = [whole_run(base / f"p64-{i}", SCALE_PEERS, env) for i in range(repeats)]
    s8, s64 = statistics.median(small), statistics.median(warm)
    listed = ", ".join
    return [
        Row("8 peers: whole run, warm", s8, "s", note=listed(f"{t:.2f}" for t in small)),
        Row(
            f"{SCALE_PEERS} peers: whole run, warm",
            s64,
            "s",
            note=listed(f"{t:.2f}" for t in warm),
        ),
        Row(f"{SCALE_PEERS} / 8 peers, whole run (warm)", s64 / s8, "x", SCALE_TARGET),
        Row(f"{SCALE_PEERS} peers: whole run, cold cache", cold, "s"),
        Row(f"{SCALE_PEERS} peers: cold / warm", cold / s64, "x", COLD_TARGET),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="measured launches (default 2)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the one-peer probe")
    p.add_argument(
        "--scale",
        action="store_true",
        help=f"also time whole runs of 8 and {SCALE_PEERS} peers, cold and warm (~2 min)",
    )
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    rows, notes = run(args.repeats, not args.no_breakdown)
    print_table(
        "startup: p2pfl launch -> first round, 8 peers, warm compile cache", rows, [*pre, *notes]
    )
    if args.scale:
        print_table(
            f"startup at scale: whole runs, 8 vs {SCALE_PEERS} peers, cold vs warm cache",
            scale(args.repeats),
            ["wall clock from spawning `p2pfl launch` to its exit, 40 rounds"],
        )


if __name__ == "__main__":
    main()
