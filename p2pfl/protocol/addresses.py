"""Peer and coordinator addresses: the one ZeroMQ endpoint form p2pfl accepts."""

from __future__ import annotations

import ipaddress


def check_tcp(addr: str, max_port: int = 65535) -> None:
    """Raise ValueError unless `addr` is tcp://HOST:PORT, PORT in 1..max_port (no IPv6)."""
    host, _, port = addr.removeprefix("tcp://").rpartition(":")
    if (
        not addr.startswith("tcp://")
        or not host
        or not port.isdigit()
        or not 1 <= int(port) <= max_port
    ):
        raise ValueError(
            f"address {addr!r} must look like tcp://HOST:PORT with PORT in 1..{max_port}"
        )
    if host.startswith("["):
        raise ValueError(f"address {addr!r}: IPv6 is not supported yet")


def is_loopback(addr: str) -> bool:
    """True when tcp://HOST:PORT names this machine only (127.0.0.0/8 or localhost):
    what nobody else can reach. A name or a wildcard (`*`, 0.0.0.0) is not."""
    host = addr.removeprefix("tcp://").rpartition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
