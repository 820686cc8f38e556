"""Ports on this machine: can a scenario's addresses be bound now, and a free range for tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from p2pfl.config.schema import Scenario


class LaunchError(RuntimeError):
    """The run cannot start on this machine (for instance a port is taken)."""


def bound_addresses(scenario: Scenario) -> dict[str, str]:
    """What a local launch binds, by who binds it: the peers' gossip inboxes (gossip
    mode), the coordinator's control channel, and its update channel (centralized)."""
    addresses = (
        {}
        if scenario.mode == "centralized"
        else {f"peer {i}": scenario.address(i) for i in range(scenario.peers)}
    )
    if scenario.needs_coordinator:
        control, updates = scenario.coordinator_addresses()
        addresses["coordinator"] = control
        if scenario.mode == "centralized":
            addresses["coordinator updates"] = updates
    return addresses


def unusable_addresses(scenario: Scenario) -> list[str]:
    """Peer addresses this machine cannot bind now, each with the reason.

    Checked before anything starts, so a second run on the same ports fails at once
    with a clear message instead of eight peers dying on `Address already in use`.
    SO_REUSEADDR matches what ZeroMQ sets, so ports in TIME_WAIT do not count.
    """
    problems = []
    for who, addr in bound_addresses(scenario).items():
        host, _, port = addr.removeprefix("tcp://").rpartition(":")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, int(port)))
            except OSError as exc:
                problems.append(f"{who} {addr}: {exc.strerror}")
    return problems


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux; a common default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_base_port(count: int, host: str = "127.0.0.1") -> int:
    """A base port such that base..base+count-1 can all be bound on `host` right now.

    The range is drawn outside the kernel's ephemeral range: there, the peers' own
    outgoing connections could take a port before the peer that owns it binds it.
    """
    low, high = _ephemeral_range()
    spans = [(1024, low - count), (high + 1, 65000 - count)]
    spans = [(a, b) for a, b in spans if b > a]
    rng = random.Random()
    for _ in range(200):
        a, b = rng.choice(spans)
        base = rng.randrange(a, b)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise LaunchError(f"no range of {count} free ports on {host}")
