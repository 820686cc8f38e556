"""Process set-up of the console script: glibc's allocator tunables for the simulator
(decided by pure functions), a re-executed `p2pfl simulate`, and its quick exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.app.entry import simulates
from p2pfl.runtime.process import (
    ALLOCATOR_TUNABLES,
    NO_TUNING,
    allocator_env,
    glibc_version,
    thp_available,
)

GLIBC = (2, 36)


def _tunables(env: dict[str, str] | None) -> dict[str, str]:
    assert env is not None
    return dict(t.split("=", 1) for t in env["GLIBC_TUNABLES"].split(":"))


def test_allocator_env_adds_the_tunables_and_keeps_the_rest():
    env = allocator_env({"PATH": "/bin"}, GLIBC, huge_pages=True)
    assert env is not None and env["PATH"] == "/bin"
    assert _tunables(env) == ALLOCATOR_TUNABLES


def test_allocator_env_leaves_a_users_own_tunables_as_they_are():
    mine = "glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=2"
    env = allocator_env({"GLIBC_TUNABLES": mine}, GLIBC, huge_pages=True)
    got = _tunables(env)
    assert got["glibc.malloc.mmap_threshold"] == "65536"  # not ours
    assert got["glibc.malloc.arena_max"] == "2"
    assert got["glibc.malloc.hugetlb"] == ALLOCATOR_TUNABLES["glibc.malloc.hugetlb"]


@pytest.mark.parametrize(
    ("env", "glibc", "huge_pages"),
    [
        ({NO_TUNING: "0"}, GLIBC, True),  # opted out
        ({}, None, True),  # not glibc (musl, macOS)
        ({}, (2, 34), True),  # no glibc.malloc.hugetlb before 2.35
        ({}, GLIBC, False),  # huge pages off: the fixed threshold alone costs time
        (
            {"GLIBC_TUNABLES": ":".join(f"{k}={v}" for k, v in ALLOCATOR_TUNABLES.items())},
            GLIBC,
            True,
        ),
    ],
)
def test_allocator_env_has_nothing_to_do(env, glibc, huge_pages):
    """None means no re-execution: in particular once the tunables are in place, so a
    re-executed process never re-executes again."""
    assert allocator_env(env, glibc, huge_pages) is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["simulate"], True),
        (["simulate", "x.toml", "--mode", "gossip"], True),
        (["compare", "x.toml", "--engine", "sim"], True),
        (["compare", "--engine=sim"], True),
        (["compare", "x.toml"], False),
        (["compare", "x.toml", "--engine", "launch"], False),
        (["launch", "simulate.toml"], False),
        (["peer", "x.toml", "--id", "sim"], False),
        ([], False),
    ],
)
def test_which_command_lines_run_the_simulator(argv, expected):
    assert simulates(argv) is expected


@pytest.mark.slow
def test_p2pfl_simulate_runs_under_the_tunables_and_writes_everything(tmp_path: Path):
    """The console command re-executes itself with the tunables (the simulator reports
    them in its log), then exits quickly without losing a line of its outputs."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "tiny"\nmode = "centralized"\n[topology]\npeers = 3\n[training]\nrounds = 2\n'
    )
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", NO_TUNING)}
    done = subprocess.run(
        [sys.executable, "-m", "p2pfl", "simulate", str(scenario), "--out", str(out)],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "sim" and summary["rounds"] == 2
    assert (out / "accuracy.png").stat().st_size > 0
    lines = [json.loads(x) for x in (out / "logs" / "sim.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if x["event"] == "round_done"] == [1, 2]
    start = next(x for x in lines if x["event"] == "sim_start")
    if (
        allocator_env(env, glibc_version(), thp_available()) is not None
    ):  # this machine takes the tunables
        assert set(ALLOCATOR_TUNABLES.items()) <= set(_parse(start["glibc_tunables"]).items())


def _parse(tunables: str | None) -> dict[str, str]:
    return dict(t.split("=", 1) for t in (tunables or "").split(":") if t)


def _job(out: Path) -> dict:
    from p2pfl.app import plot_worker

    rows = [{"round": r, "holdout_accuracy": 0.1 * r, "epsilon": None} for r in range(4)]
    return plot_worker.job({0: rows, 1: rows}, out, "t", None, privacy=False)


@pytest.mark.slow
def test_the_plot_worker_draws_the_plots(tmp_path: Path):
    """The helper process imports matplotlib, then draws the job it is handed."""
    from p2pfl.app import plot_worker

    worker = plot_worker.PlotWorker()
    try:
        assert worker.draw(_job(tmp_path))
    finally:
        worker.close()
    assert (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_a_dead_plot_worker_costs_no_plot(tmp_path: Path):
    """A helper that is gone: `draw` reports it, and the caller's fallback draws here."""
    from p2pfl.app import plot_worker

    worker = plot_worker.PlotWorker()
    worker.close()  # killed before it got the job
    assert not worker.draw(_job(tmp_path))
    assert not (tmp_path / "accuracy.png").exists()
    plot_worker.draw(_job(tmp_path), worker)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
