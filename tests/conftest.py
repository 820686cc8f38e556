"""Shared fixtures: scenario files in tmp dirs, free loopback ports, launched runs cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from p2pfl.app.ports import free_base_port
from p2pfl.config.schema import dumps as to_toml

ROOT = Path(__file__).resolve().parent.parent


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge of scenario dicts."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in overrides.items():
        if isinstance(v, dict):
            out.setdefault(k, {}).update(v)
        else:
            out[k] = v
    return out


@pytest.fixture
def make_scenario(tmp_path: Path):
    """Write a scenario (quickstart overridden section-wise) on free ports; return its path."""

    def make(overrides: dict[str, Any] | None = None, base: str = "quickstart") -> Path:
        raw = tomllib.loads((ROOT / "scenarios" / f"{base}.toml").read_text())
        data = merge(raw, overrides or {})
        peers = data.get("topology", {}).get("peers", 8)
        # peers' ports, then the coordinator's control and update ports
        data = merge(data, {"network": {"base_port": free_base_port(peers + 2)}})
        path = tmp_path / f"{data.get('name', 'scenario')}.toml"
        path.write_text(to_toml(data))
        return path

    return make


class Run:
    """A `p2pfl launch` subprocess in its own process group, always cleaned up."""

    def __init__(self, scenario: Path, out: Path, *extra: str, command: str = "launch") -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pfl", command, str(scenario), "--out", str(out), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> tuple[int, str]:
        """Exit code and output; kills the whole group if it overruns."""
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode, output.decode(errors="replace")

    def peer_pids(self) -> dict[int, int]:
        """Peer id -> pid, from the `pids.json` the launcher writes (empty before it exists)."""
        path = self.out / "pids.json"
        if not path.exists():
            return {}
        return {int(k): v for k, v in json.loads(path.read_text()).items() if k.isdigit()}

    def coordinator_pid(self) -> int | None:
        """The coordinator's pid, once the launcher has written `pids.json` (None before)."""
        path = self.out / "pids.json"
        return json.loads(path.read_text()).get("coordinator") if path.exists() else None

    def peer_processes(self) -> list[psutil.Process]:
        """This run's peer (and coordinator) processes still alive (zombies count as gone)."""
        alive = []
        pids = [*self.peer_pids().values(), self.coordinator_pid()]
        for pid in filter(None, pids):
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        return alive

    def kill(self) -> None:
        """Kill the launcher's process group and any peer left behind."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.peer_processes():
            p.kill()
        self.proc.wait(10)


@pytest.fixture
def launch_run(tmp_path: Path) -> Iterator[Any]:
    """Start `p2pfl launch` runs; every one is killed at teardown, pass or fail."""
    runs: list[Run] = []

    def start(scenario: Path, name: str = "run", *extra: str, command: str = "launch") -> Run:
        run = Run(scenario, tmp_path / name, *extra, command=command)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


@pytest.fixture
def program_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The exported-program store in a temporary folder (JAX's own cache left alone)."""
    from p2pfl.learning import exported

    folder = tmp_path / exported.FOLDER
    monkeypatch.setattr(exported, "store", lambda: folder)
    return folder


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parsed JSON lines of a file (empty if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_round(run, peer, round_, timeout):
    """Block until a peer's history shows `round_`; fail at once if the launcher exits."""
    path = run.out / f"peer-{peer}.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.proc.poll() is None:
        rows = read_jsonl(path)
        if rows and rows[-1]["round"] >= round_:
            return
        time.sleep(0.05)
    pytest.fail(f"peer {peer} never reached round {round_} (launcher exit {run.proc.poll()})")


@pytest.fixture
def cli_procs(tmp_path: Path) -> Iterator[Any]:
    """Start single `p2pfl ...` commands (a coordinator, one peer) as a host would; all are
    killed at teardown, pass or fail. Output goes to a file per process in tmp_path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.out").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pfl", *args], stdout=log, stderr=subprocess.STDOUT
        )
        proc.output_path = tmp_path / f"{name}.out"  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    """Poll `predicate` until true; fail naming `what` on timeout or if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p for p in procs if p.poll() not in (None, 0)]
        if dead:
            path = getattr(dead[0], "output_path", None)
            said = path.read_text() if path is not None else ""
            pytest.fail(f"waiting for {what}: a process exited with {dead[0].returncode}\n{said}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def send_all(kind: int, addr: str, cases: list[tuple[str, list[bytes]]]) -> None:
    """Send every (reason, frames) case over a fresh socket of `kind`, flushed before close."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(addr)
    try:
        for _, frames in cases:
            sock.send_multipart(frames)
    finally:
        sock.close()
        ctx.term()


PROCESS_FIXTURES = {"launch_run", "cli_procs"}  # they start real processes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts processes through a fixture is `slow` without saying so: the
    fast tier (`-m "not slow"`) never starts one by accident."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
