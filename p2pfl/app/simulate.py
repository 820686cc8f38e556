"""`p2pfl simulate`: the scenario's every peer in this process, with a progress bar.

The simulator (`p2pfl.sim`) does the rounds; this module prepares the process (JAX's
persistent compile cache, the log file), cleans the run folder as `launch` does,
shows a rich progress bar over rounds, and draws `accuracy.png` from the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from p2pfl.app import plot_worker
from p2pfl.app.launch import clean_run_folder
from p2pfl.config.schema import Scenario
from p2pfl.runtime import logs, process

MAX_PLOTTED = 64  # peers drawn one line each in accuracy.png; more: the mean and a band


def run(
    scenario: Scenario,
    out: Path,
    console: Console | None = None,
    library: bool = False,
    model: Any = None,
    data: Any = None,
    distributed: process.Distributed | None = None,
) -> Any:
    """Simulate `scenario` into run folder `out` and return the `p2pfl.sim` Result.

    The log goes to `out/logs/sim.jsonl`; as a `library` (the Python API) only when the
    process has not configured structlog itself. Ctrl-C stops after the round in
    progress; the summary of what ran is still written (`interrupted: true`), then
    KeyboardInterrupt propagates. `distributed`: this process is one of several
    (`jax.distributed`) sharing the peers; only the first writes the run folder, shows
    progress and draws the plots, the others log to stderr.
    """
    first = distributed is None or distributed.process_id == 0
    if distributed is not None:
        process.join(distributed)
    # the command line's plots are drawn by a helper that imports matplotlib meanwhile;
    # a library call draws its own (no child processes in the caller's process)
    worker = plot_worker.PlotWorker() if first and not library else None
    try:
        return _run(scenario, out, console, library, model, data, worker, first)
    finally:
        if worker is not None:
            worker.close()


def _run(
    scenario: Scenario,
    out: Path,
    console: Console | None,
    library: bool,
    model: Any,
    data: Any,
    worker: plot_worker.PlotWorker | None,
    first: bool,
) -> Any:
    import structlog

    process.enable_compile_cache()
    from p2pfl.config.plan import sim_plan
    from p2pfl.sim.engine import RoundDone, simulate

    if not first:
        logs.configure(None)  # the first process writes the run folder, its log included
    else:
        clean_run_folder(out)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        if not library:
            logs.configure(out / "logs" / "sim.jsonl")
        elif not structlog.is_configured():
            logs.configure(out / "logs" / "sim.jsonl", level="debug", cache=False)
    plan = sim_plan(scenario, out, model=model, data=data)
    progress = Progress(
        TextColumn(f"[bold]{scenario.name}[/] ({scenario.mode}, {scenario.peers} peers, sim)"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[accuracy]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(),
        transient=False,
        disable=not first,
    )
    task = progress.add_task("rounds", total=scenario.training.rounds, accuracy="")

    def on_round(done: RoundDone) -> None:
        acc = done.mean_holdout_accuracy
        shown = "" if acc is None else f"holdout {acc:.3f}"
        progress.update(task, completed=done.round, accuracy=shown)

    with progress:
        result = simulate(plan, on_round)
    if first:
        plot(result, scenario, out, worker)
    if result.summary.get("interrupted"):
        raise KeyboardInterrupt
    return result


def plot(
    result: Any, scenario: Scenario, out: Path, worker: plot_worker.PlotWorker | None = None
) -> None:
    """`accuracy.png`: peers' holdout accuracy per round (the first `MAX_PLOTTED` of
    them drawn one by one), their mean, and the server's global model; `privacy.png`
    with DP."""
    import numpy as np

    acc, eps = result.history["holdout_accuracy"], result.history["epsilon"]
    histories = {
        i: [
            {
                "round": r,
                "holdout_accuracy": float(acc[r, i]),
                "epsilon": None if np.isnan(eps[r, i]) else float(eps[r, i]),
            }
            for r in range(acc.shape[0])
            if not np.isnan(acc[r, i])
        ]
        for i in range(min(acc.shape[1], MAX_PLOTTED))
    }
    title = f"{scenario.name} ({scenario.mode}, simulated)"
    if acc.shape[1] > MAX_PLOTTED:
        title += f": the first {MAX_PLOTTED} of {acc.shape[1]} peers"
    privacy = result.summary.get("privacy") is not None
    plot_worker.draw(plot_worker.job(histories, out, title, result.server or None, privacy), worker)
