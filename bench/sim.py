"""The simulator's speed and memory, measured in one run against its floor and anchors.

1. A round of 1,000 peers (MLP 64-64-10, 5 local SGD steps of batch 32, ring gossip,
   digits-shaped synthetic data) against a bare `jax.vmap` of the same train steps plus
   a ring mix of the same shapes, measured here in the same run: the floor.
2. 10,000 peers of the same model at one local step, run to completion in a fresh
   process: peak RSS (ru_maxrss).
3. digits, 8 / 100 / 1,000 peers, 30 rounds, FedAvg and ring gossip, the anchors'
   task (sklearn digits /16, 20% holdout, IID shards, MLP 64-64-10, 1 epoch batch 32,
   SGD 0.05): the whole `p2pfl simulate` command as a user runs it (interpreter start,
   imports, the run, its folder, progress bar and plot, exit) with a warm compile
   cache, and its peak RSS, against pfl-research, Flower and gossipy as measured on
   this machine (see issue 13); beside it, the run alone (`p2pfl.sim.engine.simulate`
   from a process whose imports are done). digits has too few samples for 1,000 peers
   to keep one test sample each: that row uses digits-shaped synthetic data of 2,500
   samples.

Each measured run is its own process (`_one`, `_command`), so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, add_quiet_arg, preamble, print_table

from p2pfl.config.schema import dumps as to_toml

PFL = {8: 4.0, 100: 5.9, 1000: 22.2}  # s, pfl-research 0.6.0, FedAvg
PFL_MB = 400.0
FLOWER = {8: 21.0, 100: 30.8}  # s (8: 21-24 s), Flower 1.42 simulation
FLOWER_MB = 2370.0  # at 100 clients
GOSSIPY = {100: 21.4, 1000: 174.0}  # s, gossipy-dfl 0.0.1 ring

ONE = r"""
import json, resource, sys, time
from pathlib import Path
import p2pfl
from p2pfl.runtime import process
process.enable_compile_cache()
raw = json.loads(sys.argv[1])
t = time.perf_counter()
ticks = []
from p2pfl.config.plan import sim_plan
from p2pfl.app.api import scenario_of
from p2pfl.sim.engine import simulate
s = scenario_of(raw)
res = simulate(sim_plan(s, Path(sys.argv[2])), lambda d: ticks.append(time.perf_counter()))
wall = time.perf_counter() - t
rounds = [b - a for a, b in zip(ticks, ticks[1:])]
print(json.dumps({
    "wall_s": wall,
    "round_s": sorted(rounds)[len(rounds) // 2] if rounds else None,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "accuracy": res.summary["final_holdout_accuracy"]["mean"],
}))
"""

FLOOR = r"""
import json, time
import jax, jax.numpy as jnp, optax
n, f, c, h, steps, bs = 1000, 64, 10, 64, 5, 32
key = jax.random.PRNGKey(0)
def init(k):
    a, b = jax.random.split(k)
    return {"w1": jax.random.normal(a, (f, h)) * 0.1, "b1": jnp.zeros(h),
            "w2": jax.random.normal(b, (h, c)) * 0.1, "b2": jnp.zeros(c)}
def loss(p, x, y):
    z = jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
opt = optax.sgd(0.05)
def train(p, x, y):
    s = opt.init(p)
    def step(carry, batch):
        p, s = carry
        g = jax.grad(loss)(p, *batch)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(step, (p, s), (x, y))
    return p
@jax.jit
def round_(params, x, y):
    params = jax.vmap(train)(params, x, y)
    ring = lambda a: (a + jnp.roll(a, 1, 0) + jnp.roll(a, -1, 0)) / 3
    return jax.tree_util.tree_map(ring, params)
params = jax.vmap(init)(jax.random.split(key, n))
x = jax.random.normal(key, (n, steps, bs, f))
y = jax.random.randint(key, (n, steps, bs), 0, c)
jax.block_until_ready(round_(params, x, y))
times = []
for _ in range(7):
    t = time.perf_counter()
    params = jax.block_until_ready(round_(params, x, y))
    times.append(time.perf_counter() - t)
print(json.dumps({"round_s": sorted(times)[3]}))
"""


def _one(raw: dict, warm: bool = True) -> dict:
    """One simulated run in a fresh process (run twice when `warm`: the first fills
    the compile cache); its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2 if warm else 1):
            done = subprocess.run(
                [sys.executable, "-c", ONE, json.dumps(raw), str(Path(tmp) / "run")],
                capture_output=True,
                text=True,
                check=True,
            )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _command(raw: dict) -> dict:
    """`p2pfl simulate` on `raw`, run twice (the first fills the compile cache): the
    second run's whole-process wall time and peak RSS (`os.wait4`), and its accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        scenario, out = Path(tmp) / "scenario.toml", Path(tmp) / "run"
        scenario.write_text(to_toml(raw))
        command = [sys.executable, "-m", "p2pfl", "simulate", str(scenario), "--out", str(out)]
        for _ in range(2):
            t = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - t
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode != 0:
                raise RuntimeError(f"p2pfl simulate exited {child.returncode}")
        summary = json.loads((out / "summary.json").read_text())
    return {
        "wall_s": wall,
        "rss_mb": usage.ru_maxrss / 1024,
        "accuracy": summary["final_holdout_accuracy"]["mean"],
    }


def _floor() -> float:
    done = subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["round_s"])


def _digits(peers: int, mode: str, rounds: int = 30) -> dict:
    data: dict = {"dataset": "digits", "partition": "iid", "test_fraction": 0.2}
    if peers > 500:  # digits cannot give 1,000 peers a test sample each
        data = {
            "dataset": "synthetic",
            "synthetic_samples": 2500,
            "synthetic_features": 64,
            "synthetic_classes": 10,
        }
    return {
        "name": f"bench-{mode}-{peers}",
        "mode": mode,
        "topology": {"kind": "ring", "peers": peers},
        "data": data,
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {
            "rounds": rounds,
            "local_epochs": 1,
            "batch_size": 32,
            "optimizer": "sgd",
            "learning_rate": 0.05,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the 10,000-peer run")
    add_quiet_arg(p)
    args = p.parse_args()
    notes = preamble(args.wait_quiet)
    rows: list[Row] = []

    # 1. a round of 1,000 peers against the vmapped floor
    floor = _floor()
    per_peer = 5 * 32 / (0.8 * 0.8)  # 5 batches of 32 after the holdout and test splits
    big = _digits(1000, "gossip", rounds=8)
    big["data"] = {
        "dataset": "synthetic",
        "synthetic_samples": int(1000 * per_peer) + 10,
        "synthetic_features": 64,
        "synthetic_classes": 10,
    }
    big["sim"] = {"eval_every": 1000}  # the floor evaluates nothing: evaluate only at the end
    ours = _one(big)
    rows.append(Row("1,000 peers: floor round (bare vmap + ring mix)", floor, "s"))
    rows.append(
        Row(
            "1,000 peers: our round (median of 8)",
            ours["round_s"],
            "s",
            target=2 * floor,
            note="target: 2 x the floor; sim.eval_every = 1000",
        )
    )

    # 2. 10,000 peers at one local step
    if not args.quick:
        huge = _digits(10_000, "gossip", rounds=3)
        huge["data"] = {
            "dataset": "synthetic",
            "synthetic_samples": 10_000 * 3,
            "synthetic_features": 64,
            "synthetic_classes": 10,
            "test_fraction": 0.02,
        }
        huge["sim"] = {"eval_every": 1000}
        r = _one(huge)
        rows.append(Row("10,000 peers, 3 rounds: peak RSS", r["rss_mb"], "MB", target=4096))
        rows.append(Row("10,000 peers, 3 rounds: wall", r["wall_s"], "s"))

    # 3. the anchors' task
    for peers in (8, 100, 1000):
        for mode in ("centralized", "gossip"):
            raw = _digits(peers, mode)
            r, alone = _command(raw), _one(raw)
            label = f"digits {peers} peers, {mode}, 30 rounds"
            if mode == "centralized":
                target = PFL[peers] / (5 if peers == 1000 else 2)
                note = f"pfl {PFL[peers]} s / {5 if peers == 1000 else 2}" + (
                    f"; Flower {FLOWER[peers]} s" if peers in FLOWER else ""
                )
            else:
                target = GOSSIPY[peers] / 10 if peers in GOSSIPY else None
                note = f"gossipy {GOSSIPY[peers]} s / 10" if target else ""
            rows.append(Row(f"{label}: p2pfl simulate, wall", r["wall_s"], "s", target, note=note))
            rows.append(
                Row(
                    f"{label}: p2pfl simulate, peak RSS",
                    r["rss_mb"],
                    "MB",
                    target=PFL_MB if mode == "centralized" else None,
                    note=(f"pfl ~{PFL_MB:g} MB; " if mode == "centralized" else "")
                    + f"accuracy {r['accuracy']:.3f}",
                )
            )
            rows.append(
                Row(
                    f"{label}: the run alone (imports done), wall",
                    alone["wall_s"],
                    "s",
                    note=f"peak RSS {alone['rss_mb']:.0f} MB (no progress bar, no plot)",
                )
            )
    print_table("simulator: one process, every peer stacked", rows, notes)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"took {time.perf_counter() - t0:.0f} s")
