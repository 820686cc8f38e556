"""Secure aggregation in real runs: the masked FedAvg equals the plain one on the
quickstart, and a sampled peer SIGKILLed after its masks were fixed neither stalls nor
corrupts the round; the simulator gives the same global models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_jsonl

pytestmark = pytest.mark.slow

CENTRAL = {"mode": "centralized", "output": {"models": "every_round"}}


def _global(out, r):
    return np.load(out / "models" / f"round-{r}" / "global.npz")["params"]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_masked_fedavg_equals_plain_fedavg_on_the_quickstart(make_scenario, launch_run):
    """8 peers, 3 rounds, the quickstart's MLP: round 1's global model (the same start,
    the same updates) within 1e-5 relative of plain FedAvg; the later ones stay close."""
    rounds = {"training": {"rounds": 3}}
    plain = make_scenario({"name": "plain", **CENTRAL, **rounds})
    secure = make_scenario(
        {"name": "secure", **CENTRAL, **rounds, "privacy": {"secure_aggregation": True}}
    )
    runs = [launch_run(plain, "plain"), launch_run(secure, "secure")]
    for run in runs:
        rc, out = run.wait(timeout=240)
        assert rc == 0, out
    a, b = (run.out for run in runs)
    rel = [_rel(_global(b, r), _global(a, r)) for r in (1, 2, 3)]
    print(f"masked vs plain FedAvg, relative difference by round: {rel}")
    assert rel[0] <= 1e-5
    assert not np.array_equal(_global(b, 1), _global(a, 1))  # quantised: not the plain mean
    assert max(rel) <= 1e-4
    lines = read_jsonl(b / "coordinator.jsonl")
    assert lines[0]["secagg"] is None
    for line in lines[1:]:
        assert line["closed_by"] == "all_in" and line["participants"] == list(range(8))
        s = line["secagg"]
        assert (s["fixed"], s["survivors"], s["recovered"], s["threshold"]) == (8, 8, [], 5)
        assert s["out_of_range"] == 0
    assert all(line["secagg"] is None for line in read_jsonl(a / "coordinator.jsonl"))


def test_a_peer_killed_after_masking_is_recovered_and_rounds_go_on(make_scenario, launch_run):
    """5 peers over CURVE (t = 3; each round's keys vouched for by the peers' CurveZMQ
    keys); peer 2 is SIGKILLed in round 2 once its masks are fixed, before
    its masked input goes out, and restarted from its checkpoint: round 2 closes early
    with the other four, its masks recovered from their shares; rounds 3-4 go on with
    all five. The simulator, which leaves the crashed peer out of round 2 and back from
    round 3, gives the same global models."""
    scenario = make_scenario(
        {
            "name": "secagg-crash",
            **CENTRAL,
            "topology": {"kind": "ring", "peers": 5},
            "training": {"rounds": 4},
            "centralized": {"peer_timeout_s": 2.0, "heartbeat_s": 0.25},
            "privacy": {"secure_aggregation": True},
            "security": {"keys": "auto"},  # CURVE, and each round's keys vouched for
            "faults": {
                "crash": [
                    {"peer": 2, "at_round": 2, "phase": "after_masking", "rejoin_after_s": 0.5}
                ]
            },
        }
    )
    launched = launch_run(scenario, "launch")
    rc, out = launched.wait(timeout=240)
    assert rc == 0, out
    lines = read_jsonl(launched.out / "coordinator.jsonl")
    assert lines[1]["participants"] == list(range(5))
    two = lines[2]
    assert two["closed_by"] == "early" and two["participants"] == [0, 1, 3, 4]
    assert two["missing"] == [2] and two["secagg"]["recovered"] == [2]
    assert two["secagg"]["fixed"] == 5 and two["secagg"]["survivors"] == 4
    for line in lines[3:]:
        assert line["participants"] == list(range(5)) and line["closed_by"] == "all_in"
    summary = json.loads((launched.out / "summary.json").read_text())
    assert summary["crashed_peers"] == [] and summary["failed_peers"] == []
    sim = launch_run(scenario, "sim", command="simulate")
    rc, out = sim.wait(timeout=240)
    assert rc == 0, out
    final = [np.load(run.out / "models" / "global.npz")["params"] for run in (launched, sim)]
    assert float(np.abs(final[0] - final[1]).max()) <= 1e-4  # test_sim_vs_launch's MODEL_TOL
    simulated = read_jsonl(sim.out / "coordinator.jsonl")
    assert [x["participants"] for x in simulated] == [x["participants"] for x in lines]
    for x, y in zip(simulated, lines, strict=True):
        assert x["holdout_accuracy"] == pytest.approx(y["holdout_accuracy"], abs=0.01)
