"""Start one OS process per peer, pin them to cores, show progress, collect the run folder.

Peers are forked from a multiprocessing forkserver that has already imported JAX and
the peer's modules, so eight peers on two cores do not each pay a second of imports
(start-up went from about 10 s to about 4 s). Each child then runs exactly what
`p2pfl peer SCENARIO --id N` runs. The launcher owns the children: they die with it
(PR_SET_PDEATHSIG), on Ctrl-C, and on any error of its own. A child that fails does
not stop the others: the run goes on and `summary.json` lists it under `failed_peers`.

When the scenario needs a coordinator (centralized mode, or gossip with bootstrap) it
is started first, the same way, as `p2pfl coordinator SCENARIO`. In centralized mode
its failure fails the run; a bootstrap coordinator is not needed once peers are
connected, so only the peers decide the outcome there.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pfl.app import plot_worker, precompile
from p2pfl.app.ports import LaunchError, bound_addresses, unusable_addresses
from p2pfl.config.keys import check_keys
from p2pfl.config.loader import MAX_LAUNCH_PEERS
from p2pfl.config.privacy import privacy_settings
from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.net.keys import create as create_keys
from p2pfl.protocol.addresses import is_loopback
from p2pfl.record import history
from p2pfl.runtime import process, roles

TICK_S = 0.25  # progress refresh period (the launcher only watches; peers never sleep)
STOP_GRACE_S = 5.0  # after SIGTERM, time before SIGKILL
MAX_TABLE_ROWS = 16  # larger runs show a one-line summary instead of a row per peer
COORDINATOR_END_S = 15.0  # after the last peer exits, time the coordinator gets to finish
_PR_SET_PDEATHSIG = 1


def _child_main(role: roles.PeerArgs | roles.CoordinatorArgs, core: int, stderr_path: str) -> None:
    """Body of a forked child: pin, die with the parent, then run the role in-process,
    exactly as `p2pfl peer` / `p2pfl coordinator` would."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.sched_setaffinity(0, {core})
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(roles.guarded(role))


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
            try:
                self.rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a damaged line must not stop the watcher (history.read skips it too)
        self.offset += end


def _status(exitcode: int | None, started: bool) -> str:
    if exitcode is None:
        return "running" if started else "starting"
    return "done" if exitcode == 0 else f"failed ({exitcode})"


def run_failed(summary: dict[str, Any]) -> bool:
    """A run fails when a peer failed, or when a centralized run's server did."""
    c = summary.get("coordinator")
    server_failed = c is not None and c["role"] == "server" and c["exit_code"] != 0
    return bool(summary["failed_peers"]) or server_failed


RUN_MARKERS = ("pids.json", "summary.json")  # files only a p2pfl run folder has


def clean_run_folder(out: Path) -> None:
    """Remove an earlier run's files; refuse a non-empty folder that is not a run folder."""
    if out.exists() and any(out.iterdir()) and not any((out / m).exists() for m in RUN_MARKERS):
        raise LaunchError(
            f"--out {out}: the folder is not empty and is not an earlier p2pfl run "
            "(no pids.json or summary.json); choose another folder"
        )
    patterns = ("peer-*.jsonl", "coordinator.jsonl", "summary.json", "*.png", "pids.json")
    for pattern in (*patterns, "history.npz"):
        for p in out.glob(pattern):
            p.unlink()
    for sub in ("models", "logs", "checkpoints", "keys"):
        shutil.rmtree(out / sub, ignore_errors=True)


def prepare_keys(s: Scenario, out: Path) -> None:
    """`[security] keys = "auto"`: fresh keys in the run folder's `keys/`. Then every
    node's keyring is loaded once, so a missing or bad key file stops the launch before
    any process starts (a ScenarioError naming the file)."""
    if s.security.keys == "auto":
        create_keys(out / "keys", s.peers, force=True)
    if s.security.keys is not None:
        check_keys(s, out)


def peer_args(
    scenario_path: Path | None, mode: str, peer_id: int, out: Path, resume: bool = False
) -> roles.PeerArgs:
    """One peer's arguments, as a user would give `p2pfl peer` on a host."""
    return roles.PeerArgs(scenario_path, peer_id, mode, str(out), resume=resume)


def coordinator_args(scenario_path: Path | None, mode: str, out: Path) -> roles.CoordinatorArgs:
    """The coordinator's arguments, as a user would give `p2pfl coordinator`."""
    return roles.CoordinatorArgs(scenario_path, mode, str(out))


class Launcher:
    """Runs every peer of a scenario on this machine and writes the run folder."""

    def __init__(
        self, scenario: Scenario, scenario_path: Path | None, out: Path, console: Console
    ) -> None:
        self.s = scenario
        self.path = scenario_path
        self.out = out
        self.console = console
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.coordinator: multiprocessing.process.BaseProcess | None = None
        self.rejoin_at: dict[int, float] = {}  # peer -> when its injected crash ends
        self.rejoined: set[int] = set()
        self.tails = {i: _Tail(out / f"peer-{i}.jsonl") for i in range(scenario.peers)}
        self.server_tail = _Tail(out / "coordinator.jsonl")

    def start(self) -> None:
        """Spawn the peers, pinned round-robin to the cores this process may use."""
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        ctx = process.start_forkserver()  # already running when the console script began
        cores = sorted(os.sched_getaffinity(0))
        logs = self.out / "logs"
        if not precompile.run(ctx, self.s, cores[0], logs / "precompile.stderr"):
            self.console.print(
                "[yellow]compiling the shared train step failed; each peer compiles its own "
                f"(see {logs / 'precompile.stderr'})[/]"
            )
        if self.s.needs_coordinator:
            args = (
                coordinator_args(self.path, self.s.mode, self.out),
                cores[-1],
                str(logs / "coordinator.stderr"),
            )
            self.coordinator = ctx.Process(target=_child_main, args=args, name="p2pfl-coordinator")
            self.coordinator.start()
        self._ctx, self._cores = ctx, cores
        for i in range(self.s.peers):
            self._spawn(i)
        self._write_pids()

    def _spawn(self, i: int, resume: bool = False) -> None:
        stderr = str(self.out / "logs" / f"peer-{i}.stderr")
        argv = peer_args(self.path, self.s.mode, i, self.out, resume)
        args = (argv, self._cores[i % len(self._cores)], stderr)
        self.procs[i] = self._ctx.Process(target=_child_main, args=args, name=f"p2pfl-peer-{i}")
        self.procs[i].start()

    def _rejoin_due(self) -> None:
        """Restart peers killed by an injected crash that has `rejoin_after_s`, when due."""
        now = time.monotonic()
        for i, p in self.procs.items():
            after = self.s.rejoin_after(i)
            if after is None or i in self.rejoined or p.exitcode != -signal.SIGKILL:
                continue
            due = self.rejoin_at.setdefault(i, now + after)
            if now >= due:
                self.rejoined.add(i)
                self._spawn(i, resume=True)
                self._write_pids()

    def _write_pids(self) -> None:
        pids: dict[str, int | None] = {str(i): p.pid for i, p in self.procs.items()}
        if self.coordinator is not None:
            pids["coordinator"] = self.coordinator.pid
        (self.out / "pids.json").write_text(json.dumps(pids) + "\n")

    def stop(self) -> None:
        """Terminate every child still running; SIGKILL the ones that ignore it."""
        alive = [p for p in self._children() if p.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()

    def _children(self) -> list[multiprocessing.process.BaseProcess]:
        extra = [self.coordinator] if self.coordinator is not None else []
        return [*self.procs.values(), *extra]

    def _view(self, progress: Progress, task: Any) -> Group:
        rounds = self.s.training.rounds
        if self.s.mode == "centralized":
            done = max(0, len(self.server_tail.rows) - 1)
        else:
            done = sum(max(0, len(t.rows) - 1) for t in self.tails.values())
        progress.update(task, completed=done)
        accs = [t.rows[-1]["holdout_accuracy"] for t in self.tails.values() if t.rows]
        accs = [a for a in accs if a is not None]
        mean = f"{sum(accs) / len(accs):.3f}" if accs else "-"
        if self.s.peers > MAX_TABLE_ROWS:
            return Group(progress, f"mean holdout accuracy {mean}")
        table = Table("peer", "round", "holdout acc", "status", title=f"mean holdout {mean}")
        for i, t in self.tails.items():
            status = _status(self.procs[i].exitcode, bool(t.rows))
            if self.procs[i].exitcode == -signal.SIGKILL and self.s.crash_round(i) is not None:
                status = "crashed (fault)"
            last = t.rows[-1] if t.rows else {}
            acc = last.get("holdout_accuracy")
            table.add_row(
                str(i),
                f"{last.get('round', '-')}/{rounds}",
                "-" if acc is None else f"{acc:.3f}",
                status,
            )
        if self.coordinator is not None:
            last = self.server_tail.rows[-1] if self.server_tail.rows else {}
            acc = last.get("holdout_accuracy") if self.s.mode == "centralized" else None
            table.add_row(
                "coordinator",
                f"{last.get('round', '-')}/{rounds}" if self.s.mode == "centralized" else "-",
                "-" if acc is None else f"{acc:.3f}",
                _status(self.coordinator.exitcode, bool(last) or self.s.mode == "gossip"),
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
        total = self.s.training.rounds
        task = progress.add_task("rounds", total=total * (1 if self.coordinated else self.s.peers))
        tails = [*self.tails.values(), self.server_tail]
        with Live(self._view(progress, task), console=self.console, refresh_per_second=4) as live:
            server_died: float | None = None
            while (alive := [p.sentinel for p in self.procs.values() if p.is_alive()]) or (
                set(self.rejoin_at) - self.rejoined
            ):
                multiprocessing.connection.wait(alive, TICK_S)
                self._rejoin_due()
                for t in tails:
                    t.poll()
                live.update(self._view(progress, task))
                if server_died is None and self._server_failed():
                    server_died = time.monotonic()
                elif server_died is not None and time.monotonic() - server_died > self._grace():
                    # Peers notice a dead server by themselves within coordinator_timeout_s;
                    # ones still waiting for their welcome (startup_timeout_s) are stopped.
                    self.stop()
            if self.coordinator is not None:  # it waits for the peers' byes, then exits
                c = self.s.centralized
                centralized = self.s.mode == "centralized"
                self.coordinator.join(
                    max(COORDINATOR_END_S, c.coordinator_timeout_s + 5) if centralized else 2.0
                )
            for t in tails:
                t.poll()
            live.update(self._view(progress, task))

    def _server_failed(self) -> bool:
        c = self.coordinator
        return self.s.mode == "centralized" and c is not None and c.exitcode not in (None, 0)

    def _grace(self) -> float:
        return self.s.centralized.coordinator_timeout_s + STOP_GRACE_S

    @property
    def coordinated(self) -> bool:
        """Rounds are counted by the server (centralized mode), not per peer."""
        return self.s.mode == "centralized"

    def finish(self, wall_s: float, started_at: float) -> dict[str, Any]:
        """Write `summary.json` and `accuracy.png` from the peers' histories."""
        histories = {i: history.read(t.path) for i, t in self.tails.items()}
        completed = [i for i, p in self.procs.items() if p.exitcode == 0]
        # peers killed on purpose ([faults] crash) are not failures of the run
        crashed = [
            i
            for i, p in self.procs.items()
            if p.exitcode == -signal.SIGKILL and self.s.crash_round(i) is not None
        ]
        failed = [i for i, p in self.procs.items() if p.exitcode != 0 and i not in crashed]
        coordinator = None
        if self.coordinator is not None:
            role = "server" if self.s.mode == "centralized" else "bootstrap"
            coordinator = {"role": role, "exit_code": self.coordinator.exitcode}
        server = history.read(self.server_tail.path) if self.s.mode == "centralized" else None
        summary = history.summarize(
            self.s.name,
            self.s.mode,
            self.s.training.rounds,
            histories,
            completed,
            failed,
            wall_s,
            started_at,
            coordinator,
            server,
            crashed,
            privacy=privacy_settings(self.s),
        )
        summary["rejoined_peers"] = sorted(self.rejoined)  # restarted from their checkpoint
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        title = f"{self.s.name} ({self.s.mode})"
        privacy = summary["privacy"] is not None
        plot_worker.draw_here(plot_worker.job(histories, self.out, title, server, privacy))
        return summary


def launch(
    scenario: Scenario, scenario_path: Path | None, out: Path, console: Console
) -> dict[str, Any]:
    """Run a whole scenario locally and return its summary.

    On Ctrl-C or SIGTERM every peer is stopped, the summary of what ran is still
    written, and the interruption propagates to the caller.
    """
    if scenario.peers > MAX_LAUNCH_PEERS:
        raise LaunchError(
            f"topology.peers = {scenario.peers}: p2pfl launch starts one process per peer, "
            f"at most {MAX_LAUNCH_PEERS}; run it with p2pfl simulate"
        )
    if scenario.security.keys is None:
        exposed = [a for a in bound_addresses(scenario).values() if not is_loopback(a)]
        if exposed:
            raise ScenarioError(
                f"{exposed[0]}: not a loopback address, and the scenario has no [security] "
                'keys: set [security] keys = "auto" to run this launch encrypted'
            )
    problems = unusable_addresses(scenario)
    if problems:
        raise LaunchError(
            "cannot bind the peers' addresses (another run on the same network.base_port?):\n  "
            + "\n  ".join(problems)
        )
    clean_run_folder(out)
    prepare_keys(scenario, out)
    launcher = Launcher(scenario, scenario_path, out, console)
    t0, started_at = time.perf_counter(), time.time()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        launcher.start()
        launcher.watch()
    finally:
        launcher.stop()
        signal.signal(signal.SIGTERM, previous)
        summary = launcher.finish(time.perf_counter() - t0, started_at)
    return summary
