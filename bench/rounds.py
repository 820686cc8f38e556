"""The quickstart's time per round against its compute floor.

Runs `p2pfl launch` on a copy of scenarios/quickstart.toml (a free base port, run folder
in a temp dir) and reads the peers' histories and logs. Round 1 is excluded from every
figure: it includes the first training call (JIT compile or compile-cache load) and the
start-up barrier.

- time split: medians over peers and rounds 2..R of train_s, eval_s, comm_s, wait_s.
- round wall time, as the issue defines it from the peers' `t` stamps:
  max over peers of t at round r minus that max at round r-1. `t` counts from each
  peer's own construction, so the peers' clocks are offset by their start-up skew; the
  same figure is also computed from the `round_done` log timestamps (one wall clock
  for all peers), which is the one the ratio uses.
- compute floor of round r: (sum over peers of train_s + eval_s in round r) / cores.
  Those are wall-clock seconds measured inside peers that share 2 cores 4 to a core,
  so they include time the peer waited for a core; the floor is therefore also
  computed from an uncontended measurement (a probe process pinned to one core runs
  each peer's train + evaluate calls alone) — the stricter ratio.
- CPU: the peers' CPU seconds (user + system, sampled every 20 ms) spent over rounds
  2..R, per round and as a share of the 2 cores' wall time, to tell CPU-bound
  overhead from waiting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Row,
    add_quiet_arg,
    histories,
    launch,
    log_events,
    median,
    peer_processes,
    preamble,
    print_table,
    run_probe,
    scenario_copy,
    wait_launch,
)

TARGET = 2.0


def _sample_cpu(proc: subprocess.Popen[bytes], period_s: float = 0.02) -> list[tuple[float, float]]:
    """(epoch, summed CPU seconds of the launcher's peer children) until the launch ends."""
    launcher = psutil.Process(proc.pid)
    last: dict[int, float] = {}
    samples = []
    while proc.poll() is None:
        try:
            children = peer_processes(launcher)
        except psutil.NoSuchProcess:
            break
        for c in children:
            try:
                ct = c.cpu_times()
                last[c.pid] = ct.user + ct.system
            except psutil.NoSuchProcess:
                pass  # keep its last reading
        samples.append((time.time(), sum(last.values())))
        time.sleep(period_s)
    return samples


def _cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """Summed peer CPU seconds at epoch t, interpolated between samples."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


def isolated_compute(scenario: Path, reps: int = 30) -> dict[int, float]:
    """peer -> uncontended train + evaluate seconds of one round (probe, one core)."""
    out, _ = run_probe("compute", str(scenario), str(reps))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["peer"]: r["train_s"] + r["eval_s"] for r in rows}


def round_steps(scenario: Path, reps: int = 200) -> dict[str, float]:
    """step -> uncontended median seconds of that step of one round (probe, peer 0)."""
    out, _ = run_probe("overhead", str(scenario), str(reps))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["step"]: r["s"] for r in rows}


def step_rows(steps: dict[str, float], peers: int, cores: int) -> list[Row]:
    """One row per step of a round, and the floor they add up to."""
    total = sum(steps.values())
    rows = [
        Row(f"  step: {name}", sec * 1e6, "us", note=f"{sec / total * 100:.0f}% of the round")
        for name, sec in steps.items()
    ]
    rows.append(
        Row(
            "  all steps of one peer's round",
            total * 1e3,
            "ms",
            note=f"x {peers} peers / {cores} cores = {total * peers / cores * 1e3:.2f} ms",
        )
    )
    return rows


def analyse(
    out: Path, cores: int, cpu: list[tuple[float, float]] | None, iso: dict[int, float] | None
) -> tuple[list[Row], list[str]]:
    """Rows and notes from a finished run folder."""
    hist = histories(out)
    logs = log_events(out)
    peers = sorted(hist)
    rounds = min(len(h) for h in hist.values()) - 1  # row 0 is the initial evaluation
    if rounds < 3:
        raise RuntimeError(f"only {rounds} rounds recorded by every peer; need at least 3")
    rr = range(2, rounds + 1)  # round 1 excluded (compile / start-up barrier)
    rec = {(p, h[r]["round"]): h[r] for p, h in hist.items() for r in range(rounds + 1)}
    done = {
        (p, e["round"]): e["ts"]
        for p, evs in logs.items()
        for e in evs
        if e.get("event") == "round_done" and "round" in e
    }

    def split(field: str) -> float:
        return median(rec[p, r][field] for p in peers for r in rr)

    wall_t = [
        max(rec[p, r]["t"] for p in peers) - max(rec[p, r - 1]["t"] for p in peers) for r in rr
    ]
    wall_log = [max(done[p, r] for p in peers) - max(done[p, r - 1] for p in peers) for r in rr]
    floor = [sum(rec[p, r]["train_s"] + rec[p, r]["eval_s"] for p in peers) / cores for r in rr]
    ratios = [w / f for w, f in zip(wall_log, floor, strict=True)]
    rows = [
        Row("median train_s (per peer, round)", split("train_s") * 1e3, "ms"),
        Row("median eval_s", split("eval_s") * 1e3, "ms"),
        Row("median comm_s (send, mix; excl. wait)", split("comm_s") * 1e3, "ms"),
        Row("median wait_s (blocked in poll)", split("wait_s") * 1e3, "ms"),
        Row(
            "median round wall time (t stamps)",
            median(wall_t) * 1e3,
            "ms",
            note="max_p t_p(r) - max_p t_p(r-1); per-peer clocks",
        ),
        Row(
            "median round wall time (log clock)",
            median(wall_log) * 1e3,
            "ms",
            note="same from round_done timestamps, one clock",
        ),
        Row(
            "compute floor (history train+eval / cores)",
            median(floor) * 1e3,
            "ms",
            note=f"sum over {len(peers)} peers / {cores} cores; contended wall-clock",
        ),
        Row(
            "round wall / compute floor",
            median(wall_log) / median(floor),
            "x",
            TARGET,
            note=f"median wall / median floor; median of per-round ratios {median(ratios):.2f}",
        ),
        Row("round wall (t stamps) / compute floor", median(wall_t) / median(floor), "x", TARGET),
    ]
    notes = [
        f"{len(peers)} peers, rounds 2..{rounds} (round 1 excluded: first train call "
        "compiles or loads the compile cache, and waits for the slowest peer to start)"
    ]
    if iso:
        iso_floor = sum(iso.values()) / cores
        rows.append(
            Row(
                "compute floor, uncontended (probe)",
                iso_floor * 1e3,
                "ms",
                note=f"median train+eval per peer {median(iso.values()) * 1e3:.2f} ms, "
                "alone on one core",
            )
        )
        rows.append(
            Row("round wall / uncontended compute floor", median(wall_log) / iso_floor, "x", TARGET)
        )
    if cpu and len(cpu) > 2:
        t_a = max(done[p, 1] for p in peers)
        t_b = max(done[p, rounds] for p in peers)
        cpu_s = _cpu_at(cpu, t_b) - _cpu_at(cpu, t_a)
        per_round = cpu_s / (rounds - 1)
        rows.append(
            Row(
                "peer CPU per round (all peers)",
                per_round * 1e3,
                "ms",
                note=f"{per_round / len(peers) * 1e3:.2f} ms per peer per round",
            )
        )
        rows.append(
            Row(
                "CPU busy share of rounds 2..R",
                cpu_s / ((t_b - t_a) * cores) * 100,
                "%",
                note=f"CPU / ({cores} cores x wall); 100% = CPU-bound",
            )
        )
        if iso:
            share = sum(iso.values()) / max(per_round, 1e-9) * 100
            rows.append(
                Row(
                    "train+eval share of peer CPU",
                    share,
                    "%",
                    note="uncontended train+eval / measured CPU per round",
                )
            )
    return rows, notes


def run(
    rounds: int | None = None, keep: Path | None = None, steps: bool = True
) -> tuple[list[Row], list[str]]:
    """Launch the quickstart once, probe the compute, analyse; returns rows and notes."""
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        extra = {"training": {"rounds": rounds}} if rounds else {}
        scenario = scenario_copy(folder, **extra)
        out = folder / "run"
        proc = launch(scenario, out)
        cpu = _sample_cpu(proc)
        wait_launch(proc)
        iso = isolated_compute(scenario)
        rows, notes = analyse(out, cores, cpu, iso)
        if steps:
            rows += step_rows(round_steps(scenario), len(iso), cores)
            notes.append(
                "step rows: one round of peer 0 taken apart, uncontended, alone on one "
                "core (bench/_probe.py overhead; models sent to its own inbox)"
            )
    return rows, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, help="override training.rounds (default: the file's)")
    p.add_argument("--keep", type=Path, help="keep the run folder here")
    p.add_argument("--no-steps", action="store_true", help="skip the per-step probe")
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    rows, notes = run(args.rounds, args.keep, not args.no_steps)
    print_table("rounds: quickstart time split and round overhead", rows, [*pre, *notes])


if __name__ == "__main__":
    main()
