"""The gossip messages' meanings, checked once: what a decoded message says, or why not.

`wire.decode` has already checked the header's types, the scenario, the arrays' dtypes,
shapes and finiteness. What is left is what a gossip receiver needs beyond that: the
type is one gossip uses, the sender is a neighbour, a model carries its params and a
plausible degree, a heartbeat names a round of the run. Each check's reason is the
text a receiver logs with `message_dropped` (runs and tests grep for these words).

Round-dependent judgements (too far ahead, stale, duplicate, beyond the last for a
model) belong to the machine that knows the round in progress (`sync`, `catchup`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from p2pfl.protocol import wire
from p2pfl.protocol.addresses import check_tcp

# the drop reasons, word for word as logged
HEARTBEAT_BEYOND_LAST = "heartbeat beyond the last round"
NOT_A_NEIGHBOUR = "sender is not a neighbour"
NO_PARAMS = "model message without params"
BAD_DEGREE = "meta.degree missing or out of range"
NOT_A_WELCOME = "not a welcome naming exactly our neighbours"
BAD_HELLO = "hello without a valid tcp:// address"


@dataclass(frozen=True)
class ModelMsg:
    """A neighbour's model of `round`, with the degree its mixing weight is computed from.

    `resend` marks a model sent again on request (a `catch_up` heartbeat).
    """

    sender: int
    round: int
    params: wire.Chunked
    degree: int
    resend: bool = False


@dataclass(frozen=True)
class Heartbeat:
    """A sign of life from a neighbour in `round`; `catch_up` asks for our current model."""

    sender: int
    round: int
    catch_up: bool = False


@dataclass(frozen=True)
class Bye:
    """A neighbour that finished its last round (`round`): not waited for, no alarm."""

    sender: int
    round: int


Gossip = ModelMsg | Heartbeat | Bye  # a gossip message that passed every check


def parse_gossip(
    msg: wire.Message, *, neighbours: Collection[int], peers: int, rounds: int
) -> Gossip | str:
    """What `msg` means to a gossip peer with these `neighbours`, or why it is dropped.

    Args:
        msg: a message that passed `wire.decode`.
        neighbours: this peer's neighbour ids.
        peers: the number of peers (a degree is in 1..peers - 1).
        rounds: the run's last round (a heartbeat never names a later one).

    Returns:
        A `ModelMsg`, `Heartbeat` or `Bye`, or the reason (a `str`) to log and drop it.
    """
    if msg.type in ("heartbeat", "bye"):
        return _liveness(msg, neighbours, rounds)
    degree = msg.meta.get("degree")
    if msg.type != "model":
        return f"unexpected message type {msg.type!r} in gossip mode"
    if msg.sender not in neighbours:
        return NOT_A_NEIGHBOUR
    if "params" not in msg.arrays:
        return NO_PARAMS
    if not (wire.is_int(degree) and 1 <= degree < peers):
        return BAD_DEGREE
    return ModelMsg(
        msg.sender, msg.round, msg.arrays["params"], degree, msg.meta.get("resend") is True
    )


def _liveness(msg: wire.Message, neighbours: Collection[int], rounds: int) -> Gossip | str:
    """A heartbeat or a bye, or why it is dropped."""
    if msg.type == "heartbeat" and msg.round > rounds:
        return HEARTBEAT_BEYOND_LAST
    if msg.sender not in neighbours:
        return f"{msg.type} from a peer that is not a neighbour"
    if msg.type == "bye":
        return Bye(msg.sender, msg.round)
    return Heartbeat(msg.sender, msg.round, msg.meta.get("catch_up") is True)


def parse_welcome(
    msg: wire.Message, *, coordinator: int, neighbours: Sequence[int]
) -> dict[int, str] | None:
    """The neighbour -> address map of a welcome, if `msg` is one from `coordinator`
    naming exactly `neighbours` (sorted), each with a valid tcp:// address; else None."""
    pairs = msg.meta.get("neighbours")
    if msg.type != "welcome" or msg.sender != coordinator or not isinstance(pairs, list):
        return None
    addresses: dict[int, str] = {}
    for pair in pairs:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and wire.is_int(pair[0])
            and isinstance(pair[1], str)
        ):
            return None
        try:
            check_tcp(pair[1])
        except ValueError:
            return None
        addresses[pair[0]] = pair[1]
    return addresses if sorted(addresses) == list(neighbours) else None


def hello_address(msg: wire.Message) -> str | None:
    """The tcp:// address a hello announces, None if it names no valid one."""
    address = msg.meta.get("address")
    if not isinstance(address, str):
        return None
    try:
        check_tcp(address)
    except ValueError:
        return None
    return address
