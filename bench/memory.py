"""Peak memory of the quickstart's peer processes: RSS, PSS and USS, sampled while running.

Launches the quickstart (a free base port, run folder in a temp dir) and samples every
peer process (children of `p2pfl launch`) every 50 ms with psutil's
memory_full_info(): RSS counts every resident page a process maps, shared library
pages included, so RSS summed over peers counts jaxlib's code 8 times; PSS divides
each shared page among the processes that map it, so summed PSS is what the peers
really take from the machine; USS is each process's private memory. Per-peer peak RSS
also comes from the kernel's high-water mark (VmHWM), which sampling cannot miss.

For attribution, the peer with the largest RSS at the summed peak has its mappings
grouped by kind (psutil memory_maps), and one peer's start-up is replayed alone
(bench/_probe.py startup) to show which step adds how much RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
    Watch,
    add_quiet_arg,
    launch,
    peer_processes,
    peers_of,
    preamble,
    print_table,
    run_probe,
    scenario_copy,
    wait_launch,
)

MB = 1e6
TARGET_PER_PEER_MB = 250.0


def _hwm(pid: int) -> int:
    """Peak RSS (VmHWM) in bytes from /proc, 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _category(path: str) -> str:
    if not path or path.startswith("[anon") or path == "[heap]":
        return "anonymous + heap (Python objects, malloc, XLA buffers)"
    if path.startswith("["):
        return "other ([stack], [vdso], ...)"
    if "jaxlib" in path or "xla" in path.lower():
        return "jaxlib shared objects (file-backed, shared)"
    if ".so" in path:
        return "other shared objects (numpy, zmq, python, ...)"
    return "other files"


def _maps(proc: psutil.Process) -> dict[str, tuple[int, int]]:
    """category -> (rss, pss) bytes of one process's mappings."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for m in proc.memory_maps(grouped=True):
        c = _category(m.path)
        out[c][0] += m.rss
        out[c][1] += m.pss
    return {k: (v[0], v[1]) for k, v in out.items()}


def sample(proc: subprocess.Popen[bytes], period_s: float = 0.05) -> dict[str, object]:
    """Sample the launcher's children until it exits; peaks and a map of the top peer."""
    launcher = psutil.Process(proc.pid)
    peak = {"rss": 0, "pss": 0, "uss": 0}
    hwm: dict[int, int] = {}
    launcher_rss = 0
    top_maps: dict[str, tuple[int, int]] = {}
    top_rss, last_maps = 0, 0.0
    n_samples = 0
    while proc.poll() is None:
        try:
            children = peer_processes(launcher)
            launcher_rss = max(launcher_rss, launcher.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        tot = {"rss": 0, "pss": 0, "uss": 0}
        biggest: tuple[int, psutil.Process | None] = (0, None)
        for c in children:
            try:
                mi = c.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            tot["rss"] += mi.rss
            tot["pss"] += mi.pss
            tot["uss"] += mi.uss
            hwm[c.pid] = max(hwm.get(c.pid, 0), _hwm(c.pid), mi.rss)
            if mi.rss > biggest[0]:
                biggest = (mi.rss, c)
        n_samples += 1
        peak = {k: max(v, tot[k]) for k, v in peak.items()}
        now = time.monotonic()
        if biggest[1] is not None and biggest[0] > top_rss and now - last_maps > 0.3:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                top_maps, top_rss, last_maps = _maps(biggest[1]), biggest[0], now
        time.sleep(period_s)
    return {
        "peak": peak,
        "hwm": hwm,
        "launcher_rss": launcher_rss,
        "maps": top_maps,
        "maps_rss": top_rss,
        "samples": n_samples,
    }


def rss_by_step(folder: Path) -> list[tuple[str, int]]:
    """(start-up step, RSS added by it) for one peer alone (probe)."""
    scenario = scenario_copy(folder, training={"rounds": 1})
    out, _ = run_probe("startup", str(scenario), "0", str(folder))
    steps, prev = [], 0
    for line in out.splitlines():
        e = json.loads(line)
        steps.append((e["step"], e["rss"] - prev))
        prev = e["rss"]
    return steps


def run(probe: bool = True) -> tuple[list[Row], list[str]]:
    """Launch the quickstart once while sampling; rows and notes."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = Path(tmp)
        scenario = scenario_copy(folder)
        peers = peers_of(scenario)
        with Watch() as watch:
            proc = launch(scenario, folder / "run")
            s = sample(proc)
            wait_launch(proc)
        hwm: dict[int, int] = s["hwm"]  # type: ignore[assignment]
        peak: dict[str, int] = s["peak"]  # type: ignore[assignment]
        if len(hwm) != peers:
            raise RuntimeError(f"sampled {len(hwm)} peer processes, expected {peers}")
        per_peer = sorted(hwm.values())
        rows = [
            Row(
                "max per-peer peak RSS (VmHWM)",
                per_peer[-1] / MB,
                "MB",
                TARGET_PER_PEER_MB,
                note=f"= {per_peer[-1] / 2**20:.0f} MiB; min {per_peer[0] / MB:.0f} MB, "
                f"mean {sum(per_peer) / len(per_peer) / MB:.0f} MB",
            ),
            Row(
                "peak summed RSS over peers",
                peak["rss"] / MB,
                "MB",
                TARGET_PER_PEER_MB * peers,
                note=f"{peak['rss'] / peers / MB:.0f} MB per peer; counts shared pages {peers}x",
            ),
            Row(
                "peak summed PSS over peers",
                peak["pss"] / MB,
                "MB",
                note=f"{peak['pss'] / peers / MB:.0f} MB per peer; shared pages divided",
            ),
            Row(
                "peak summed USS over peers",
                peak["uss"] / MB,
                "MB",
                note=f"{peak['uss'] / peers / MB:.0f} MB per peer; private pages only",
            ),
            Row(
                "launcher process peak RSS",
                s["launcher_rss"] / MB,
                "MB",  # type: ignore[operator]
                note="p2pfl launch itself (not a peer)",
            ),
        ]
        maps: dict[str, tuple[int, int]] = s["maps"]  # type: ignore[assignment]
        for cat, (rss, pss) in sorted(maps.items(), key=lambda kv: -kv[1][0]):
            rows.append(
                Row(f"  biggest peer: {cat}", rss / MB, "MB", note=f"PSS {pss / MB:.0f} MB")
            )
        top_mb = int(s["maps_rss"]) / MB  # type: ignore[call-overload]
        notes = [
            *filter(None, [watch.note("the launch")]),
            f"{s['samples']} samples every 50 ms; MB = 10^6 bytes; target "
            f"{TARGET_PER_PEER_MB:.0f} MB RSS per peer (x {peers} for the sum)",
            f"'biggest peer' rows: mappings of the largest peer at {top_mb:.0f} MB RSS, "
            "grouped by kind (RSS, with PSS in the note)",
        ]
        if probe:
            (folder / "probe").mkdir()
            steps = rss_by_step(folder / "probe")
            for name, added in steps:
                if added / MB >= 2:
                    rows.append(Row(f"  start-up step adds: {name}", added / MB, "MB"))
            notes.append(
                "'start-up step adds' rows: RSS growth per step of one peer's start-up "
                "replayed alone (bench/_probe.py startup); steps under 2 MB omitted"
            )
    return rows, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-probe", action="store_true", help="skip the per-step RSS probe")
    add_quiet_arg(p)
    args = p.parse_args()
    pre = preamble(args.wait_quiet)
    rows, notes = run(not args.no_probe)
    print_table("memory: quickstart peer processes (8 peers)", rows, [*pre, *notes])


if __name__ == "__main__":
    main()
