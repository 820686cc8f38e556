"""The `p2pfl` command: parse arguments, call the layer below, map errors to exit codes.

Exit codes: 0 success, 1 the run failed (a peer failed, an error), 2 bad scenario or
arguments. Heavy modules are imported inside each command so `p2pfl peer` pays only
for what a peer needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from p2pfl.config.loader import with_mode
from p2pfl.config.schema import ScenarioError
from p2pfl.runtime import roles
from p2pfl.runtime.roles import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _print_summary(console: Any, summary: dict[str, Any], out: Path) -> None:
    acc = summary["final_holdout_accuracy"]
    console.print(
        f"[bold]{summary['scenario']}[/] ({summary['mode']}): "
        f"{len(summary['completed_peers'])}/{summary['peers']} peers completed "
        f"{summary['rounds']} rounds in {summary['wall_s']:.1f} s"
        + (" (simulated)" if summary.get("engine") == "sim" else "")
        + "; final holdout accuracy "
        + (
            f"mean {acc['mean']:.4f} (min {acc['min']:.4f}, max {acc['max']:.4f})"
            if acc["mean"] is not None
            else "n/a"
        )
    )
    if summary["failed_peers"]:
        console.print(f"[red]failed peers: {summary['failed_peers']}[/] (see {out / 'logs'})")
    c = summary.get("coordinator")
    if c is not None and c["exit_code"] != 0:
        colour = "red" if c["role"] == "server" else "yellow"
        console.print(
            f"[{colour}]coordinator ({c['role']}) exited with code {c['exit_code']}[/] "
            f"(see {out / 'logs' / 'coordinator.jsonl'})"
        )
    console.print(f"run folder: {out}")


def cmd_launch(args: argparse.Namespace) -> int:
    """Run every peer of the scenario (and its coordinator, if any) on this machine."""
    from rich.console import Console

    from p2pfl.app.launch import launch, run_failed
    from p2pfl.app.ports import LaunchError

    s = roles.scenario(args.scenario, mode=args.mode)
    out = roles.run_folder(args.out, s)
    console = Console()
    try:
        summary = launch(s, args.scenario, out, console)
    except LaunchError as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    console.line()
    _print_summary(console, summary, out)
    return EXIT_FAILED if run_failed(summary) else EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run every peer of the scenario in this process (the simulator engine)."""
    from rich.console import Console

    from p2pfl.app import simulate
    from p2pfl.app.ports import LaunchError
    from p2pfl.runtime.process import quick_exit
    from p2pfl.sim.population import ProcessLostError

    s = roles.scenario(args.scenario, mode=args.mode)
    out = roles.run_folder(args.out, s)
    console = Console()
    distributed = _distributed(args)
    try:
        result = simulate.run(s, out, console, distributed=distributed)
    except LaunchError as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProcessLostError as exc:
        print(f"p2pfl: {exc}; the summary of the rounds done is in {out}", file=sys.stderr)
        # now, not at exit: JAX's shutdown would wait out the lost process's heartbeat
        quick_exit(EXIT_FAILED)
    if distributed is None or distributed.process_id == 0:
        console.line()
        _print_summary(console, result.summary, out)
    return EXIT_OK


def _distributed(args: argparse.Namespace) -> Any:
    """`simulate`'s `jax.distributed` flags as a `process.Distributed`, or None."""
    from p2pfl.runtime.process import Distributed

    given = [args.coordinator_address, args.num_processes, args.process_id]
    if all(x is None for x in given):
        return None
    if any(x is None for x in given):
        raise ScenarioError("--coordinator-address, --num-processes and --process-id go together")
    try:
        return Distributed(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as exc:
        raise ScenarioError(f"--process-id / --num-processes: {exc}") from exc


def _run_mode(s: Any, scenario: Path | None, out: Path, engine: str, console: Any) -> dict:
    """One mode of `compare`: launched as processes, or simulated."""
    if engine == "sim":
        from p2pfl.app import simulate

        return simulate.run(s, out, console).summary
    from p2pfl.app.launch import launch

    return launch(s, scenario, out, console)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the scenario centralized, then gossip, and compare the two runs."""
    from rich.console import Console

    from p2pfl.app.compare import build_report, render_table, write_outputs
    from p2pfl.app.launch import run_failed
    from p2pfl.app.ports import LaunchError

    base = roles.scenario(args.scenario)
    root = Path(args.out) if args.out else Path("runs") / base.name
    console = Console()
    folders: dict[str, Path] = {}
    failed = False
    # both modes validated before either runs (a setting gossip refuses stops it here)
    scenarios = {mode: with_mode(base, mode) for mode in ("centralized", "gossip")}
    for mode, s in scenarios.items():
        folders[mode] = root / mode
        console.rule(f"{s.name}: {mode}" + (" (simulated)" if args.engine == "sim" else ""))
        try:
            summary = _run_mode(s, args.scenario, folders[mode], args.engine, console)
        except LaunchError as exc:
            print(f"p2pfl: {exc}", file=sys.stderr)
            return EXIT_FAILED
        console.line()
        _print_summary(console, summary, folders[mode])
        failed |= run_failed(summary)
    try:
        report = build_report(folders["centralized"], folders["gossip"], args.target)
    except ValueError as exc:  # a run left too little to compare (its summary says why)
        print(f"p2pfl: cannot compare: {exc}", file=sys.stderr)
        return EXIT_FAILED
    write_outputs(report, folders["centralized"], folders["gossip"], root)
    console.line()
    console.print(render_table(report))
    console.print(
        f"written: {root / 'compare.json'}, {root / 'compare.md'}, {root / 'compare.png'}"
    )
    return EXIT_FAILED if failed else EXIT_OK


def cmd_peer(args: argparse.Namespace) -> int:
    """Run one peer (one per host in a real deployment)."""
    return roles.peer(
        roles.PeerArgs(
            args.scenario,
            args.id,
            args.mode,
            args.out,
            args.address,
            args.resume,
            args.log_level,
            args.insecure,
        )
    )


def cmd_coordinator(args: argparse.Namespace) -> int:
    """Run the coordinator: bootstrap registry (gossip) or FedAvg server (centralized)."""
    return roles.coordinator(
        roles.CoordinatorArgs(args.scenario, args.mode, args.out, args.log_level, args.insecure)
    )


def cmd_privacy(args: argparse.Namespace) -> int:
    """Print the ε a scenario's peers will have, before running anything."""
    from rich.console import Console

    from p2pfl.app import reports

    reports.privacy(roles.scenario(args.scenario), Console())
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    """Write one CurveZMQ keypair per peer and one for the coordinator."""
    from p2pfl.net.keys import create

    s = roles.scenario(args.scenario)
    if args.out is not None:
        folder = Path(args.out)
    elif s.security.keys not in (None, "auto"):
        folder = s.resolve(s.security.keys)
    else:
        raise ScenarioError(
            "p2pfl keys needs --out DIR (or a scenario whose [security] keys names a folder)"
        )
    try:
        written = create(folder, s.peers, force=args.force)
    except FileExistsError as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"p2pfl: cannot write keys to {folder}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"wrote {len(written) // 2} keypairs ({s.peers} peers and the coordinator) to {folder}\n"
        f"  public keys:  {folder / 'public'}/  copy to every host\n"
        f"  secret keys:  {folder / 'private'}/  copy each host only its own file (mode 0600)\n"
        f'then set [security] keys = "{folder}" in the scenario (relative to the scenario file)'
    )
    return EXIT_OK


def cmd_topology(args: argparse.Namespace) -> int:
    """Print (or draw) the scenario's graph and its mixing figures."""
    from p2pfl.app import reports

    reports.topology(roles.scenario(args.scenario), args.json, args.png)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2pfl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def scenario_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "scenario",
            nargs="?",
            type=Path,
            default=None,
            help="scenario TOML file (default: the built-in quickstart settings)",
        )

    def mode_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--mode",
            choices=["gossip", "centralized"],
            help="run the scenario in this mode instead of the file's",
        )

    def insecure_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--insecure",
            action="store_true",
            help="allow a non-loopback address without [security] keys (models in clear, "
            "senders unauthenticated)",
        )

    def log_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    q = sub.add_parser("launch", help="run every peer of a scenario on this machine")
    scenario_arg(q)
    mode_arg(q)
    q.add_argument("--out", help="run folder (default: runs/<name>/<mode>)")
    q.set_defaults(func=cmd_launch)

    q = sub.add_parser("compare", help="run a scenario centralized and gossip, compare them")
    scenario_arg(q)
    q.add_argument("--out", help="folder for both runs and compare.* (default: runs/<name>)")
    q.add_argument(
        "--target",
        type=float,
        help="holdout accuracy for 'rounds to reach' (default: 0.95 x the lower final mean)",
    )
    q.add_argument(
        "--engine",
        choices=["launch", "sim"],
        default="launch",
        help="launch: real processes and sockets (default); sim: every peer in this process",
    )
    q.set_defaults(func=cmd_compare)

    q = sub.add_parser(
        "simulate", help="run every peer of a scenario in this process (same maths, no sockets)"
    )
    scenario_arg(q)
    mode_arg(q)
    q.add_argument("--out", help="run folder (default: runs/<name>/<mode>)")
    q.add_argument(
        "--coordinator-address",
        help="jax.distributed: HOST:PORT of process 0; every process runs this same "
        "command with its own --process-id, and process 0 writes the run folder",
    )
    q.add_argument("--num-processes", type=int, help="jax.distributed: how many processes")
    q.add_argument("--process-id", type=int, help="jax.distributed: this process, 0..N-1")
    q.set_defaults(func=cmd_simulate)

    q = sub.add_parser("peer", help="run one peer of a scenario")
    scenario_arg(q)
    mode_arg(q)
    q.add_argument("--id", type=int, required=True, help="this peer's id, 0..peers-1")
    insecure_arg(q)
    q.add_argument(
        "--address",
        help="bind and advertise this tcp://HOST:PORT (gossip with coordinator.bootstrap)",
    )
    q.add_argument("--out", help="run folder (default: runs/<name>/<mode>)")
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue from this peer's checkpoint in the run folder, then catch up (gossip: "
        "with the neighbours' newest models; centralized: with the next global model)",
    )
    log_arg(q)
    q.set_defaults(func=cmd_peer)

    q = sub.add_parser(
        "coordinator", help="run the coordinator (bootstrap for gossip, or the FedAvg server)"
    )
    scenario_arg(q)
    mode_arg(q)
    q.add_argument("--out", help="run folder (default: runs/<name>/<mode>)")
    insecure_arg(q)
    log_arg(q)
    q.set_defaults(func=cmd_coordinator)

    q = sub.add_parser("privacy", help="print the ε a scenario's peers will spend, per 10 rounds")
    scenario_arg(q)
    q.set_defaults(func=cmd_privacy)

    q = sub.add_parser("keys", help="write CurveZMQ keys for a scenario's peers and coordinator")
    scenario_arg(q)
    q.add_argument("--out", help="keys folder (default: the scenario's [security] keys)")
    q.add_argument("--force", action="store_true", help="replace keys already in the folder")
    q.set_defaults(func=cmd_keys)

    q = sub.add_parser("topology", help="print a scenario's graph and its spectral figures")
    scenario_arg(q)
    q.add_argument("--json", action="store_true", help="print JSON for machines")
    q.add_argument("--png", help="also draw the graph to this PNG file")
    q.set_defaults(func=cmd_topology)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `p2pfl` console script."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ScenarioError as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("p2pfl: interrupted", file=sys.stderr)
        return 130
