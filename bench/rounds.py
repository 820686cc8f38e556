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
- `--against REV`: the same measurement, in the same run, on revision REV (a
  temporary `git worktree` of it, its own `python -m p2pfl` with PYTHONPATH at it, its
  own bench/_probe.py for its uncontended compute and steps), then ours / REV for the
  median round wall time and for round wall / compute floor. `--repeat N` alternates
  the two N times (ours first, then REV first, ...) and compares the medians.
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
from contextlib import ExitStack
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    OURS,
    QUICKSTART,
    Code,
    Row,
    Watch,
    add_quiet_arg,
    checkout,
    histories,
    launch,
    log_events,
    median,
    peer_processes,
    peers_of,
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


def isolated_compute(scenario: Path, reps: int = 30, code: Code = OURS) -> dict[int, float]:
    """peer -> uncontended train + evaluate seconds of one round (probe, one core)."""
    out, _ = run_probe("compute", str(scenario), str(reps), probe=code.probe, env=code.env)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["peer"]: r["train_s"] + r["eval_s"] for r in rows}


def round_steps(
    folder: Path, reps: int = 200, code: Code = OURS
) -> tuple[dict[str, float], dict[str, float] | None]:
    """step -> uncontended median seconds of that step of one round (probe, peer 0),
    and the probe's check (the peer's own round timed whole), if it has one.

    The probe drives peer 0's real sync-gossip machine, which refuses rounds past the
    scenario's last, so it gets a copy with enough rounds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scenario = scenario_copy(folder, training={"rounds": reps + 2 + max(10, reps // 2)})
    out, _ = run_probe("overhead", str(scenario), str(reps), probe=code.probe, env=code.env)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    check = next((r for r in rows if "check" in r), None)
    return {r["step"]: r["s"] for r in rows if "step" in r}, check


def step_rows(
    steps: dict[str, float],
    peers: int,
    cores: int,
    check: dict[str, float] | None = None,
    label: str = "",
) -> list[Row]:
    """One row per step of a round, and the floor they add up to."""
    total = sum(steps.values())
    tag = f" ({label})" if label else ""
    rows = [
        Row(f"  step{tag}: {name}", sec * 1e6, "us", note=f"{sec / total * 100:.0f}% of the round")
        for name, sec in steps.items()
    ]
    rows.append(
        Row(
            f"  all steps of one peer's round{tag}",
            total * 1e3,
            "ms",
            note=f"x {peers} peers / {cores} cores = {total * peers / cores * 1e3:.2f} ms",
        )
    )
    if check and check.get("s"):
        rows.append(
            Row(
                f"  the peer's own round + checkpoint, whole{tag}",
                check["s"] * 1e3,
                "ms",
                note=f"{check['s'] / total:.2f} x the steps' sum (GossipPeer, same harness)",
            )
        )
    return rows


def analyse(
    out: Path, cores: int, cpu: list[tuple[float, float]] | None, iso: dict[int, float] | None
) -> tuple[list[Row], list[str], dict[str, float]]:
    """Rows, notes and the headline figures (seconds, ratios) from a finished run folder."""
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
    figures = {
        "wall": median(wall_log),
        "floor": median(floor),
        "ratio": median(wall_log) / median(floor),
        "train": split("train_s"),
        "eval": split("eval_s"),
        "comm": split("comm_s"),
        "wait": split("wait_s"),
    }
    if iso:
        iso_floor = sum(iso.values()) / cores
        figures["iso_floor"] = iso_floor
        figures["iso_ratio"] = median(wall_log) / iso_floor
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
        figures["cpu"] = per_round
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
    return rows, notes, figures


def measure(
    folder: Path, cores: int, rounds: int | None = None, code: Code = OURS
) -> tuple[list[Row], list[str], dict[str, float]]:
    """Launch the quickstart once with `code`, probe its compute, analyse."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"training": {"rounds": rounds}} if rounds else {}
    scenario = scenario_copy(folder, **extra)
    out = folder / "run"
    with Watch() as watch:
        proc = launch(scenario, out, command=code.command, env=code.env)
        cpu = _sample_cpu(proc)
        wait_launch(proc)
        iso: dict[int, float] | None
        try:
            iso = isolated_compute(scenario, code=code)
        except RuntimeError as exc:  # another revision's probe may not run: say so, go on
            if code is OURS:
                raise
            iso = None
            print(f"rounds: {code.label}'s compute probe failed: {exc}", file=sys.stderr)
    rows, notes, figures = analyse(out, cores, cpu, iso)
    figures["contended"] = watch.seen
    if (warning := watch.note(f"the {code.label} run")) is not None:
        notes.append(warning)
    return rows, notes, figures


COMPARED = (
    ("wall", "median round wall time (log clock)", 1.0),
    ("ratio", "round wall / compute floor", 1.0),
    ("iso_ratio", "round wall / uncontended compute floor", None),
    ("floor", "compute floor (history train+eval / cores)", None),
    ("iso_floor", "compute floor, uncontended (probe)", None),
    ("cpu", "peer CPU per round (all peers)", None),
    ("train", "median train_s", None),
    ("eval", "median eval_s", None),
    ("comm", "median comm_s", None),
    ("wait", "median wait_s", None),
)


def compare_rows(
    ours: list[dict[str, float]], theirs: list[dict[str, float]], rev: str
) -> tuple[list[Row], list[str]]:
    """ours / theirs for the headline figures, each the median over the repeats.

    Runs during which other p2pfl/pytest processes were seen are marked `*` and left
    out when at least two runs of each side were not.
    """
    clean_a = [f for f in ours if not f.get("contended")]
    clean_b = [f for f in theirs if not f.get("contended")]
    use_clean = len(clean_a) >= 2 and len(clean_b) >= 2
    runs_a, runs_b = (clean_a, clean_b) if use_clean else (ours, theirs)
    rows = []
    for key, name, target in COMPARED:
        a = [f[key] for f in runs_a if key in f]
        b = [f[key] for f in runs_b if key in f]
        if not a or not b:
            continue
        scale, unit = (1.0, "x") if "ratio" in key else (1e3, "ms")

        def listed(fs: list[dict[str, float]], key: str = key, scale: float = scale) -> str:
            return ", ".join(
                f"{f[key] * scale:.3g}" + ("*" if f.get("contended") else "")
                for f in fs
                if key in f
            )

        rows.append(
            Row(
                f"ours / {rev}: {name}",
                median(a) / median(b),
                "x",
                target,
                note=f"{median(a) * scale:.3g} / {median(b) * scale:.3g} {unit}"
                + (f"; runs: ours {listed(ours)}; {rev} {listed(theirs)}" if len(ours) > 1 else ""),
            )
        )
    contended = sum(1 for f in [*ours, *theirs] if f.get("contended"))
    notes = []
    if contended:
        notes.append(
            f"{contended} of {len(ours) + len(theirs)} runs (marked *) saw other p2pfl/pytest "
            "processes; "
            + ("the ratios leave them out" if use_clean else "too few clean runs: all are used")
        )
    return rows, notes


def run(
    rounds: int | None = None,
    keep: Path | None = None,
    steps: bool = True,
    against: str | None = None,
    repeat: int = 1,
) -> tuple[list[Row], list[str]]:
    """Launch the quickstart, probe the compute, analyse; with `against`, the same on
    that revision (alternating, `repeat` times each) and ours / theirs. Rows and notes."""
    cores = len(os.sched_getaffinity(0))
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rounds-"))
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        codes = [OURS]
        if against:
            codes.append(stack.enter_context(checkout(against)))
        figures: dict[str, list[dict[str, float]]] = {c.label: [] for c in codes}
        results: dict[str, tuple[list[Row], list[str], float]] = {}
        n = repeat if against else 1
        for i in range(n):
            for code in codes if i % 2 == 0 else codes[::-1]:
                sub = folder / (code.label if n == 1 else f"{code.label}-{i + 1}")
                rows, notes, figs = measure(sub, cores, rounds, code)
                figures[code.label].append(figs)
                if code.label not in results or (results[code.label][2] and not figs["contended"]):
                    results[code.label] = (rows, notes, figs["contended"])
        rows, notes, _ = results[OURS.label]
        if n > 1:
            notes = [*notes, f"rows above the ratios: the first clean run of ours (of {n})"]
        if steps:
            step, check = round_steps(folder / "steps")
            rows += step_rows(step, peers_of(QUICKSTART), cores, check)
            notes.append(
                "step rows: one round of peer 0 taken apart, uncontended, alone on one core "
                "(bench/_probe.py overhead: the real GossipPeer and its machine, two stand-in "
                "neighbours' sockets in the same process)"
            )
        if against:
            theirs = codes[1]
            compared, compared_notes = compare_rows(
                figures[OURS.label], figures[theirs.label], theirs.label
            )
            rows += compared
            notes += compared_notes
            their_rows, _, _ = results[theirs.label]
            rows += [
                Row(f"  {theirs.label}: {r.metric.strip()}", r.value, r.unit, note=r.note)
                for r in their_rows
            ]
            if steps:
                try:
                    step, check = round_steps(folder / f"steps-{theirs.label}", code=theirs)
                    rows += step_rows(step, peers_of(QUICKSTART), cores, check, theirs.label)
                except RuntimeError as exc:
                    notes.append(f"{theirs.label}'s step probe failed: {str(exc)[-300:]}")
            notes.append(
                f"against {theirs.label}: the same launch and analysis run on a git worktree "
                f"of {against} ({n} run(s) each, alternating); its compute and step rows "
                f"come from its own bench/_probe.py (its steps are its own split of its round)"
            )
    return rows, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, help="override training.rounds (default: the file's)")
    p.add_argument("--keep", type=Path, help="keep the run folders here")
    p.add_argument("--no-steps", action="store_true", help="skip the per-step probe")
    p.add_argument(
        "--against",
        metavar="REV",
        help="also measure git revision REV (a temporary worktree) and print ours / REV",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="with --against: alternate the two N times, compare medians (default 1)",
    )
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    rows, notes = run(args.rounds, args.keep, not args.no_steps, args.against, args.repeat)
    title = "rounds: quickstart time split and round overhead"
    print_table(title + (f", against {args.against}" if args.against else ""), rows, [*pre, *notes])


if __name__ == "__main__":
    main()
