"""Differential privacy in real runs: ε in every history line is the accountant's for the
recorded inputs, both engines give the same ε and noised models, and what leaves a peer
on the wire is clipped."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_base_port, read_jsonl, to_toml
from test_privacy import rdp_reference

from p2pfl.config.loader import load
from p2pfl.net.transport import Transport
from p2pfl.protocol import wire

pytestmark = pytest.mark.slow

DP = {"mechanism": "update", "clip": 0.5, "noise_multiplier": 0.8}


@pytest.mark.parametrize(
    "mode, where, mechanism",
    [
        ("gossip", "peer", "update"),
        ("centralized", "peer", "update"),
        ("centralized", "server", "update"),
        ("gossip", "peer", "dp_sgd"),
    ],
)
def test_epsilon_is_recomputable_and_both_engines_agree(
    make_scenario, launch_run, tmp_path, mode, where, mechanism
):
    """4 peers, 8 rounds (centralized: half sampled a round; central DP: Poisson): every
    line's ε is RDP's for (q, σ, its dp_steps, δ) from summary.json; the simulator gives
    the same ε per line and the same noised final models within float32 tolerance."""
    scenario = make_scenario(
        {
            "name": f"dp-{mode}-{where}-{mechanism}",
            "mode": mode,
            "topology": {"kind": "ring", "peers": 4},
            "model": {"kind": "logreg"},
            "training": {"rounds": 8, "local_epochs": 1},
            "centralized": {"fraction": 0.5},
            "privacy": {**DP, "where": where, "mechanism": mechanism},
        }
    )
    rc, out = launch_run(scenario, "launch").wait(timeout=240)
    assert rc == 0, out
    sim = launch_run(scenario, "sim", command="simulate")
    rc, out = sim.wait(timeout=240)
    assert rc == 0, out
    summaries = {
        e: json.loads((tmp_path / e / "summary.json").read_text()) for e in ("launch", "sim")
    }
    block = summaries["launch"]["privacy"]
    assert block["where"] == where and block["mechanism"] == mechanism
    if mechanism == "update":
        assert block["q"] == (0.5 if where == "server" else 1.0)
    assert block["noise_multiplier"] == 0.8 and block["clip"] == 0.5
    assert block["delta"] == 1e-5 and block["accountant"] == "rdp"
    assert summaries["sim"]["privacy"] == block
    for i in range(4):
        rows = read_jsonl(tmp_path / "launch" / f"peer-{i}.jsonl")
        assert rows[0]["epsilon"] == 0.0 and rows[0]["dp_steps"] == 0
        for r in rows[1:]:
            q, sigma, delta, k = (
                r["dp_q"],
                block["noise_multiplier"],
                block["delta"],
                r["dp_steps"],
            )
            want = rdp_reference(q, sigma, k, delta) if k else 0.0
            assert r["epsilon"] == pytest.approx(want, rel=1e-9)
        steps = [r["dp_steps"] for r in rows]
        if mechanism == "dp_sgd":  # local_epochs 1: ceil(n_local / 32) steps a round
            n = rows[-1]["dp_steps"] // 8
            assert n >= 2 and steps == [n * r for r in range(9)]
            assert 1 / n <= rows[-1]["dp_q"] < 1 / (n - 1)  # 32 / n_local
        elif mode == "gossip":
            assert steps == list(range(9))
        elif where == "server":  # central DP: every round so far is a step
            assert steps == [r["round"] for r in rows]
        else:  # one release per round the peer was sampled in, no more
            server = read_jsonl(tmp_path / "launch" / "coordinator.jsonl")
            taken = sum(i in s["participants"] for s in server[1:])
            assert steps[-1] == taken and 0 < taken < 8
        sim_rows = read_jsonl(tmp_path / "sim" / f"peer-{i}.jsonl")
        assert [r["epsilon"] for r in sim_rows] == [r["epsilon"] for r in rows]
        if where == "server":  # the peers' models went to the server in clear
            assert read_jsonl(tmp_path / "launch" / f"peer-{i}.jsonl")[-1]["dp_steps"] == 8
        ours = np.load(tmp_path / "launch" / "models" / f"peer-{i}.npz")["params"]
        theirs = np.load(tmp_path / "sim" / "models" / f"peer-{i}.npz")["params"]
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert summaries["launch"]["privacy"]["epsilon"]["max"] == max(
        read_jsonl(tmp_path / "launch" / f"peer-{i}.jsonl")[-1]["epsilon"] for i in range(4)
    )
    assert (tmp_path / "launch" / "privacy.png").stat().st_size > 0
    assert (tmp_path / "sim" / "privacy.png").stat().st_size > 0


def test_what_leaves_a_peer_is_clipped(tmp_path):
    """Peer 0 of a 2-peer line trains with a huge learning rate and noise 1e-6·clip; the
    test is peer 1 and echoes each model back, so peer 0 starts round r + 1 from what it
    sent in round r: every update read off the wire has norm ≤ clip (and it is clipped:
    without clipping it would be orders of magnitude longer)."""
    port = free_base_port(2)
    clip, rounds = 0.25, 6
    scenario = tmp_path / "clip.toml"
    scenario.write_text(
        to_toml(
            {
                "name": "clip",
                "topology": {"kind": "line", "peers": 2},
                "model": {"kind": "logreg"},
                "training": {"rounds": rounds, "learning_rate": 50.0, "optimizer": "sgd"},
                "network": {"base_port": port},
                "privacy": {"mechanism": "update", "clip": clip, "noise_multiplier": 1e-6},
            }
        )
    )
    s = load(scenario)
    n_params = 64 * 10 + 10
    expect = wire.Expect(s.digest(), 1, {"params": (n_params,)})
    me = Transport(s.address(1), {0: s.address(0)}, expect.max_frames)
    peer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pfl",
            "peer",
            str(scenario),
            "--id",
            "0",
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sent: dict[int, np.ndarray] = {}
    try:
        deadline = time.monotonic() + 120
        while len(sent) < rounds and time.monotonic() < deadline and peer.poll() is None:
            env = me.recv(0.5)
            if env is None:
                continue
            msg = wire.decode(env.frames, expect)
            if msg.type != "model":
                continue
            model = np.asarray(msg.arrays["params"], np.float32).copy()
            sent[msg.round] = model
            frames = wire.encode(
                "model", 1, msg.round, s.digest(), {"degree": 1, "samples": 100}, {"params": model}
            )
            me.send(0, frames)
        output, _ = peer.communicate(timeout=60)
        assert peer.returncode == 0, output.decode(errors="replace")
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait(10)
        me.close(0)
    assert sorted(sent) == list(range(1, rounds + 1))
    norms = [float(np.linalg.norm(sent[r] - sent[r - 1])) for r in range(2, rounds + 1)]
    assert max(norms) <= clip * (1 + 1e-3), norms
    assert min(norms) >= 0.9 * clip, norms  # a huge step, cut down to the clip norm
