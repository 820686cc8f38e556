"""The coordinator's robust aggregators against Byzantine peers in centralized mode."""

from __future__ import annotations

import json

from conftest import read_jsonl

PEERS = 5
BYZANTINE = [0]  # 1 of 5 peers (20%)
ROUNDS = 30
# One local epoch per round: with two, the honest peers re-learn enough each round that
# a 20% sign flip (the global model shrinks to about 0.6 x the honest mean) costs only
# ~14 points; with one it costs ~45, and the fault-free run still ends near 0.97.
TRAINING = {"rounds": ROUNDS, "local_epochs": 1}
COLLAPSE = 0.20  # plain FedAvg under attack ends at least this far below the fault-free run
TRIMMED_SLACK = 0.02  # trimmed_mean ends within this of the fault-free run
KRUM_SLACK = 0.02  # multi-Krum (the mean of the n - f best updates) too


def robust_scenario(make_scenario, name, attack=None, aggregator="mean"):
    """The quickstart's model and data, centralized over 5 peers, peer 0 Byzantine when
    `attack` is given; trim and krum_f are the number of Byzantine peers."""
    faults = [{"peer": b, "attack": attack} for b in BYZANTINE] if attack else []
    f = len(BYZANTINE)
    return make_scenario(
        {
            "name": name,
            "mode": "centralized",
            "topology": {"peers": PEERS},
            "training": TRAINING,
            "centralized": {"aggregator": aggregator, "trim": f, "krum_f": f},
            "faults": {"byzantine": faults},
        }
    )


def server_result(run, timeout=300):
    """The server's final holdout accuracy and the run's wall time, once the launch has
    exited 0 with every round closed on all five updates (the Byzantine one included)."""
    rc, output = run.wait(timeout=timeout)
    assert rc == 0, output
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["completed_peers"] == list(range(PEERS)), summary
    rows = read_jsonl(run.out / "coordinator.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for r in rows[1:]:  # the poisoned update reached the aggregator every round
        assert r["closed_by"] == "all_in" and r["participants"] == list(range(PEERS)), r
    return rows[-1]["holdout_accuracy"], summary["wall_s"]


def test_byzantine_peers_break_fedavg_and_robust_server_rules_hold(make_scenario, launch_run):
    """20% Byzantine: sign_flip and scale (x -4) collapse plain FedAvg by 20+ points; Krum
    and the trimmed mean keep the server's model near the fault-free run's."""
    runs = {  # name: (attack, aggregator); all five run at once
        "clean": (None, "mean"),
        "sign_flip-mean": ("sign_flip", "mean"),
        "scale-mean": ("scale", "mean"),
        "sign_flip-krum": ("sign_flip", "krum"),
        "scale-trimmed_mean": ("scale", "trimmed_mean"),
    }
    started = {
        name: launch_run(robust_scenario(make_scenario, name, attack, aggregator), name)
        for name, (attack, aggregator) in runs.items()
    }
    results = {name: server_result(run) for name, run in started.items()}
    acc = {name: a for name, (a, _) in results.items()}
    shown = {name: f"acc {a:.4f}, {w:.1f} s" for name, (a, w) in results.items()}
    clean = acc["clean"]
    assert clean >= 0.95, shown  # the fault-free run learned
    for plain in ("sign_flip-mean", "scale-mean"):
        assert acc[plain] <= clean - COLLAPSE, (plain, shown)
    assert acc["scale-trimmed_mean"] >= clean - TRIMMED_SLACK, shown
    assert acc["sign_flip-krum"] >= clean - KRUM_SLACK, shown
    for robust in ("sign_flip-krum", "scale-trimmed_mean"):  # far above what the attack does
        assert acc[robust] >= max(acc["sign_flip-mean"], acc["scale-mean"]) + COLLAPSE, shown
