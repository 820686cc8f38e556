"""End-to-end runs: real peer processes on loopback, launched as a user would."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import psutil
from conftest import read_jsonl, wait_for_round

from p2pfl.config.loader import load
from p2pfl.core.graphs import build_graph, mixing_matrix, slem

RECORD_FIELDS = {
    "round",
    "train_loss",
    "test_accuracy",
    "holdout_accuracy",
    "bytes_sent",
    "bytes_received",
    "train_s",
    "comm_s",
    "wait_s",
    "neighbours_heard",
    "disagreement",
}
SUMMARY_FIELDS = {
    "scenario",
    "mode",
    "peers",
    "rounds",
    "completed_peers",
    "failed_peers",
    "final_holdout_accuracy",
    "bytes_sent_total",
    "bytes_sent_busiest",
    "wall_s",
}


def test_quickstart_reaches_accuracy_and_writes_run_folder(make_scenario, launch_run):
    """The quickstart completes on 8 peers with mean holdout accuracy >= 0.95 and a run folder."""
    scenario = make_scenario()
    run = launch_run(scenario)
    rc, output = run.wait(timeout=240)
    assert rc == 0, output
    summary = json.loads((run.out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_FIELDS
    assert summary["completed_peers"] == list(range(8)) and summary["failed_peers"] == []
    assert summary["final_holdout_accuracy"]["mean"] >= 0.95, summary
    rounds = load(scenario).training.rounds
    for i in range(8):
        rows = read_jsonl(run.out / f"peer-{i}.jsonl")
        assert [r["round"] for r in rows] == list(range(rounds + 1))
        assert set(rows[-1]) >= RECORD_FIELDS
        assert all(
            sorted(r["neighbours_heard"]) == sorted({(i - 1) % 8, (i + 1) % 8}) for r in rows[1:]
        )
        params = np.load(run.out / "models" / f"peer-{i}.npz")["params"]
        assert params.dtype == np.float32 and params.ndim == 1
        events = read_jsonl(run.out / "logs" / f"peer-{i}.jsonl")
        assert not [e for e in events if e["event"] == "message_dropped"]  # no false alarms
    assert (run.out / "accuracy.png").stat().st_size > 1000
    assert run.peer_processes() == []


def test_gossip_averaging_contracts_by_lambda_per_round(make_scenario, launch_run):
    """lr = 0, per-peer init: disagreement after R rounds is within λ^R and the mean is kept."""
    rounds = 12
    scenario = make_scenario(
        {
            "name": "averaging",
            "model": {"kind": "logreg", "init": "per_peer"},
            "training": {"rounds": rounds, "learning_rate": 0.0, "optimizer": "sgd"},
        }
    )
    run = launch_run(scenario)
    rc, output = run.wait(timeout=180)
    assert rc == 0, output
    s = load(scenario)

    from p2pfl.config.learning import learning_spec
    from p2pfl.learning.local import build

    spec = learning_spec(s)
    x0 = np.stack([np.asarray(build(spec, i).state.params) for i in range(s.peers)])
    x0 = x0.astype(np.float64)
    xr = np.stack([np.load(run.out / "models" / f"peer-{i}.npz")["params"] for i in range(s.peers)])
    mean0, mean_r = x0.mean(0), xr.astype(np.float64).mean(0)
    lam = slem(mixing_matrix(build_graph(s.topology), "metropolis"))
    assert math.isclose(lam, 1 / 3 + 2 / 3 * math.cos(2 * math.pi / s.peers), rel_tol=1e-9)
    d0 = np.linalg.norm(x0 - mean0)
    dr = np.linalg.norm(xr - mean_r)
    assert dr <= lam**rounds * d0 * (1 + 1e-4) + 1e-4, (dr, lam**rounds * d0)
    assert dr < 0.2 * d0  # the bound is not vacuous: the models really moved together
    assert np.linalg.norm(mean_r - mean0) <= 1e-5 * np.linalg.norm(mean0)


def test_killed_peer_does_not_stop_the_others(make_scenario, launch_run):
    """SIGKILL of one peer of 8 mid-run: the other 7 finish every round, summary lists it failed."""
    rounds = 300  # long enough that the kill lands mid-run
    scenario = make_scenario(
        {
            "name": "kill",
            "model": {"kind": "logreg"},
            "training": {"rounds": rounds, "local_epochs": 1},
            # a long round deadline: only the time-based liveness keeps the others going
            "gossip": {"round_timeout_s": 30.0, "peer_timeout_s": 1.0, "heartbeat_s": 0.25},
        }
    )
    run = launch_run(scenario)
    wait_for_round(run, 3, 5, timeout=120)
    victim = psutil.Process(run.peer_pids()[3])
    victim.kill()
    rc, output = run.wait(timeout=240)
    assert rc == 1, output  # the launcher reports the failure
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["failed_peers"] == [3]
    assert summary["completed_peers"] == [0, 1, 2, 4, 5, 6, 7]
    for i in summary["completed_peers"]:
        rows = read_jsonl(run.out / f"peer-{i}.jsonl")
        assert rows[-1]["round"] == rounds
    late = read_jsonl(run.out / "peer-2.jsonl")[-1]
    assert late["neighbours_heard"] == [1] and late["neighbours_missing"] == [3]
    for i in (2, 4):  # declared gone once, after about peer_timeout_s of silence
        [gone] = [
            e
            for e in read_jsonl(run.out / "logs" / f"peer-{i}.jsonl")
            if e["event"] == "neighbour_gone"
        ]
        assert gone["neighbour"] == 3 and 1.0 <= gone["silent_s"] < 3.0, gone
    assert run.peer_processes() == []


def test_ctrl_c_stops_every_peer_and_still_writes_a_summary(make_scenario, launch_run):
    """SIGINT to the launcher's group: exit 130, no peer left running, summary.json written."""
    scenario = make_scenario({"name": "interrupt", "training": {"rounds": 100000}})
    run = launch_run(scenario)
    wait_for_round(run, 0, 3, timeout=120)
    os.killpg(run.proc.pid, signal.SIGINT)
    rc, output = run.wait(timeout=60)
    assert rc == 130, output
    assert run.peer_processes() == []
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["completed_peers"] == [] and len(summary["failed_peers"]) == 8


def test_launch_refuses_ports_in_use(make_scenario, tmp_path, capfd):
    """A port already taken stops the launch before any peer starts, naming the address."""
    import socket

    from p2pfl.app.cli import main

    scenario = make_scenario({"name": "busy"})
    s = load(scenario)
    host, port = s.address(5).removeprefix("tcp://").split(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        rc = main(["launch", str(scenario), "--out", str(tmp_path / "busy")])
    assert rc == 1
    err = capfd.readouterr().err
    assert f"peer 5 {s.address(5)}" in err and "in use" in err
    assert not (tmp_path / "busy" / "pids.json").exists()


def test_launch_refuses_to_clean_a_folder_that_is_not_a_run(make_scenario, tmp_path, capfd):
    """`--out` pointing at a user's folder with other files is refused, and nothing is deleted."""
    from p2pfl.app.cli import main

    scenario = make_scenario({"name": "notarun"})
    folder = tmp_path / "project"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "precious.bin").write_bytes(b"keep me")
    rc = main(["launch", str(scenario), "--out", str(folder)])
    assert rc == 1
    assert "not an earlier p2pfl run" in capfd.readouterr().err
    assert (folder / "models" / "precious.bin").read_bytes() == b"keep me"
