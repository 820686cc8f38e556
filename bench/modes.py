"""Centralized against gossip on the quickstart: round time, compute floor, server, traffic.

Runs `p2pfl launch --mode centralized` and then `--mode gossip` (one after the other) on
a copy of scenarios/quickstart.toml (free ports: the peers' range and the coordinator's
two ports after it; run folders in a temp dir). Round 1 is excluded from every figure
(first training call, start-up barrier).

- round wall time, rounds 2..R: centralized from coordinator.jsonl (`time` of
  consecutive rounds; also the server's own `round_s`), gossip as bench/rounds.py does
  it (max over peers of the `round_done` log time at r minus that at r-1).
- compute floor of round r: (sum over peers of train_s + eval_s in round r) / cores.
  Centralized peers write round r's line when they receive the global model after r,
  so lines are matched by `round`, and the server's aggregate_s + eval_s are added.
- the server's split of its round_s: aggregate, evaluate, and the rest (sending
  start_round to every peer and waiting for their updates); the coordinator's CPU per
  round (sampled every 20 ms) against the peers' (their histories' cpu_s).
- traffic: summary.json's bytes_through_busiest / rounds in each mode; theory for
  FedAvg against a ring of degree 2: 2N models through the server, 4 through a peer.
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
    QUICKSTART,
    Row,
    Watch,
    add_quiet_arg,
    histories,
    log_events,
    median,
    p2pfl_command,
    peers_of,
    preamble,
    print_table,
    scenario_copy,
    wait_launch,
)

from p2pfl.app.ports import free_base_port

TARGET = 2.0


def launch_mode(scenario: Path, out: Path, mode: str) -> list[tuple[float, float]]:
    """Run one mode to completion; (epoch, coordinator CPU seconds) samples, if it has one."""
    cmd = [*p2pfl_command(), "launch", str(scenario), "--mode", mode, "--out", str(out)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=out.parent,
    )
    samples: list[tuple[float, float]] = []
    coord = None
    while mode == "centralized" and proc.poll() is None:
        try:
            if coord is None and (out / "pids.json").exists():
                coord = psutil.Process(json.loads((out / "pids.json").read_text())["coordinator"])
            if coord is not None:
                ct = coord.cpu_times()
                samples.append((time.time(), ct.user + ct.system))
        except (psutil.NoSuchProcess, KeyError, json.JSONDecodeError):
            pass  # not written yet, or the coordinator has exited: keep the last sample
        time.sleep(0.02)
    wait_launch(proc)
    return samples


def cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """CPU seconds at epoch t, interpolated between samples."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


def per_round(out: Path, *fields: str) -> dict[int, float]:
    """round -> sum over the peers' history lines of that round of the fields."""
    sums: dict[int, float] = {}
    for rec in itertools.chain.from_iterable(histories(out).values()):
        sums[rec["round"]] = sums.get(rec["round"], 0.0) + sum(rec[f] for f in fields)
    return sums


def busiest_per_round(out: Path) -> tuple[float, str]:
    """(bytes through the busiest node / rounds, that node) from summary.json."""
    s = json.loads((out / "summary.json").read_text())
    busiest = s["bytes_through_busiest"]
    return busiest["bytes"] / s["rounds"], str(busiest["node"])


def analyse(cen: Path, gos: Path, cpu: list[tuple[float, float]], cores: int) -> list[Row]:
    server = [json.loads(x) for x in (cen / "coordinator.jsonl").read_text().splitlines() if x]
    srv = {s["round"]: s for s in server}
    rounds = max(srv)
    rr = range(2, rounds + 1)
    peers = len(histories(cen))
    # centralized
    c_wall = [srv[r]["time"] - srv[r - 1]["time"] for r in rr]
    c_work = per_round(cen, "train_s", "eval_s")
    c_floor = [(c_work[r] + srv[r]["aggregate_s"] + srv[r]["eval_s"]) / cores for r in rr]
    agg, ev = median(srv[r]["aggregate_s"] for r in rr), median(srv[r]["eval_s"] for r in rr)
    rest = median(srv[r]["round_s"] - srv[r]["aggregate_s"] - srv[r]["eval_s"] for r in rr)
    gap = median(srv[r]["time"] - srv[r - 1]["time"] - srv[r]["round_s"] for r in rr)
    coord_cpu = float("nan")
    if len(cpu) > 1:
        coord_cpu = (cpu_at(cpu, srv[rounds]["time"]) - cpu_at(cpu, srv[1]["time"])) / (rounds - 1)
    # gossip
    done: dict[int, float] = {}
    for evs in log_events(gos).values():
        for e in evs:
            if e.get("event") == "round_done" and "round" in e:
                done[e["round"]] = max(done.get(e["round"], 0.0), e["ts"])
    g_wall = [done[r] - done[r - 1] for r in rr]
    g_work = per_round(gos, "train_s", "eval_s")
    g_floor = [g_work[r] / cores for r in rr]
    cw, cf, gw, gf = median(c_wall), median(c_floor), median(g_wall), median(g_floor)
    c_pcpu, g_pcpu = per_round(cen, "cpu_s"), per_round(gos, "cpu_s")
    cb, cnode = busiest_per_round(cen)
    gb, gnode = busiest_per_round(gos)
    c_cpu, g_cpu = median(c_pcpu[r] for r in rr) + coord_cpu, median(g_pcpu[r] for r in rr)
    ms = 1e3

    def busy(wall, cpu_s):
        return f"CPU {cpu_s * ms:.1f} ms/round: {cpu_s / (wall * cores):.0%} of {cores} cores"

    return [
        Row("centralized: round wall (coordinator time)", cw * ms, "ms", note=busy(cw, c_cpu)),
        Row("  server round_s", median(srv[r]["round_s"] for r in rr) * ms, "ms"),
        Row("  server aggregate_s", agg * ms, "ms"),
        Row("  server eval_s", ev * ms, "ms"),
        Row("  server rest of round_s", rest * ms, "ms", note="send start_round, wait updates"),
        Row("  between rounds (wall - round_s)", gap * ms, "ms", note="record, log, quorum"),
        Row("  coordinator CPU per round", coord_cpu * ms, "ms", note="psutil, 20 ms samples"),
        Row("  peers' CPU per round (cpu_s)", median(c_pcpu[r] for r in rr) * ms, "ms"),
        Row("  peers' train+eval per round", median(c_work[r] for r in rr) * ms, "ms"),
        Row("centralized: compute floor", cf * ms, "ms", note=f"(peers + server) / {cores}"),
        Row("centralized: round wall / floor", cw / cf, "x", TARGET),
        Row("gossip: round wall (round_done log)", gw * ms, "ms", note=busy(gw, g_cpu)),
        Row("  peers' CPU per round (cpu_s)", median(g_pcpu[r] for r in rr) * ms, "ms"),
        Row("gossip: compute floor", gf * ms, "ms", note=f"peers / {cores}"),
        Row("gossip: round wall / floor", gw / gf, "x", TARGET),
        Row("centralized round / gossip round", cw / gw, "x"),
        Row("busiest node per round, centralized", cb / 1e3, "kB", note=f"node {cnode}"),
        Row("busiest node per round, gossip", gb / 1e3, "kB", note=f"node {gnode}"),
        Row("busiest: centralized / gossip", cb / gb, "x", peers / 2, "about", "theory N/2"),
    ]


def run(rounds: int | None = None, keep: Path | None = None) -> tuple[list[Row], list[str]]:
    """Both modes, one after the other, on one scenario copy; rows and notes."""
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-modes-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        peers = peers_of(QUICKSTART)
        extra = {"training": {"rounds": rounds}} if rounds else {}
        port = free_base_port(peers + 2)  # the coordinator's two ports after the peers'
        scenario = scenario_copy(folder, network={"base_port": port}, **extra)
        t0 = time.perf_counter()
        with Watch() as watch:
            cpu = launch_mode(scenario, folder / "centralized", "centralized")
            launch_mode(scenario, folder / "gossip", "gossip")
        elapsed = time.perf_counter() - t0
        rows = analyse(folder / "centralized", folder / "gossip", cpu, cores)
    notes = [
        *filter(None, [watch.note("the launches")]),
        f"{peers} peers, rounds 2..R (round 1 excluded); both launches took {elapsed:.0f} s",
        "medians over rounds; ratio of medians (wall / floor); the coordinator shares the cores",
    ]
    return rows, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, help="override training.rounds (default: the file's)")
    p.add_argument("--keep", type=Path, help="keep the run folders here")
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    rows, notes = run(args.rounds, args.keep)
    print_table("modes: centralized vs gossip on the quickstart", rows, [*pre, *notes])


if __name__ == "__main__":
    main()
