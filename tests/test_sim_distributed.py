"""The simulator across JAX processes (`jax.distributed`, gloo over loopback): two
`p2pfl simulate` processes share the peers and give the very models one process gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfl.app.ports import free_base_port
from p2pfl.config.schema import dumps as to_toml

pytestmark = pytest.mark.slow  # three processes and a coordinator socket

SCENARIOS = {
    # a crash and a rejoin: the rows trained change from round to round
    "gossip": {
        "faults": {"crash": [{"peer": 2, "at_round": 2, "rejoin_after_s": 1}]},
    },
    # a sampled half of the peers each round: 3 rows, split 2 + 1 across the processes
    "centralized": {"centralized": {"fraction": 0.5}},
}


def _scenario(tmp_path: Path, mode: str) -> Path:
    raw = {
        "name": f"dist-{mode}",
        "mode": mode,
        "topology": {"kind": "ring", "peers": 6},
        "model": {"kind": "logreg"},
        "training": {"rounds": 4, "local_epochs": 1},
        **SCENARIOS[mode],
    }
    path = tmp_path / f"{mode}.toml"
    path.write_text(to_toml(raw))
    return path


def _simulate(scenario: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pfl", "simulate", str(scenario), "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _finish(procs: list[subprocess.Popen[bytes]], timeout: float = 180.0) -> list[int]:
    """Every process's exit code; all are killed if one overruns (pass or fail)."""
    codes = []
    try:
        for p in procs:
            p.communicate(timeout=timeout)
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


@pytest.mark.parametrize("mode", sorted(SCENARIOS))
def test_two_jax_processes_compute_what_one_computes(tmp_path: Path, mode: str):
    scenario = _scenario(tmp_path, mode)
    single = tmp_path / "single"
    assert _finish([_simulate(scenario, single)]) == [0]
    address = f"127.0.0.1:{free_base_port(1)}"
    shared = tmp_path / "distributed"
    flags = ["--coordinator-address", address, "--num-processes", "2", "--process-id"]
    procs = [_simulate(scenario, shared, *flags, str(i)) for i in (1, 0)]
    assert _finish(procs) == [0, 0]
    one, two = (json.loads((d / "summary.json").read_text()) for d in (single, shared))
    assert two["peers"] == 6 and two["engine"] == "sim"
    assert two["final_holdout_accuracy"] == one["final_holdout_accuracy"]
    assert two["crashed_peers"] == one["crashed_peers"]
    for i in range(6):
        a = np.load(single / "models" / f"peer-{i}.npz")["params"]
        b = np.load(shared / "models" / f"peer-{i}.npz")["params"]
        np.testing.assert_array_equal(a, b)  # each peer's rows run the same programs
    lines = [json.loads(x) for x in (shared / "logs" / "sim.jsonl").read_text().splitlines()]
    start = next(x for x in lines if x["event"] == "sim_start")
    assert start["processes"] == 2
    # only process 0 writes the run folder: nothing of process 1's in it
    assert not list(shared.glob("logs/*-1*"))


def test_a_lost_process_ends_the_others_at_once_with_a_summary(tmp_path: Path):
    """Process 1 is SIGKILLed mid-run: process 0 does not hang in the gather (nor wait
    out JAX's heartbeat timeout at exit); it exits 1 saying why, after writing the
    summary of the rounds done."""
    import time

    scenario = _scenario(tmp_path, "gossip")
    scenario.write_text(scenario.read_text().replace("rounds = 4", "rounds = 100000"))
    out = tmp_path / "run"
    flags = ["--coordinator-address", f"127.0.0.1:{free_base_port(1)}", "--num-processes", "2"]
    second = _simulate(scenario, out, *flags, "--process-id", "1")
    first = _simulate(scenario, out, *flags, "--process-id", "0")
    try:
        log = out / "logs" / "sim.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if log.exists() and log.read_text().count('"round_done"') >= 3:
                break
            time.sleep(0.1)
        assert first.poll() is None, "process 0 ended before process 1 was killed"
        second.kill()
        _, err = first.communicate(timeout=60)  # not JAX's ~100 s heartbeat timeout
    finally:
        _finish([second, first], timeout=5)
    assert first.returncode == 1
    assert b"results did not come" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert any('"process_lost"' in line for line in log.read_text().splitlines())
