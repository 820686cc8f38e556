"""The two process roles, `peer` and `coordinator`: set up the process, run, exit code.

`p2pfl peer` / `p2pfl coordinator` call these, and so do the launcher's forked children
(directly: no detour through the CLI). Set-up order matters: thread limits before JAX
is imported, then logs, then the shared compile cache. Heavy modules are imported
inside each function so that a process pays only for its own role.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from p2pfl.config.loader import load, with_mode
from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.protocol.addresses import check_tcp, is_loopback
from p2pfl.runtime import process

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def scenario(path: Path | None, peer: int | None = None, mode: str | None = None) -> Scenario:
    """The scenario at `path` (built-in defaults when None), in `mode` if given."""
    if path is None:
        return Scenario() if mode is None else with_mode(Scenario(), mode)
    return load(path, peer=peer, mode=mode)


def run_folder(out: str | Path | None, s: Scenario) -> Path:
    """`out`, or `runs/<scenario name>/<mode>`."""
    return Path(out) if out else Path("runs") / s.name / s.mode


@dataclass(frozen=True)
class PeerArgs:
    """What `p2pfl peer` takes."""

    scenario: Path | None
    peer_id: int
    mode: str | None = None
    out: str | None = None
    address: str | None = None
    resume: bool = False
    log_level: str = "info"
    insecure: bool = False  # allow a non-loopback address without [security] keys


@dataclass(frozen=True)
class CoordinatorArgs:
    """What `p2pfl coordinator` takes."""

    scenario: Path | None
    mode: str | None = None
    out: str | None = None
    log_level: str = "info"
    insecure: bool = False


def refuse_clear(s: Scenario, addresses: list[str], insecure: bool) -> None:
    """In clear (no `[security] keys`), refuse any address others can reach, unless
    `insecure`: then say so, once, at warning level."""
    if s.security.keys is not None:
        return
    exposed = sorted({a for a in addresses if not is_loopback(a)})
    if not exposed:
        return
    if not insecure:
        raise ScenarioError(
            f"{', '.join(exposed)}: not a loopback address, and the scenario has no "
            "[security] keys, so anyone who reaches it could read the models and speak as "
            "any peer. Make keys with `p2pfl keys SCENARIO --out DIR`, set "
            '[security] keys = "DIR" in the scenario, and copy DIR/public/ plus each '
            "host's own secret file to it; or pass --insecure to run in clear anyway"
        )
    import structlog

    structlog.get_logger().warning("insecure", addresses=exposed, reason="--insecure: in clear")


def finish_process() -> None:
    """Exit 0 at once: every file is closed and every socket flushed by now.

    Skipping the interpreter's and XLA's teardown saves each process about half a
    second of CPU.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK)


def _set_up(log_path: Path, level: str) -> None:
    process.limit_threads()
    from p2pfl.runtime import logs

    logs.configure(log_path, level)
    process.enable_compile_cache()


def peer(args: PeerArgs) -> int:
    """Run one peer (one per host in a real deployment); raises ScenarioError on bad input."""
    s = scenario(args.scenario, peer=args.peer_id, mode=args.mode)
    if not 0 <= args.peer_id < s.peers:
        raise ScenarioError(f"--id {args.peer_id}: the scenario has peers 0..{s.peers - 1}")
    if args.address is not None:
        try:
            check_tcp(args.address)
        except ValueError as exc:
            raise ScenarioError(f"--address: {exc}") from None
        if not s.coordinator.bootstrap or s.mode != "gossip":
            raise ScenarioError(
                "--address needs mode = 'gossip' with coordinator.bootstrap = true: "
                "otherwise the neighbours cannot learn it"
            )
    out = run_folder(args.out, s)
    _set_up(out / "logs" / f"peer-{args.peer_id}.jsonl", args.log_level)
    import structlog

    from p2pfl.runtime.client import CoordinatorLostError, run_client
    from p2pfl.runtime.peer import BootstrapError, run_peer

    try:
        if s.mode == "centralized":
            from p2pfl.config.plan import client_plan

            client = client_plan(s, args.peer_id, out, args.resume)
            refuse_clear(s, [client.control, client.updates], args.insecure)
            run_client(client)
        else:
            from p2pfl.config.plan import gossip_plan

            plan = gossip_plan(s, args.peer_id, out, args.address, args.resume)
            reached = [plan.address, *plan.neighbour_addresses.values(), plan.bootstrap or ""]
            refuse_clear(s, [a for a in reached if a], args.insecure)
            run_peer(plan)
    except (CoordinatorLostError, BootstrapError) as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        structlog.get_logger().exception("peer_failed", peer=args.peer_id)
        raise
    finish_process()
    return EXIT_OK


def coordinator(args: CoordinatorArgs) -> int:
    """Run the coordinator: bootstrap registry (gossip) or FedAvg server (centralized)."""
    import signal

    s = scenario(args.scenario, mode=args.mode)
    if not s.needs_coordinator:
        raise ScenarioError(
            "mode = 'gossip' without coordinator.bootstrap = true needs no coordinator "
            "(set mode = 'centralized', or coordinator.bootstrap = true)"
        )
    out = run_folder(args.out, s)
    _set_up(out / "logs" / "coordinator.jsonl", args.log_level)
    import structlog

    from p2pfl.config.plan import bootstrap_plan, server_plan
    from p2pfl.runtime.coordinator import SessionAbortedError, run_coordinator

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # close the sockets on the way out
    plan = server_plan(s, out) if s.mode == "centralized" else bootstrap_plan(s, out)
    refuse_clear(s, list(s.coordinator_addresses()), args.insecure)
    try:
        run_coordinator(plan)
    except SessionAbortedError as exc:
        print(f"p2pfl: coordinator: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        structlog.get_logger().exception("coordinator_failed")
        raise
    finish_process()
    return EXIT_OK


def guarded(role: PeerArgs | CoordinatorArgs) -> int:
    """Run a role as a process's whole life: a bad scenario exits 2 with its message."""
    try:
        return peer(role) if isinstance(role, PeerArgs) else coordinator(role)
    except ScenarioError as exc:
        print(f"p2pfl: {exc}", file=sys.stderr)
        return EXIT_USAGE
