"""What goes into a protocol machine and what comes out of it, as plain values.

A machine (sync gossip, FedAvg server or client, bootstrap) never touches a socket or
a clock: the runtime decodes what arrived into a `Received` (or a `Malformed` when the
wire check failed), feeds it with the time `now`, and carries out the `Send` actions
the machine returns. The runtime stamps its own id and the scenario hash on each send.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pfl.protocol.wire import Message

COORDINATOR = "coordinator"  # the address of a send to the coordinator (not a peer id)


@dataclass(frozen=True)
class Received:
    """A message that passed the wire checks.

    `authenticated` is the sender the transport vouches for (its CURVE key's identity),
    None while the transport cannot say; `origin` names the connection it came on where
    the socket tells (a ROUTER's routing id), else None; `size` is its bytes on the wire.
    """

    msg: Message
    size: int = 0
    authenticated: int | None = None
    origin: bytes | None = None


@dataclass(frozen=True)
class Malformed:
    """A message that failed the wire checks; `sender` and `round` are what its header
    claimed when only the arrays were bad (claims, never proof), else None; `origin`
    as in `Received` (which connection it came on, where the socket tells)."""

    reason: str
    sender: int | None = None
    round: int | None = None
    size: int = 0
    origin: bytes | None = None


Event = Received | Malformed


@dataclass(frozen=True)
class Send:
    """Send one message: to a peer id, or to `COORDINATOR`.

    `channel` names which of the runtime's sockets carries it where a role has two
    ("control" or "updates" for a centralized client); gossip has one.
    """

    to: int | str
    type: str
    round: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] | None = None
    channel: str = "control"


Action = Send
