"""Helpers shared by the benchmarks: result rows, the table, scenario copies, launching.

Nothing here asserts a time: every benchmark measures in one run and reports a value
next to its target and the ratio between them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from p2pfl.app.ports import free_base_port
from p2pfl.config.schema import dumps as to_toml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "scenarios" / "quickstart.toml"


@dataclass(frozen=True)
class Row:
    """One measured figure: `ratio` is value/target, so <= 1 meets an upper-bound target."""

    metric: str
    value: float
    unit: str
    target: float | None = None
    better: str = "lower"  # "lower": target is a ceiling; "higher": a floor; "about": ±10%
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.target is None or self.target == 0:
            return None
        return self.value / self.target

    @property
    def ok(self) -> bool | None:
        if self.target is None:
            return None
        if self.better == "about":
            return abs(self.value / self.target - 1) <= 0.1
        return self.value <= self.target if self.better == "lower" else self.value >= self.target


def fmt(x: float, unit: str = "") -> str:
    """A short human form of a number."""
    if math.isnan(x):
        return "n/a"
    mag = abs(x)
    text = f"{x:.0f}" if mag >= 1000 else f"{x:.3g}" if mag >= 0.01 or mag == 0 else f"{x:.2e}"
    return f"{text} {unit}".strip()


def print_table(title: str, rows: Sequence[Row], notes: Iterable[str] = ()) -> None:
    """One rich table: metric, value, target, ratio (value/target) and whether it is met."""
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("metric", "left"),
        ("value", "right"),
        ("target", "right"),
        ("ratio", "right"),
        ("met", "center"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        target = (
            "-"
            if r.target is None
            else {"lower": "≤ ", "about": "≈ "}.get(r.better, "≥ ") + fmt(r.target, r.unit)
        )
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        met = {None: "", True: "[green]yes[/]", False: "[red]NO[/]"}[r.ok]
        table.add_row(escape(r.metric), fmt(r.value, r.unit), target, ratio, met, escape(r.note))
    console = Console(width=max(120, Console().width))
    console.print(table)
    for n in notes:
        console.print(f"  - {escape(n)}")


def machine_note() -> str:
    """Cores and the load other processes put on them: benchmarks here share 2 cores."""
    load1, _, _ = os.getloadavg()
    return f"{len(os.sched_getaffinity(0))} cores usable, load average (1 min) {load1:.2f}"


def other_p2pfl_processes() -> list[int]:
    """Pids of p2pfl peers, launches, probes or test runs not started by this benchmark.

    This benchmark's own processes are itself, its descendants and its ancestors (a
    driver such as run_all). Another benchmark counts through what it runs (its
    launches, peers and probes), not while it only waits for quiet itself, so two
    benchmarks waiting for each other do not both wait out their whole limit.
    """
    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    mine |= {a.pid for a in me.parents()}
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in mine:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if "p2pfl" in cmd or "pytest" in cmd or "bench/_probe.py" in cmd:
            pids.append(p.info["pid"])
    return pids


class Watch:
    """Polls `other_p2pfl_processes` every `period_s` from a thread while a measurement
    runs (`with Watch() as w: ...`); `w.seen` is the most found at once, so a figure
    taken while someone else's peers or tests started can say so."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.seen = max(self.seen, len(other_p2pfl_processes()))
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def note(self, what: str) -> str | None:
        """A warning line if other processes were seen during `what`."""
        if not self.seen:
            return None
        return (
            f"WARNING: up to {self.seen} other p2pfl/pytest processes ran during {what}; "
            "its timings are contended"
        )


def wait_quiet(max_s: float) -> float:
    """Wait up to max_s for other p2pfl/pytest processes to finish; seconds waited."""
    t0 = time.monotonic()
    while other_p2pfl_processes() and time.monotonic() - t0 < max_s:
        time.sleep(1.0)
    return time.monotonic() - t0


def contention_note() -> str | None:
    """A warning line when someone else's peers or tests are running right now."""
    others = other_p2pfl_processes()
    if others:
        return (
            f"WARNING: {len(others)} other p2pfl/pytest processes were running at the start "
            "(another engineer's tests?); timings below are contended"
        )
    return None


def add_quiet_arg(p: Any) -> None:
    """The --wait-quiet option every benchmark script takes."""
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for other p2pfl/pytest processes to end",
    )


def preamble(wait_s: float = 0.0) -> list[str]:
    """Optionally wait for a quiet machine; the notes that say how quiet it was."""
    waited = wait_quiet(wait_s) if wait_s > 0 else 0.0
    notes = [machine_note() + (f" (waited {waited:.0f} s for quiet)" if waited >= 1 else "")]
    if (c := contention_note()) is not None:
        notes.append(c)
    return notes


# -- scenarios -----------------------------------------------------------------------


def scenario_copy(folder: Path, source: Path = QUICKSTART, **sections: dict[str, Any]) -> Path:
    """Write the scenario with a free base port and the given per-section overrides."""
    raw = tomllib.loads(source.read_text())
    peers = raw.get("topology", {}).get("peers", 8)
    raw.setdefault("network", {})["base_port"] = free_base_port(peers)
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    path = folder / source.name
    path.write_text(to_toml(raw))
    return path


def peers_of(path: Path) -> int:
    """Number of peers in a scenario file."""
    return int(tomllib.loads(path.read_text()).get("topology", {}).get("peers", 8))


def p2pfl_command() -> list[str]:
    """The installed `p2pfl` console script next to this interpreter."""
    script = Path(sys.executable).with_name("p2pfl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "p2pfl"]


def launch(
    scenario: Path,
    out: Path,
    *extra: str,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `p2pfl launch` on a scenario, its console output discarded.

    `command` is the entry point (default: this checkout's, `p2pfl_command()`), `env`
    the environment (default: this one); `extra` goes after the launch's arguments.
    """
    return subprocess.Popen(
        [*(command or p2pfl_command()), "launch", str(scenario), "--out", str(out), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=out.parent,
        env=env,
    )


def wait_launch(proc: subprocess.Popen[bytes], timeout_s: float = 180.0) -> None:
    """Wait for a launch to finish; raise with its stderr if it failed."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=15)
        raise RuntimeError(f"p2pfl launch did not finish in {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"p2pfl launch exited {proc.returncode}: {err.decode()[-2000:]}")


def run_quickstart(folder: Path, **sections: dict[str, Any]) -> tuple[Path, float, float]:
    """Launch a modified quickstart to completion: (run folder, epoch start, wall seconds)."""
    scenario = scenario_copy(folder, **sections)
    out = folder / "run"
    t0 = time.time()
    proc = launch(scenario, out)
    wait_launch(proc)
    return out, t0, time.time() - t0


PROBE = Path(__file__).resolve().parent / "_probe.py"


def run_probe(
    *args: str,
    importtime: bool = False,
    timeout_s: float = 300.0,
    probe: Path = PROBE,
    env: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Run bench/_probe.py with these arguments: (stdout, stderr); raises with its stderr.

    `probe` and `env` run another checkout's probe against its own code (see
    `Checkout`).
    """
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), str(probe), *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=env
    )
    if proc.returncode != 0:
        tail = "\n".join(
            line for line in proc.stderr.splitlines() if not line.startswith("import time:")
        )[-3000:]
        raise RuntimeError(f"probe {' '.join(args[:1])} failed ({proc.returncode}):\n{tail}")
    return proc.stdout, proc.stderr


# -- reading a run folder ------------------------------------------------------------


def histories(out: Path) -> dict[int, list[dict[str, Any]]]:
    """peer id -> its per-round records."""
    result = {}
    for path in sorted(out.glob("peer-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        result[int(path.stem.split("-")[1])] = rows
    return result


def log_events(out: Path) -> dict[int, list[dict[str, Any]]]:
    """peer id -> its structlog events, each with `ts` (epoch seconds) added."""
    result = {}
    for path in sorted((out / "logs").glob("peer-*.jsonl")):
        events = []
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "timestamp" in e:
                e["ts"] = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            events.append(e)
        result[int(path.stem.split("-")[1])] = events
    return result


def median(xs: Iterable[float]) -> float:
    """Median, NaN for no values."""
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def peer_processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's peers: children of its forkserver child (the launcher's grandchildren)."""
    peers = []
    for child in launcher.children():
        try:
            peers.extend(child.children())
        except psutil.NoSuchProcess:
            continue
    return peers


# -- another revision, side by side ----------------------------------------------------


@dataclass(frozen=True)
class Code:
    """One revision of p2pfl a benchmark runs: its entry point, environment and probe."""

    label: str  # "ours", or the other revision's short hash
    command: tuple[str, ...]  # how to run its `p2pfl`
    env: dict[str, str] | None  # None: this environment (this checkout's install)
    probe: Path  # its own bench/_probe.py, which matches its code


OURS = Code("ours", tuple(p2pfl_command()), None, PROBE)


def _git(*args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Code]:
    """Revision `rev` in a temporary `git worktree` (detached), as a `Code` to run.

    Its code runs with `PYTHONPATH` at the worktree (ahead of this checkout's editable
    install) through its own entry point, `python -m p2pfl`; no bytecode is written
    into it. The worktree is removed (`git worktree remove --force`) on the way out,
    whatever happened.
    """
    short = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    path = Path(tempfile.gettempdir()) / f"p2pfl-{short}"
    if path.exists():  # left by a run that was killed: do not touch it
        path = Path(tempfile.mkdtemp(prefix=f"p2pfl-{short}-")) / "tree"
    _git("worktree", "add", "--detach", str(path), short)
    try:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(path), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        found = subprocess.run(
            [sys.executable, "-c", "import p2pfl; print(p2pfl.__file__)"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
            check=False,
        ).stdout.strip()
        if not found.startswith(str(path)):
            raise RuntimeError(f"{short}: PYTHONPATH={path} imports p2pfl from {found!r}")
        yield Code(short, (sys.executable, "-m", "p2pfl"), env, path / "bench" / "_probe.py")
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
            capture_output=True,
            check=False,
        )
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True, check=False
        )
