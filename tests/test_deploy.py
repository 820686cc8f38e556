"""A deployment as on real hosts: one `p2pfl peer` command per peer, own address, own npz file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import free_base_port, read_jsonl, to_toml

pytestmark = pytest.mark.slow  # one process per host


def blobs(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian classes: an easy task every peer can learn."""
    y = rng.integers(0, len(centres), n)
    return (centres[y] + rng.normal(0, 0.5, (n, centres.shape[1]))).astype(np.float32), y


@pytest.fixture
def peer_procs():
    """Peer subprocesses, killed at teardown whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_one_peer_command_per_host_with_npz_data(tmp_path, peer_procs):
    """Three `p2pfl peer` processes on distinct loopback addresses, each with its own npz file."""
    rng = np.random.default_rng(7)
    centres = rng.normal(0, 3, (3, 5))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        x, y = blobs(rng, 120, centres)
        np.savez(data / f"peer-{i}.npz", x=x, y=y)
    x, y = blobs(rng, 300, centres)
    np.savez(data / "holdout.npz", x=x, y=y)
    port = free_base_port(1)
    scenario = tmp_path / "hosts.toml"
    scenario.write_text(
        to_toml(
            {
                "name": "hosts",
                "topology": {"kind": "line", "peers": 3},
                "data": {
                    "dataset": "npz",
                    "path": "data/peer-{id}.npz",
                    "holdout": "data/holdout.npz",
                    "classes": 3,
                },
                "model": {"kind": "logreg"},
                "training": {"rounds": 15, "learning_rate": 0.05},
                "network": {"addresses": [f"tcp://127.0.0.{i + 1}:{port}" for i in range(3)]},
            }
        )
    )
    out = tmp_path / "run"
    for i in (2, 0, 1):  # any start order works
        peer_procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "p2pfl",
                    "peer",
                    str(scenario),
                    "--id",
                    str(i),
                    "--out",
                    str(out),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in peer_procs:
        output, _ = p.communicate(timeout=180)
        assert p.returncode == 0, output.decode(errors="replace")
    models = [np.load(out / "models" / f"peer-{i}.npz")["params"] for i in range(3)]
    for i in range(3):
        rows = read_jsonl(out / f"peer-{i}.jsonl")
        assert [r["round"] for r in rows] == list(range(16))
        assert rows[-1]["holdout_accuracy"] >= 0.9
        assert all(r["neighbours_missing"] == [] for r in rows[1:])
    spread = max(np.linalg.norm(m - models[1]) for m in models)
    assert spread < 0.05 * np.linalg.norm(models[1])  # the peers agree on one model


def test_bootstrap_gives_peers_their_neighbours_addresses(tmp_path, peer_procs):
    """Peers on addresses the file never lists find each other through the coordinator."""
    port, control = free_base_port(1), free_base_port(2)
    scenario = tmp_path / "boot.toml"
    scenario.write_text(
        to_toml(
            {
                "name": "boot",
                "topology": {"kind": "line", "peers": 3},
                "model": {"kind": "logreg"},
                "training": {"rounds": 10},
                "coordinator": {"address": f"tcp://127.0.0.1:{control}", "bootstrap": True},
            }
        )
    )
    out = tmp_path / "run"
    addresses = {i: f"tcp://127.0.0.{i + 1}:{port}" for i in range(3)}
    base = [sys.executable, "-m", "p2pfl"]
    commands = [[*base, "coordinator", str(scenario), "--out", str(out)]] + [
        [*base, "peer", str(scenario), "--id", str(i), "--address", addresses[i], "--out", str(out)]
        for i in (2, 0, 1)
    ]
    for command in commands:
        peer_procs.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for p in peer_procs:  # the coordinator exits 0 once every peer has said bye
        output, _ = p.communicate(timeout=180)
        assert p.returncode == 0, output.decode(errors="replace")
    neighbours = {0: [1], 1: [0, 2], 2: [1]}
    for i in range(3):
        log = read_jsonl(out / "logs" / f"peer-{i}.jsonl")
        [boot] = [e for e in log if e["event"] == "bootstrapped"]
        assert boot["neighbours"] == {str(j): addresses[j] for j in neighbours[i]}
        rows = read_jsonl(out / f"peer-{i}.jsonl")
        assert rows[-1]["round"] == 10 and all(r["neighbours_missing"] == [] for r in rows[1:])
