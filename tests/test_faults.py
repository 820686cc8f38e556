"""Injected faults: crashed peers, Byzantine peers against plain and robust aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_jsonl


def finished(run, timeout=300):
    """Wait for a launch and return its summary (the launch must exit 0)."""
    rc, output = run.wait(timeout=timeout)
    assert rc == 0, output
    return json.loads((run.out / "summary.json").read_text())


def final_accuracy(run, peers):
    """Mean final holdout accuracy over `peers`."""
    return float(
        np.mean([read_jsonl(run.out / f"peer-{i}.jsonl")[-1]["holdout_accuracy"] for i in peers])
    )


def test_quarter_of_a_torus_crashes_and_the_survivors_finish(make_scenario, launch_run):
    """4 of 16 peers SIGKILLed at random rounds: the rest finish within 1 point of no faults."""
    rng = np.random.default_rng(3)
    victims = sorted(int(i) for i in rng.choice(16, size=4, replace=False))
    at = {v: int(r) for v, r in zip(victims, rng.integers(5, 30, size=4), strict=True)}
    gossip = {"round_timeout_s": 5.0, "peer_timeout_s": 1.0, "heartbeat_s": 0.25}
    clean = launch_run(make_scenario({"name": "clean", "gossip": gossip}, base="torus"), "clean")
    clean_summary = finished(clean)
    crashes = [{"peer": v, "at_round": r} for v, r in at.items()]
    scenario = make_scenario(
        {"name": "crashes", "gossip": gossip, "faults": {"crash": crashes}}, base="torus"
    )
    run = launch_run(scenario, "crashes")
    summary = finished(run)
    survivors = [i for i in range(16) if i not in at]
    assert summary["crashed_peers"] == victims and summary["failed_peers"] == []
    assert summary["completed_peers"] == survivors
    for v, r in at.items():  # each victim died as it reached its round
        assert read_jsonl(run.out / f"peer-{v}.jsonl")[-1]["round"] == r - 1
    for i in survivors:
        assert read_jsonl(run.out / f"peer-{i}.jsonl")[-1]["round"] == 40
    clean_mean = clean_summary["final_holdout_accuracy"]["mean"]
    assert abs(final_accuracy(run, survivors) - clean_mean) <= 0.01, clean_mean
    assert run.peer_processes() == []


BYZANTINE = [0, 7, 14]  # 3 of 16 peers (19%)


def byzantine_scenario(make_scenario, name, attack=None, aggregator="mean"):
    """16 peers on a 6-regular graph, the quickstart's model and training (30 rounds), 3
    Byzantine; the robust rule is adaptive self-centred clipping of the farthest 45% of
    the weight, leaving out neighbours farther than twice the clipping radius."""
    faults = [{"peer": b, "attack": attack} for b in BYZANTINE] if attack else []
    return make_scenario(
        {
            "name": name,
            "topology": {"kind": "regular", "peers": 16, "degree": 6},
            "training": {"rounds": 30},
            "gossip": {
                "aggregator": aggregator,
                "clip_tau": "adaptive",
                "clip_fraction": 0.45,
                "clip_drop": 2.0,
            },
            "faults": {"byzantine": faults},
        }
    )


# how far below the fault-free run plain mixing must fall: the attack is real
ATTACK_DAMAGE = {
    "sign_flip": 0.2,
    "scale": 0.2,
    "gaussian": 0.1,
    "label_flip": 0.01,
    "dissensus": 0.2,  # epsilon = 1: each honest neighbour's gossip step cancelled
}


def test_byzantine_attacks_break_plain_mixing_and_clipping_holds(
    make_scenario, launch_run, tmp_path
):
    """Each attack in turn: plain mixing loses accuracy (sign_flip, scale, gaussian and
    dissensus collapse), adaptive clipping keeps the honest peers within 2 points of a
    fault-free run. sign_flip runs as launched processes; the whole matrix runs in the
    simulator, which computes what the launch computes (`test_sim_vs_launch.py`, the
    same Byzantine peers and clipping: 1.2e-7 apart), and the launched sign_flip pair
    must agree with its simulated twin."""
    import p2pfl

    honest = [i for i in range(16) if i not in BYZANTINE]

    def simulated(name, attack, aggregator):
        path = byzantine_scenario(make_scenario, name, attack, aggregator)
        result = p2pfl.simulate(path, out=tmp_path / "sim" / name, progress=False)
        return float(np.mean(result.history["holdout_accuracy"][-1, honest]))

    launched = [
        launch_run(byzantine_scenario(make_scenario, name, "sign_flip", rule), name)
        for name, rule in (("sign_flip-plain", "mean"), ("sign_flip-clipped", "clipping"))
    ]
    for run in launched:
        finished(run)
    clean = simulated("clean", None, "mean")
    results = {}
    for attack, damage in ATTACK_DAMAGE.items():
        plain = simulated(f"{attack}-plain", attack, "mean")
        clipped = simulated(f"{attack}-clipped", attack, "clipping")
        results[attack] = (plain, clipped)
        assert plain < clean - damage, (attack, clean, results)
        assert clipped >= clean - 0.02, (attack, clean, results)
    by_launch = [final_accuracy(run, honest) for run in launched]
    assert by_launch == pytest.approx(list(results["sign_flip"]), abs=1e-3), by_launch


def test_nan_never_reaches_an_honest_model(make_scenario, launch_run):
    """NaN-sending peers are refused at the wire, cost no waiting, and change nothing."""
    run = launch_run(byzantine_scenario(make_scenario, "nan", "nan"), "nan")
    finished(run)
    honest = [i for i in range(16) if i not in BYZANTINE]
    for i in honest:
        rows = read_jsonl(run.out / f"peer-{i}.jsonl")
        assert all(not set(r["neighbours_heard"]) & set(BYZANTINE) for r in rows[1:])
        assert np.isfinite(np.load(run.out / "models" / f"peer-{i}.npz")["params"]).all()
        assert all(r["wait_s"] < 5.0 for r in rows[2:])  # refused models are not waited for
    drops = [
        e
        for i in honest
        for e in read_jsonl(run.out / "logs" / f"peer-{i}.jsonl")
        if e["event"] == "message_dropped"
    ]
    assert drops and all("NaN or Inf" in e["reason"] for e in drops)
    assert final_accuracy(run, honest) >= 0.93


def test_crashed_peer_rejoins_from_its_checkpoint(make_scenario, launch_run):
    """A peer killed at round 10 restarts from its checkpoint, catches up, ends near its
    neighbours' accuracy. Peer 0 straggles 0.1 s a round, which paces everyone (rounds
    are synchronous), so the others are still running when peer 3 is back."""
    scenario = make_scenario(
        {
            "name": "rejoin",
            "gossip": {"round_timeout_s": 10.0, "peer_timeout_s": 1.0, "heartbeat_s": 0.25},
            "training": {"rounds": 100},
            "faults": {
                "crash": [{"peer": 3, "at_round": 10, "rejoin_after_s": 1.0}],
                "slow": [{"peer": 0, "delay_s": 0.1}],
            },
        }
    )
    run = launch_run(scenario, "rejoin")
    summary = finished(run)
    assert summary["completed_peers"] == list(range(8)) and summary["rejoined_peers"] == [3]
    assert summary["crashed_peers"] == [] and summary["failed_peers"] == []
    log = read_jsonl(run.out / "logs" / "peer-3.jsonl")
    [resumed] = [e for e in log if e["event"] == "resumed"]
    assert resumed["round"] == 9  # the checkpoint of the last round it finished
    [caught] = [e for e in log if e["event"] == "caught_up"]
    assert caught["to_round"] > 9 and sorted(caught["neighbours"]) == ["2", "4"]
    assert caught["resent"] == [2, 4]  # both resent their current model on request
    for j in (2, 4):  # its neighbours gave up on it after 1 s of silence, then took it back
        events = [
            (e["event"], e.get("silent_s"), e["round"])
            for e in read_jsonl(run.out / "logs" / f"peer-{j}.jsonl")
            if e["event"] in ("neighbour_gone", "neighbour_back")
        ]
        assert [name for name, *_ in events] == ["neighbour_gone", "neighbour_back"], events
        assert 1.0 <= events[0][1] < 3.0, events
        # it adopted the model j was at when it took peer 3 back (resent), not older ones
        assert caught["neighbours"][str(j)] >= events[1][2] - 1, (caught, events)
        # it never held them up for anything like the 10 s round deadline
        assert max(r["wait_s"] for r in read_jsonl(run.out / f"peer-{j}.jsonl")[2:]) < 5.0
    rows = read_jsonl(run.out / "peer-3.jsonl")
    rounds = [r["round"] for r in rows]
    assert rounds[:10] == list(range(10)) and rounds[-1] == 100
    assert rows[-1]["neighbours_heard"] == [2, 4]  # taken back by both neighbours
    mine = rows[-1]["holdout_accuracy"]
    theirs = final_accuracy(run, [2, 4])
    assert abs(mine - theirs) <= 0.01, (mine, theirs)


def test_centralized_peer_rejoins_from_its_checkpoint(make_scenario, launch_run):
    """Centralized: a peer killed at round 5 is restarted with --resume, appends to its
    history, and trains again from the server's next global model to the last round."""
    scenario = make_scenario(
        {
            "name": "rejoin-central",
            "mode": "centralized",
            "topology": {"peers": 4},
            "model": {"kind": "logreg"},
            "training": {"rounds": 20, "local_epochs": 1},
            "centralized": {"round_timeout_s": 3.0, "peer_timeout_s": 1.0, "heartbeat_s": 0.25},
            "faults": {"crash": [{"peer": 2, "at_round": 5, "rejoin_after_s": 0.5}]},
        }
    )
    run = launch_run(scenario, "rejoin-central")
    summary = finished(run)
    assert summary["completed_peers"] == list(range(4)) and summary["rejoined_peers"] == [2]
    assert summary["crashed_peers"] == [] and summary["failed_peers"] == []
    [resumed] = [
        e for e in read_jsonl(run.out / "logs" / "peer-2.jsonl") if e["event"] == "resumed"
    ]
    assert resumed["round"] == 4  # the checkpoint of the last round it trained in
    rounds = [r["round"] for r in read_jsonl(run.out / "peer-2.jsonl")]
    # one history, appended to: round 4's line waited for round 5's start, which killed it
    assert rounds[:4] == [0, 1, 2, 3] and rounds == sorted(set(rounds)) and rounds[-1] == 20
    server = read_jsonl(run.out / "coordinator.jsonl")
    assert any(2 not in r["participants"] for r in server[5:])  # it really was gone
    assert server[-1]["participants"] == [0, 1, 2, 3]  # and took part again
