"""The coordinator: centralized FedAvg against gossip, quorum, late joiners, stragglers, kills."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pytest
from conftest import read_jsonl, wait_for, wait_for_round

from p2pfl.config.loader import load


def server_rows(out):
    """The coordinator's history lines."""
    return read_jsonl(out / "coordinator.jsonl")


def events(out, who, name):
    """The structlog events called `name` in logs/<who>.jsonl."""
    return [e for e in read_jsonl(out / "logs" / f"{who}.jsonl") if e["event"] == name]


@pytest.mark.parametrize(
    ("peers", "samples"),
    [
        (8, 1000),  # 200 held out, 8 shards of 100; weights 1/8 are exact in binary
        (6, 960),  # 192 held out, 6 shards of 128; weights 1/6 are not: rounding shows
    ],
)
def test_centralized_fedavg_equals_gossip_on_a_full_graph(
    make_scenario, launch_run, peers, samples
):
    """Full graph, equal IID shards, uniform weights: both modes give one model every round."""
    rounds = 8
    scenario = make_scenario(
        {
            "name": "equivalence",
            "topology": {"kind": "full", "peers": peers},
            "data": {"dataset": "synthetic", "synthetic_samples": samples},
            "model": {"kind": "mlp", "hidden": [16]},
            "training": {"rounds": rounds, "local_epochs": 1},
            "gossip": {"round_timeout_s": 60.0},
            "centralized": {"weighting": "uniform", "fraction": 1.0, "round_timeout_s": 60.0},
            "output": {"models": "every_round"},
        }
    )
    run = launch_run(scenario, "both", command="compare")
    rc, output = run.wait(timeout=300)
    assert rc == 0, output
    central, gossip = run.out / "centralized", run.out / "gossip"
    n_params = np.load(gossip / "models" / "peer-0.npz")["params"].size
    for i in range(peers):  # every gossip round exchanged whole models with every other peer
        rows = read_jsonl(gossip / f"peer-{i}.jsonl")[1:]
        assert [r["neighbours_heard"] for r in rows] == [
            [j for j in range(peers) if j != i]
        ] * rounds
        # heartbeats may add a few bytes to a slow round, never fewer than the models
        assert min(r["bytes_sent"] for r in rows) >= (peers - 1) * 4 * n_params
    worst = 0.0
    for r in range(1, rounds + 1):
        server = np.load(central / "models" / f"round-{r}" / "global.npz")["params"]
        for i in range(peers):
            peer = np.load(gossip / "models" / f"round-{r}" / f"peer-{i}.npz")["params"]
            worst = max(worst, float(np.max(np.abs(peer - server))))
        row = server_rows(central)[r]
        assert row["participants"] == list(range(peers)) and row["closed_by"] == "all_in"
    assert worst <= 1e-5, worst
    first = np.load(central / "models" / "round-1" / "global.npz")["params"]
    last = np.load(central / "models" / f"round-{rounds}" / "global.npz")["params"]
    assert np.max(np.abs(last - first)) > 1e-2  # the model really trained between rounds
    final = np.load(central / "models" / "global.npz")["params"]
    assert np.array_equal(final, last)
    for i in range(peers):  # end_session gave every peer the final global model
        assert np.array_equal(np.load(central / "models" / f"peer-{i}.npz")["params"], final)


def test_min_peers_then_late_joiner_from_the_next_round(make_scenario, cli_procs, tmp_path):
    """No round before min_peers; more than min_peers all take part; a late peer joins next."""
    scenario = make_scenario(
        {
            "name": "quorum",
            "mode": "centralized",
            "topology": {"kind": "ring", "peers": 4},
            "model": {"kind": "logreg"},
            "training": {"rounds": 800, "local_epochs": 1},
            "centralized": {"min_peers": 2},
            # rounds of at least 20 ms, so the run outlasts the late peer's start-up
            "faults": {"slow": [{"peer": 0, "delay_s": 0.02}]},
        }
    )
    out = tmp_path / "run"
    common = [str(scenario), "--out", str(out)]
    coordinator = cli_procs("coordinator", "coordinator", *common)
    first = cli_procs("peer-0", "peer", *common, "--id", "0")
    wait_for(
        lambda: (
            events(out, "coordinator", "waiting_for_peers")
            and events(out, "coordinator", "peer_joined")
        ),
        120,
        "peer 0 to join a coordinator that waits for a second peer",
        [coordinator, first],
    )
    time.sleep(1.0)  # one peer alone: the coordinator must keep waiting
    assert [r["round"] for r in server_rows(out)] == [0]
    more = [cli_procs(f"peer-{i}", "peer", *common, "--id", str(i)) for i in (1, 2)]
    wait_for(lambda: len(server_rows(out)) > 2, 120, "round 2", [coordinator, first, *more])
    late = cli_procs("peer-3", "peer", *common, "--id", "3")
    procs = [coordinator, first, *more, late]
    for p in procs:
        assert p.wait(240) == 0, p.output_path.read_text()
    rows = server_rows(out)[1:]
    assert all(len(r["participants"]) >= 2 for r in rows)
    assert rows[0]["sampled"] == rows[0]["connected"] and len(rows[0]["sampled"]) >= 2
    assert any(set(r["participants"]) == {0, 1, 2} for r in rows)  # not "exactly min_peers"
    joined = [e for e in events(out, "coordinator", "peer_joined") if e["sender"] == 3]
    assert len(joined) == 1
    k = joined[0]["round"]  # the round in progress when peer 3 said hello
    assert 3 <= k < 800, k
    assert all(3 not in r["sampled"] for r in rows[:k])
    assert 3 in rows[k]["participants"]  # round k + 1
    history = read_jsonl(out / "peer-3.jsonl")
    trained = [r["round"] for r in history if r["train_loss"] is not None]
    assert trained[0] == k + 1
    assert history[-1]["round"] == 800 and history[-1]["holdout_accuracy"] >= 0.9


def test_fraction_samples_peers_per_round(make_scenario, launch_run):
    """fraction = 0.5 of 6: three sampled per round, varying; each peer trains when sampled."""
    rounds = 6
    scenario = make_scenario(
        {
            "name": "fraction",
            "mode": "centralized",
            "topology": {"kind": "ring", "peers": 6},
            "model": {"kind": "logreg"},
            "training": {"rounds": rounds, "local_epochs": 1},
            "centralized": {"fraction": 0.5},
        }
    )
    run = launch_run(scenario)
    rc, output = run.wait(timeout=180)
    assert rc == 0, output
    rows = server_rows(run.out)[1:]
    assert all(len(r["sampled"]) == 3 and r["participants"] == r["sampled"] for r in rows)
    assert len({tuple(r["sampled"]) for r in rows}) > 1  # a fresh sample every round
    final = np.load(run.out / "models" / "global.npz")["params"]
    for i in range(6):
        history = read_jsonl(run.out / f"peer-{i}.jsonl")
        trained = [r["round"] for r in history if r["train_loss"] is not None]
        assert trained == [r["round"] for r in rows if i in r["sampled"]]
        received = {r["round"] - 1 for r in rows if i in r["sampled"]} | {rounds}
        for line in history[1:]:  # the global model when it came, else the peer's own update
            assert line["evaluated_on"] == ("global" if line["round"] in received else "update")
        assert history[-1]["round"] == rounds
        assert np.array_equal(np.load(run.out / "models" / f"peer-{i}.npz")["params"], final)
    assert (run.out / "accuracy.png").stat().st_size > 1000


def test_straggler_does_not_stall_the_round(make_scenario, launch_run):
    """A peer delayed past the deadline: rounds close without it and say it was missing."""
    scenario = make_scenario(
        {
            "name": "straggler",
            "mode": "centralized",
            "topology": {"kind": "ring", "peers": 3},
            "model": {"kind": "logreg"},
            "training": {"rounds": 3, "local_epochs": 1},
            # the straggler is silent for longer than coordinator_timeout_s while it
            # trains: that is not the coordinator's silence
            "centralized": {"round_timeout_s": 2.0, "min_updates": 2, "coordinator_timeout_s": 3},
            "faults": {"slow": [{"peer": 2, "delay_s": 4.0}]},
        }
    )
    run = launch_run(scenario)
    rc, output = run.wait(timeout=180)
    assert rc == 0, output
    rows = server_rows(run.out)[1:]
    assert [r["closed_by"] for r in rows] == ["deadline"] * 3
    assert all(r["participants"] == [0, 1] and r["missing"] == [2] for r in rows)
    assert all(r["round_s"] < 4.0 for r in rows)  # closed before the straggler's update came
    late = events(run.out, "coordinator", "late_update")
    assert late and all(e["sender"] == 2 for e in late)
    assert events(run.out, "peer-2", "skipped_round")  # it caught up with the newest round
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["completed_peers"] == [0, 1, 2]


def test_bootstrap_coordinator_killed_gossip_goes_on(make_scenario, launch_run):
    """Gossip bootstrapped by the coordinator: kill it once peers run, every peer completes."""
    rounds = 300  # long enough that the kill lands mid-run
    scenario = make_scenario(
        {
            "name": "bootstrap",
            "model": {"kind": "logreg"},
            "training": {"rounds": rounds, "local_epochs": 1},
            "coordinator": {"bootstrap": True},
        }
    )
    run = launch_run(scenario)
    for i in range(8):  # each peer got its welcome: it is past round 1
        wait_for_round(run, i, 2, timeout=120)
    psutil.Process(run.coordinator_pid()).kill()
    at_kill = max(read_jsonl(run.out / f"peer-{i}.jsonl")[-1]["round"] for i in range(8))
    assert at_kill < rounds, "the run ended before the coordinator was killed"
    rc, output = run.wait(timeout=240)
    assert rc == 0, output
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["completed_peers"] == list(range(8))
    assert summary["coordinator"] == {"role": "bootstrap", "exit_code": -9}
    for i in range(8):
        rows = read_jsonl(run.out / f"peer-{i}.jsonl")
        assert rows[-1]["round"] == rounds and rows[-1]["neighbours_missing"] == []
        assert len(events(run.out, f"peer-{i}", "bootstrapped")) == 1
    assert run.peer_processes() == []


def test_server_killed_mid_run_every_peer_exits_with_an_error(make_scenario, launch_run):
    """Centralized: SIGKILL the server mid-run; peers exit 1 within the timeout, run fails."""
    scenario = make_scenario(
        {
            "name": "serverdies",
            "mode": "centralized",
            "topology": {"kind": "ring", "peers": 4},
            "model": {"kind": "logreg"},
            "training": {"rounds": 100000, "local_epochs": 1},
            "centralized": {"coordinator_timeout_s": 5.0, "heartbeat_s": 0.5},
        }
    )
    run = launch_run(scenario)
    wait_for(lambda: len(server_rows(run.out)) > 3, 120, "round 3", [run.proc])
    psutil.Process(run.coordinator_pid()).kill()
    killed_at = time.monotonic()
    rc, output = run.wait(timeout=60)
    assert time.monotonic() - killed_at < 30  # bounded: the timeout plus exit, not a hang
    assert rc == 1, output
    assert "coordinator (server) exited with code -9" in output
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["failed_peers"] == [0, 1, 2, 3] and summary["completed_peers"] == []
    for i in range(4):
        err = (run.out / "logs" / f"peer-{i}.stderr").read_text()
        assert "no message from the coordinator for 5 s" in err, err
        assert events(run.out, f"peer-{i}", "coordinator_lost")
    assert run.peer_processes() == []


def test_compare_quickstart_traffic_matches_theory(make_scenario, launch_run):
    """`p2pfl compare` on the quickstart: the server carries about N/2 x a ring peer's bytes."""
    scenario = make_scenario()
    run = launch_run(scenario, "compare", command="compare")
    rc, output = run.wait(timeout=300)
    assert rc == 0, output
    report = json.loads((run.out / "compare.json").read_text())
    n = load(scenario).peers
    c, g = report["modes"]["centralized"], report["modes"]["gossip"]
    assert c["busiest_node"] == "coordinator"
    assert c["completed_peers"] == g["completed_peers"] == n
    # per round: the server sends and receives n models, a ring peer 2 each way
    assert 0.9 * n / 2 <= report["busiest_ratio"] <= 1.1 * n / 2, report["busiest_ratio"]
    assert c["final_accuracy_mean"] >= 0.93 and g["final_accuracy_mean"] >= 0.93
    assert (run.out / "compare.png").stat().st_size > 1000
    summaries = [json.loads((run.out / m / "summary.json").read_text()) for m in report["modes"]]
    assert set(summaries[0]) == set(summaries[1])  # one summary format for both modes
    assert "coordinator" in (run.out / "compare.md").read_text()
    assert "centralized" in output and "gossip" in output
