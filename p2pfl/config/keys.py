"""Where a run's CURVE keys come from: the keys folder, each node's keyring (every bad
file a ScenarioError naming it, before anything starts), and the long-term keys that
vouch for secure aggregation's round keys."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from p2pfl.config.loader import graph
from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.net.keys import KeyFileError, Keyring, keyring, raw
from p2pfl.protocol.secagg import KeyAuth


def keys_dir(s: Scenario, out: Path) -> Path | None:
    """The CURVE keys folder of a run (`[security] keys`; "auto": the run folder's
    `keys/`), or None when the run is in clear."""
    keys = s.security.keys
    if keys is None:
        return None
    return out / "keys" if keys == "auto" else s.resolve(keys)


def node_keys(s: Scenario, out: Path, me: int, known: Iterable[int]) -> Keyring | None:
    """Node `me`'s keyring (peers 0..n-1, the coordinator n), knowing the nodes in
    `known`; None in clear. A bad key file is a ScenarioError naming the file."""
    folder = keys_dir(s, out)
    if folder is None:
        return None
    try:
        return keyring(folder, me, s.peers, known)
    except KeyFileError as exc:
        raise ScenarioError(f"security.keys = {s.security.keys!r}: {exc}") from None


def check_keys(s: Scenario, out: Path) -> None:
    """Load every node's keyring once, as its own process will (a local launch holds all
    the secret files): a bad key file is refused before anything starts."""
    g = graph(s)
    boot = [s.peers] if s.needs_coordinator else []
    for i in range(s.peers):
        node_keys(s, out, i, [*g.neighbors(i), *boot])
    if s.needs_coordinator:
        node_keys(s, out, s.peers, range(s.peers))


def secagg_auth(s: Scenario, out: Path, peer_id: int) -> KeyAuth | None:
    """With secure aggregation and CURVE keys: the peer's pair and every peer's public
    key, raw, which vouch for each round's keys (None otherwise)."""
    if not s.privacy.secure_aggregation:
        return None
    ring = node_keys(s, out, peer_id, range(s.peers))
    if ring is None:
        return None
    publics = {j: raw(k) for j, k in ring.known.items() if j < s.peers}
    return KeyAuth(raw(ring.secret), publics)
