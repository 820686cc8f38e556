"""Secure aggregation's cost: a round with masked updates against plain FedAvg.

Launches the quickstart in centralized mode (8 peers, real processes and sockets)
without and with `[privacy] secure_aggregation`, alternating, and reports the median
of the coordinator's `round_s` (rounds 1..) and their ratio; then, in process, what the
maths costs a peer (quantise + masks against the 7 others) and the server (unmask
the sum, also with one dropped peer recovered) for a 1M-parameter update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from p2pfl.app.ports import free_base_port
from p2pfl.config.schema import dumps
from p2pfl.core import secagg


def launched_round_s(secure: bool, rounds: int, folder: Path) -> float:
    raw: dict = {
        "name": "secagg-bench",
        "mode": "centralized",
        "training": {"rounds": rounds},
        "network": {"base_port": free_base_port(10)},
        "privacy": {"secure_aggregation": secure},
    }
    path = folder / "s.toml"
    path.write_text(dumps(raw))
    out = folder / "run"
    subprocess.run(
        [sys.executable, "-m", "p2pfl", "launch", str(path), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    lines = [json.loads(x) for x in (out / "coordinator.jsonl").read_text().splitlines()]
    return statistics.median(x["round_s"] for x in lines[1:])


def maths(n: int, d: int) -> tuple[float, float, float]:
    """Seconds: one peer's quantise + masks, the server's unmask, and unmask with a
    dropped peer's masks recovered."""
    rng = np.random.default_rng(0)
    pairs = {u: secagg.keypair() for u in range(n)}
    seeds = {u: rng.bytes(32) for u in range(n)}
    publics = {u: p.public for u, p in pairs.items()}
    scale = secagg.scale_for(1.0, n)
    delta = rng.normal(0, 0.01, d)
    t = time.perf_counter()
    inputs = {}
    for u in range(n):
        q = secagg.quantise(delta, 1 / n, scale, 1.0)
        others = {v: publics[v] for v in range(n) if v != u}
        inputs[u] = secagg.masked(q.values, seeds[u], pairs[u].secret, others, u, 1)
    peer_s = (time.perf_counter() - t) / n
    t = time.perf_counter()
    secagg.unmask(inputs, seeds, {}, publics, 1)
    server_s = time.perf_counter() - t
    del inputs[n - 1]
    t = time.perf_counter()
    secagg.unmask(inputs, seeds, {n - 1: pairs[n - 1].secret}, publics, 1)
    return peer_s, server_s, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    got: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for secure in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                got[secure].append(launched_round_s(secure, args.rounds, Path(tmp)))
    plain, masked = statistics.median(got[False]), statistics.median(got[True])
    print(f"quickstart centralized, 8 peers, {args.rounds} rounds x {args.repeats}:")
    print(f"  round_s plain FedAvg   {plain:.3f} s  (runs: {got[False]})")
    print(f"  round_s secure agg.    {masked:.3f} s  (runs: {got[True]})")
    print(f"  ratio secure / plain   {masked / plain:.2f}")
    peer_s, server_s, dropped_s = maths(8, 1_000_000)
    print("maths, 8 peers, 1M parameters:")
    print(f"  peer: quantise + 7 masks  {peer_s * 1e3:.1f} ms")
    print(f"  server: unmask the sum    {server_s * 1e3:.1f} ms")
    print(f"  ... with 1 dropped peer   {dropped_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
