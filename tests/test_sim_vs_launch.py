"""The simulator computes what the deployment computes: `p2pfl launch` (real processes
and sockets) and `p2pfl simulate` give the same final models and the same per-round
mean holdout accuracy, for scenarios without wall-time faults.

The measured differences are printed (run with `-s` to see them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import read_jsonl

pytestmark = pytest.mark.slow

MODEL_TOL = 1e-4  # max abs difference of the final models
MIXING_TOL = 1e-6  # ... with learning_rate = 0 (pure mixing)


def _models(out: Path, peers: int) -> np.ndarray:
    return np.stack([np.load(out / "models" / f"peer-{i}.npz")["params"] for i in range(peers)])


def _mean_holdout(out: Path, peers: int) -> dict[int, float]:
    by_round: dict[int, list[float]] = {}
    for i in range(peers):
        for row in read_jsonl(out / f"peer-{i}.jsonl"):
            if row["holdout_accuracy"] is not None:
                by_round.setdefault(row["round"], []).append(row["holdout_accuracy"])
    return {r: float(np.mean(v)) for r, v in sorted(by_round.items())}


def _holdout_size(out: Path) -> int:
    from p2pfl.config.learning import learning_spec
    from p2pfl.config.loader import load
    from p2pfl.learning.local import host_data

    s = load(next(out.parent.glob("*.toml")))
    host, _ = host_data(learning_spec(s).data, [0])
    assert host.holdout is not None
    return int(host.holdout[2])


def _both(make_scenario, launch_run, overrides, timeout=240.0):
    path = make_scenario(overrides)
    launched = launch_run(path, "launch")
    code, output = launched.wait(timeout)
    assert code == 0, output
    simulated = launch_run(path, "sim", command="simulate")
    code, output = simulated.wait(timeout)
    assert code == 0, output
    return launched.out, simulated.out


def _same(launched: Path, simulated: Path, peers: int, tol: float, what: str) -> None:
    a, b = _models(launched, peers), _models(simulated, peers)
    diff = float(np.abs(a - b).max())
    curves = _mean_holdout(launched, peers), _mean_holdout(simulated, peers)
    assert curves[0].keys() == curves[1].keys()
    acc_diff = max(abs(curves[0][r] - curves[1][r]) for r in curves[0])
    one_sample = 1.0 / _holdout_size(launched)
    print(f"{what}: max |launch - sim| model {diff:.2e}, mean holdout {acc_diff:.2e}")
    assert diff <= tol, f"{what}: final models differ by {diff:.3e} (> {tol:g})"
    assert acc_diff <= one_sample + 1e-9, f"{what}: mean holdout differs by {acc_diff}"


def test_ring_of_8(make_scenario, launch_run):
    out = _both(make_scenario, launch_run, {"training": {"rounds": 6}})
    _same(*out, 8, MODEL_TOL, "ring of 8")


def test_pure_mixing(make_scenario, launch_run):
    overrides = {
        "training": {"rounds": 6, "learning_rate": 0.0},
        "model": {"init": "per_peer"},
    }
    out = _both(make_scenario, launch_run, overrides)
    _same(*out, 8, MIXING_TOL, "pure mixing, ring of 8")


def test_torus_of_16_dirichlet(make_scenario, launch_run):
    overrides = {
        "topology": {"kind": "torus", "peers": 16},
        "data": {"partition": "dirichlet", "alpha": 0.3},
        "training": {"rounds": 4, "local_epochs": 1},
    }
    out = _both(make_scenario, launch_run, overrides)
    _same(*out, 16, MODEL_TOL, "torus of 16, dirichlet 0.3")


def test_centralized_half_sampled(make_scenario, launch_run):
    overrides = {
        "mode": "centralized",
        "centralized": {"fraction": 0.5},
        "training": {"rounds": 6},
    }
    launched, simulated = _both(make_scenario, launch_run, overrides)
    _same(launched, simulated, 8, MODEL_TOL, "centralized, fraction 0.5")
    a = read_jsonl(launched / "coordinator.jsonl")
    b = read_jsonl(simulated / "coordinator.jsonl")
    assert [r["sampled"] for r in a] == [r["sampled"] for r in b]
    assert [r["participants"] for r in a] == [r["participants"] for r in b]
    g = [np.load(o / "models" / "global.npz")["params"] for o in (launched, simulated)]
    assert float(np.abs(g[0] - g[1]).max()) <= MODEL_TOL


def test_byzantine_with_adaptive_clipping(make_scenario, launch_run):
    overrides = {
        "topology": {"kind": "regular", "degree": 4, "peers": 10},
        "gossip": {"aggregator": "clipping", "clip_tau": "adaptive"},
        "training": {"rounds": 4, "local_epochs": 1},
        "faults": {
            "byzantine": [
                {"peer": 1, "attack": "sign_flip"},
                {"peer": 4, "attack": "gaussian", "sigma": 2.0},
                {"peer": 7, "attack": "scale", "factor": -3.0},
            ]
        },
    }
    out = _both(make_scenario, launch_run, overrides)
    _same(*out, 10, MODEL_TOL, "3 Byzantine, adaptive clipping")
