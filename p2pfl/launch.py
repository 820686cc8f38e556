"""Start one OS process per peer, pin them to cores, show progress, collect the run folder.

The launcher owns the child processes: they die with it (PR_SET_PDEATHSIG), on Ctrl-C,
and on any error of its own. A child that fails does not stop the others: the run
goes on and `summary.json` lists it under `failed_peers`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl import history
from p2pfl.scenario import Scenario

TICK_S = 0.25  # progress refresh period (the launcher only watches; peers never sleep)
STOP_GRACE_S = 5.0  # after SIGTERM, time before SIGKILL
MAX_TABLE_ROWS = 16  # larger runs show a one-line summary instead of a row per peer
_PR_SET_PDEATHSIG = 1


def _die_with_parent(core: int | None) -> Callable[[], None]:
    def setup() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if core is not None:
            os.sched_setaffinity(0, {core})

    return setup


@dataclass
class _Tail:
    """Reads the new complete lines of a growing JSON-lines file."""

    path: Path
    offset: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            self.rows.append(json.loads(line))
        self.offset += end


def default_out(scenario: Scenario, mode: str = "gossip") -> Path:
    """`runs/<scenario name>/<mode>`."""
    return Path("runs") / scenario.name / mode


def _clean(out: Path) -> None:
    for pattern in ("peer-*.jsonl", "summary.json", "accuracy.png"):
        for p in out.glob(pattern):
            p.unlink()
    for sub in ("models", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)


def peer_command(scenario_path: Path | None, peer_id: int, out: Path) -> list[str]:
    """The command line that runs one peer, as a user would type it on a host."""
    cmd = [sys.executable, "-m", "p2pfl", "peer"]
    if scenario_path is not None:
        cmd.append(str(scenario_path))
    return [*cmd, "--id", str(peer_id), "--out", str(out)]


class Launcher:
    """Runs every peer of a scenario on this machine and writes the run folder."""

    def __init__(
        self, scenario: Scenario, scenario_path: Path | None, out: Path, console: Console
    ) -> None:
        self.s = scenario
        self.path = scenario_path
        self.out = out
        self.console = console
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.tails = {i: _Tail(out / f"peer-{i}.jsonl") for i in range(scenario.peers)}

    def start(self) -> None:
        """Spawn the peers, pinned round-robin to the cores this process may use."""
        _clean(self.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))
        for i in range(self.s.peers):
            with (self.out / "logs" / f"peer-{i}.stderr").open("wb") as err:
                self.procs[i] = subprocess.Popen(
                    peer_command(self.path, i, self.out),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=_die_with_parent(cores[i % len(cores)]),  # noqa: PLW1509 (no threads yet)
                )

    def stop(self) -> None:
        """Terminate every child still running; SIGKILL the ones that ignore it."""
        alive = [p for p in self.procs.values() if p.poll() is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in alive:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _view(self, progress: Progress, task: Any) -> Group:
        rounds = self.s.training.rounds
        done = sum(max(0, len(t.rows) - 1) for t in self.tails.values())
        progress.update(task, completed=done)
        accs = [t.rows[-1]["holdout_accuracy"] for t in self.tails.values() if t.rows]
        accs = [a for a in accs if a is not None]
        mean = f"{sum(accs) / len(accs):.3f}" if accs else "-"
        if self.s.peers > MAX_TABLE_ROWS:
            return Group(progress, f"mean holdout accuracy {mean}")
        table = Table("peer", "round", "holdout acc", "status", title=f"mean holdout {mean}")
        for i, t in self.tails.items():
            rc = self.procs[i].poll()
            status = "running" if rc is None else ("done" if rc == 0 else f"failed ({rc})")
            last = t.rows[-1] if t.rows else {}
            acc = last.get("holdout_accuracy")
            table.add_row(
                str(i),
                f"{last.get('round', '-')}/{rounds}",
                "-" if acc is None else f"{acc:.3f}",
                status,
            )
        return Group(progress, table)

    def watch(self) -> None:
        """Show live progress until every peer has exited."""
        progress = Progress(
            TextColumn(f"[bold]{self.s.name}[/] rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        task = progress.add_task("rounds", total=self.s.peers * self.s.training.rounds)
        with Live(self._view(progress, task), console=self.console, refresh_per_second=4) as live:
            while any(p.poll() is None for p in self.procs.values()):
                time.sleep(TICK_S)
                for t in self.tails.values():
                    t.poll()
                live.update(self._view(progress, task))
            for t in self.tails.values():
                t.poll()
            live.update(self._view(progress, task))

    def finish(self, wall_s: float) -> dict[str, Any]:
        """Write `summary.json` and `accuracy.png` from the peers' histories."""
        histories = {i: history.read(t.path) for i, t in self.tails.items()}
        completed = [i for i, p in self.procs.items() if p.returncode == 0]
        failed = [i for i, p in self.procs.items() if p.returncode != 0]
        summary = history.summarize(
            self.s.name, self.s.mode, self.s.training.rounds, histories, completed, failed, wall_s
        )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from p2pfl.plots import accuracy_plot

        accuracy_plot(histories, self.out / "accuracy.png", title=f"{self.s.name} ({self.s.mode})")
        return summary


def launch(
    scenario: Scenario, scenario_path: Path | None, out: Path, console: Console
) -> dict[str, Any]:
    """Run a whole scenario locally and return its summary."""
    launcher = Launcher(scenario, scenario_path, out, console)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        launcher.start()
        launcher.watch()
    finally:
        launcher.stop()
        signal.signal(signal.SIGTERM, previous)
    return launcher.finish(time.perf_counter() - t0)
