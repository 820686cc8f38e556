"""Peer and coordinator addresses: the one ZeroMQ endpoint form p2pfl accepts."""

from __future__ import annotations


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
